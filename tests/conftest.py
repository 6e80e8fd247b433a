"""Shared fixtures: a tiny experiment config on the tiny stdlib corpus, built once per session."""
import os

import pytest

TESTS_DIR = os.path.dirname(__file__)
TINY_CONFIG = os.path.join(TESTS_DIR, "tiny_config.py")


@pytest.fixture(scope="session")
def data_dirs(tmp_path_factory):
  """(data_dir, cache_dir) shared by every test that runs the tiny config."""
  return (str(tmp_path_factory.mktemp("tensorflow_datasets")),
          str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def tiny_overrides(data_dirs):
  """Command-line overrides that point the tiny config at the session's data dirs."""
  data_dir, cache_dir = data_dirs
  return [f"data.data_dir={data_dir}", f"data.cache_dir={cache_dir}"]


@pytest.fixture
def tiny_config(tiny_overrides):
  """A fresh tiny ConfigDict (see tests/tiny_config.py); `tiny_config(*overrides)`."""
  from llm_research.config import load_config
  return lambda *overrides: load_config(TINY_CONFIG, [*tiny_overrides, *overrides])
