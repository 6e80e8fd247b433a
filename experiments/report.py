"""The first lines of every result file under experiments/results/: title, command, machine,
date, commit, jax version and time taken (DESIGN.md: a committed result says all of them)."""
import datetime
import os
import platform
import subprocess

import jax


def commit() -> str:
  """The checkout's short commit hash: $LLM_RESEARCH_COMMIT where set (a copy of the tree without
  .git, as on a lent GPU machine: scripts/gpu_session.sh), else git's; 'unknown' without both."""
  if os.environ.get("LLM_RESEARCH_COMMIT"):
    return os.environ["LLM_RESEARCH_COMMIT"]
  out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.abspath(__file__))).stdout
  return out.strip() or "unknown"


def header(title: str, command: str, seconds: float, took: str = "") -> list[str]:
  """A result file's title, command and machine line; `took` qualifies the time taken."""
  return [f"# {title}", "", f"Command: `{command}`  ",
          f"Machine: {platform.machine()}, {jax.devices()[0].device_kind}, {os.cpu_count()} "
          f"cores; date {datetime.date.today()}; commit {commit()}; jax {jax.__version__}; "
          f"took {seconds / 60:.1f} min{took}.  "]


def write(path: str, lines: list[str]) -> None:
  """Writes a result file's lines to `path` (markdown) and prints them."""
  text = "\n".join(lines) + "\n"
  with open(path, "w") as f:
    f.write(text)
  print(text, end="")
