"""TFDS builder `stdlib_source`: the Python standard library's own `.py` files as a text corpus.

Built locally (no download) from `sysconfig.get_paths()['stdlib']`, without `site-packages`.
Each example is one file: `{'text': source, 'path': path relative to the stdlib root}`. Files
are read in sorted order and split into train/validation by a stable hash of the path; files
that are not valid UTF-8 are skipped. Configs: `full` (every file) and `tiny` (the first
TINY_TRAIN_FILES train files and TINY_VALIDATION_FILES validation files, for tests and demos).
The corpus is whatever Python the builder runs under.
"""
import pathlib
import sysconfig
import zlib

import tensorflow_datasets as tfds

VALIDATION_PERCENT = 5
TINY_TRAIN_FILES = 60
TINY_VALIDATION_FILES = 10


def split_of(relative_path: str) -> str:
  """'train' or 'validation', from a stable hash of the path (about 5% validation)."""
  bucket = zlib.crc32(relative_path.encode("utf-8")) % 100
  return "validation" if bucket < VALIDATION_PERCENT else "train"


def stdlib_files() -> list[pathlib.Path]:
  """The stdlib's `.py` files in sorted order, site-packages excluded."""
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  return [path for path in sorted(root.rglob("*.py"))
          if "site-packages" not in path.relative_to(root).parts and path.is_file()]


class StdlibSource(tfds.core.GeneratorBasedBuilder):
  """The Python standard library's source files."""

  name = "stdlib_source"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  # Nothing to download. Also keeps TFDS from looking for a checksums file next to this module,
  # a look-up that needs the `importlib_resources` backport.
  url_infos = None
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name="full", description="Every stdlib .py file."),
      tfds.core.BuilderConfig(
          name="tiny", description=f"The first {TINY_TRAIN_FILES} train and "
          f"{TINY_VALIDATION_FILES} validation files, in sorted order."),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict(
            {"text": tfds.features.Text(), "path": tfds.features.Text()}),
        description=__doc__)

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    limits = {"train": TINY_TRAIN_FILES, "validation": TINY_VALIDATION_FILES}
    files = {"train": [], "validation": []}
    for path in stdlib_files():
      relative = path.relative_to(root).as_posix()
      split = split_of(relative)
      if self.builder_config.name == "tiny" and len(files[split]) >= limits[split]:
        continue
      try:
        text = path.read_text(encoding="utf-8")
      except UnicodeDecodeError:
        continue
      files[split].append((relative, text))
    return {split: self._generate_examples(examples) for split, examples in files.items()}

  def _generate_examples(self, examples):
    for relative, text in examples:
      yield relative, {"text": text, "path": relative}
