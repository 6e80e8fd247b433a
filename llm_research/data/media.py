"""Labelled digital media as file bytes, for bGPT's byte-stream classification.

- `digit_bmps`: scikit-learn's handwritten digits (1797 images of 8 x 8 pixels, 17 grey levels,
  shipped with the package) upscaled to `side` x `side` (by default 4x, to 32 x 32; `side=8`:
  as they are), black ink on white, written as 24-bit BMP files (a 54-byte header, then rows
  bottom-up, 3 * side bytes each: 3126 bytes at 32 x 32, 246 at 8 x 8); the label is the digit.
- `sound_clips`: 8-bit unsigned, 8 kHz, mono WAV files (python's `wave`; a 44-byte header) of
  one generated tone each; the label is its waveform, `WAVEFORMS[label]`: sine, square,
  sawtooth or white noise, at a random pitch (log-uniform in 200-1000 Hz; noise has none),
  duration (by default 0.1-0.25 s) and amplitude (0.3-0.9 of full scale). Deterministic by seed.
"""
import io
import struct
import wave

import numpy as np

BMP_SIDE = 32
WAVEFORMS = ("sine", "square", "sawtooth", "noise")
SAMPLE_RATE = 8000
PITCH_HZ = (200.0, 1000.0)
DURATION_S = (0.1, 0.25)
AMPLITUDE = (0.3, 0.9)


def bmp_bytes(rgb: np.ndarray) -> bytes:
  """A 24-bit uncompressed BMP file of an [height, width, 3] uint8 RGB image."""
  height, width, _ = rgb.shape
  row_bytes = (3 * width + 3) // 4 * 4  # rows are padded to 4 bytes
  pixels = np.zeros((height, row_bytes), np.uint8)
  pixels[:, :3 * width] = rgb[::-1, :, ::-1].reshape(height, 3 * width)  # bottom-up, BGR
  header_bytes = 14 + 40
  file_header = struct.pack("<2sIHHI", b"BM", header_bytes + pixels.size, 0, 0, header_bytes)
  # BITMAPINFOHEADER: size, width, height, planes, bits per pixel, no compression, image size,
  # 2835 pixels per metre (72 dpi) both ways, no palette.
  info_header = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, pixels.size, 2835, 2835,
                            0, 0)
  return file_header + info_header + pixels.tobytes()


def digit_bmps(side: int = BMP_SIDE) -> list[tuple[bytes, int]]:
  """(BMP bytes, digit) for each of scikit-learn's 1797 digits, in its order, as images of
  `side` x `side` pixels (a multiple of 8)."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top (slow import)
  digits = load_digits()
  scale = side // digits.images.shape[1]
  examples = []
  for image, label in zip(digits.images, digits.target):
    grey = np.round(255 - image / 16 * 255).astype(np.uint8)  # ink (16) black on white (0)
    big = np.kron(grey, np.ones((scale, scale), np.uint8))
    examples.append((bmp_bytes(np.repeat(big[:, :, None], 3, axis=2)), int(label)))
  return examples


def _tone(rng: np.random.Generator, waveform: str,
          duration_s: tuple[float, float]) -> np.ndarray:
  """One clip's samples in [-1, 1], of a duration uniform in `duration_s` (seconds)."""
  length = int(rng.uniform(*duration_s) * SAMPLE_RATE)
  pitch = float(np.exp(rng.uniform(*np.log(PITCH_HZ))))
  phase = (rng.uniform() + pitch * np.arange(length) / SAMPLE_RATE) % 1.0  # cycles, in [0, 1)
  amplitude = rng.uniform(*AMPLITUDE)
  if waveform == "sine":
    signal = np.sin(2 * np.pi * phase)
  elif waveform == "square":
    signal = np.where(phase < 0.5, 1.0, -1.0)
  elif waveform == "sawtooth":
    signal = 2 * phase - 1
  else:
    signal = rng.uniform(-1, 1, length)
  return amplitude * signal


def wav_bytes(samples: np.ndarray) -> bytes:
  """An 8-bit unsigned 8 kHz mono WAV file of samples in [-1, 1]."""
  buffer = io.BytesIO()
  with wave.open(buffer, "wb") as writer:
    writer.setnchannels(1)
    writer.setsampwidth(1)
    writer.setframerate(SAMPLE_RATE)
    writer.writeframes(np.clip(np.round(128 + 127 * samples), 0, 255).astype(np.uint8).tobytes())
  return buffer.getvalue()


def sound_clips(count: int, seed, duration_s: tuple[float, float] = DURATION_S
                ) -> list[tuple[bytes, int]]:
  """`count` (WAV bytes, waveform index) pairs, waveforms uniformly at random, durations
  uniform in `duration_s` (seconds); `seed` is any seed `np.random.default_rng` takes."""
  rng = np.random.default_rng(seed)
  clips = []
  for _ in range(count):
    label = int(rng.integers(len(WAVEFORMS)))
    clips.append((wav_bytes(_tone(rng, WAVEFORMS[label], duration_s)), label))
  return clips
