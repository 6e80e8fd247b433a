"""ABC tunes shipped inside the `music21` package, and their MIDI files made by music21.

music21's corpus holds about 1150 `.abc` files with about 13,000 tunes (most from Ryan's
Mammoth Collection). `corpus_tunes()` splits every file into its tunes: a tune is the text from
its `X:` line up to the next tune's `X:` line (or the end of the file), trailing whitespace cut,
one newline added; the file's header before its first tune is not part of any tune. A tune's id
is `<path in the corpus>#<its index in the file, from 0>`. `to_midi(abc)` converts one tune with
`music21.converter.parse(abc, format='abc')` and `midi.translate.streamToMidiFile`; it returns
None for a tune music21 cannot convert.
"""
import pathlib
import re
import warnings

_TUNE_START = re.compile(r"(?m)^(?=X:)")


def corpus_tunes() -> list[tuple[str, str]]:
  """(id, ABC text) of every tune of every `.abc` file in music21's corpus, in sorted order."""
  import music21  # pylint: disable=g-import-not-at-top (a slow import, needed only here)
  root = pathlib.Path(music21.__file__).parent / "corpus"
  tunes = []
  for path in sorted(root.rglob("*.abc")):
    text = path.read_text(encoding="utf-8", errors="replace")
    for index, tune in enumerate(_TUNE_START.split(text)[1:]):
      tunes.append((f"{path.relative_to(root).as_posix()}#{index}", tune.rstrip() + "\n"))
  return tunes


def to_midi(abc: str) -> bytes | None:
  """The MIDI file music21 writes for one ABC tune, or None if it cannot convert it."""
  from music21 import converter, midi  # pylint: disable=g-import-not-at-top
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # music21 warns about every ABC construct it skips
    try:
      score = converter.parse(abc, format="abc")
      return midi.translate.streamToMidiFile(score).writestr()
    except Exception:  # pylint: disable=broad-except (music21 raises many kinds on odd tunes)
      return None
