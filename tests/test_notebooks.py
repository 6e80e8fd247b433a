"""Every notebook in colab/ runs top to bottom in a fresh kernel of this interpreter.

The notebooks' fast settings (LLM_RESEARCH_NOTEBOOK_FAST=1) keep each to seconds or a minute;
data, tokenizer cache and workdir point at temporary folders.
"""
import json
import pathlib

import nbformat
import pytest
from ipykernel.kernelspec import install as install_kernelspec
from nbclient import NotebookClient

from llm_research.metrics import read_metrics

COLAB_DIR = pathlib.Path(__file__).resolve().parent.parent / "colab"
NOTEBOOKS = sorted(COLAB_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 600
KERNEL_NAME = "llm_research_tests"
QUICKSTART_STEPS = 30


@pytest.fixture
def kernel_name(tmp_path, monkeypatch):
  """A kernelspec that starts `sys.executable`, found before any user-wide `python3` spec."""
  prefix = tmp_path / "jupyter_prefix"
  install_kernelspec(kernel_name=KERNEL_NAME, prefix=str(prefix))
  monkeypatch.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
  return KERNEL_NAME


def test_quickstart_notebook_exists():
  assert COLAB_DIR / "quickstart.ipynb" in NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)
def test_notebook_runs_top_to_bottom(path, kernel_name, data_dirs, tmp_path, monkeypatch):
  data_dir, cache_dir = data_dirs
  workdir = tmp_path / "workdir"
  monkeypatch.setenv("LLM_RESEARCH_NOTEBOOK_FAST", "1")
  monkeypatch.setenv("LLM_RESEARCH_NOTEBOOK_STEPS", str(QUICKSTART_STEPS))
  monkeypatch.setenv("LLM_RESEARCH_NOTEBOOK_WORKDIR", str(workdir))
  monkeypatch.setenv("LLM_RESEARCH_DATA_DIR", data_dir)
  monkeypatch.setenv("LLM_RESEARCH_CACHE_DIR", cache_dir)
  notebook = nbformat.read(path, as_version=4)

  # Raises CellExecutionError, with the cell and its traceback, if any cell fails.
  NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name=kernel_name,
                 resources={"metadata": {"path": str(COLAB_DIR)}}).execute()

  code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
  assert all(cell.execution_count for cell in code_cells), "a code cell did not run"
  errors = [output for cell in code_cells for output in cell.outputs
            if output.output_type == "error"]
  assert not errors
  if path.name == "quickstart.ipynb":
    records = read_metrics(workdir)
    assert records[-1]["step"] == QUICKSTART_STEPS and "eval_loss" in records[-1]
    assert any("image/png" in output.get("data", {}) for cell in code_cells
               for output in cell.outputs), "no loss plot"
  if path.name == "from_huggingface.ipynb":  # the exported MoE, as transformers reads it
    with open(workdir / "exported" / "config.json") as f:
      assert json.load(f)["architectures"] == ["MixtralForCausalLM"]
