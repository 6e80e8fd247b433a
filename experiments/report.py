"""The first lines of every result file under experiments/results/: title, command, machine,
date, commit, jax version and time taken (DESIGN.md: a committed result says all of them)."""
import datetime
import glob
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


# The commit of the code that runs: read when a script starts (imports this), so that a commit
# made while a long experiment runs is not named in its results.
COMMIT_AT_START = commit()


def header(title: str, command: str, seconds: float, took: str = "") -> list[str]:
  """A result file's title, command and machine line (the commit checked out when the script
  started); `took` qualifies the time taken."""
  return [f"# {title}", "", f"Command: `{command}`  ",
          f"Machine: {platform.machine()}, {jax.devices()[0].device_kind}, {os.cpu_count()} "
          f"cores; date {datetime.date.today()}; commit {COMMIT_AT_START}; jax {jax.__version__}; "
          f"took {seconds / 60:.1f} min{took}.  "]


def write(path: str, lines: list[str]) -> None:
  """Writes a result file's lines to `path` (markdown) and prints them."""
  text = "\n".join(lines) + "\n"
  with open(path, "w") as f:
    f.write(text)
  print(text, end="")


RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def show(name: str, start: str = "\n|") -> None:
  """In a notebook: the committed result `experiments/results/<name>.md` from `start` (by default
  its first table) on, then its figures (`<name>*.png`). The file's first lines name the command,
  machine, date and commit."""
  from IPython.display import Image, display

  with open(os.path.join(RESULTS, name + ".md")) as f:
    text = f.read()
  print(text[text.index(start):].strip())
  for path in sorted(glob.glob(os.path.join(RESULTS, glob.escape(name) + "*.png"))):
    display(Image(filename=path))
