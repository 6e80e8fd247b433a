"""Pallas kernels, installed as `llm_research.kernels` (setup.py's package_dir).

From the repository root (a notebook, `python -c`, `python -`) Python also finds this folder
as a top-level package `kernels`, which would shadow PyPI's `kernels` that `transformers`
imports. Imported under that bare name, this file steps aside: it loads the next `kernels`
on sys.path in its own place, or fails as if the folder were not there. (Without this file the
folder would be a namespace package that a regular one outranks, but setuptools' editable
installs cannot then map `llm_research.kernels` onto it.)
"""
import importlib.machinery
import importlib.util
import os
import sys

if __name__ == "kernels":
  _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  _elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
  _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
  if _spec is None:
    raise ModuleNotFoundError("No module named 'kernels' (this repository's kernels/ folder is "
                              "llm_research.kernels)", name="kernels")
  _module = importlib.util.module_from_spec(_spec)
  sys.modules["kernels"] = _module  # `import kernels` hands back what sys.modules holds
  _spec.loader.exec_module(_module)
