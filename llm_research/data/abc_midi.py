"""ABC tunes shipped inside the `music21` package, and their MIDI files made by music21.

music21's corpus holds about 1150 `.abc` files with about 13,000 tunes (most from Ryan's
Mammoth Collection). `corpus_tunes()` splits every file into its tunes: a tune is the text from
its `X:` line up to the next tune's `X:` line (or the end of the file), trailing whitespace cut,
one newline added; the file's header before its first tune is not part of any tune. A tune's id
is `<path in the corpus>#<its index in the file, from 0>`. `to_midi(abc)` converts one tune with
`music21.converter.parse(abc, format='abc')` and `midi.translate.streamToMidiFile`; it returns
None for a tune music21 cannot convert. `short_tune(abc, bars)` keeps a tune's first bars and
only the header fields its MIDI file depends on.
"""
import pathlib
import re
import warnings

_TUNE_START = re.compile(r"(?m)^(?=X:)")
_FIELD = re.compile(r"^([A-Za-z]):")
_BAR_LINE = re.compile(r":*\|[|\]:]*")  # |, ||, |], |:, :|, ::|, :|: ...
# The header fields music21's MIDI file depends on: meter, unit note length, tempo, key.
MIDI_FIELDS = ("M", "L", "Q", "K")


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


def short_tune(abc: str, bars: int) -> str:
  """The tune's first `bars` bars (the text up to and including its `bars`-th bar line; a
  pickup before the first bar line counts as a bar), after `X:1` and the tune's MIDI_FIELDS
  lines up to `K:`; the other fields (title, origin, notes, words...), comments and blank lines
  are dropped. A tune with fewer bar lines keeps its whole body."""
  lines = abc.splitlines()
  header, body = ["X:1"], []
  for index, line in enumerate(lines):
    field = _FIELD.match(line)
    if field and field.group(1) in MIDI_FIELDS:
      header.append(line.strip())
    if field and field.group(1) == "K":
      body = [rest.split("%")[0].rstrip() for rest in lines[index + 1:]
              if not _FIELD.match(rest)]
      break
  text = "\n".join(line for line in body if line.strip())
  ends = [bar_line.end() for bar_line in _BAR_LINE.finditer(text)]
  if len(ends) >= bars:
    text = text[:ends[bars - 1]]
  return "\n".join(header + [text.strip()]) + "\n"


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
