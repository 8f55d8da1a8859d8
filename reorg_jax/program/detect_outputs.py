"""What ``reorg-jax detect`` writes: boxes drawn on images and videos, label lines, records.

Glossary: ``H``/``W`` an image's own height and width, ``h``/``w`` its
network input's, ``C`` classes, ``n`` detections found in one image.

Every file is written complete or not at all: under a temporary name beside
it, renamed at the end (:func:`write_bytes`, :func:`save_image`,
:class:`VideoOut`). :func:`draw` outlines and labels an image's boxes,
:func:`label_lines` gives upstream's ``--save-txt`` lines
(:func:`save_labels` writes them) and :func:`record` an image's entry of
``detections.json``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from reorg_jax import boxes as box_lib

__all__ = [
  'DEFAULT_FPS',
  'VideoOut',
  'draw',
  'label_lines',
  'record',
  'save_image',
  'save_labels',
  'source_fps',
  'write_bytes',
]

# The label drawn on a box is this colour's text on the box's colour (BGR).
_TEXT_COLOUR = (255, 255, 255)
# Frames per second of a written video whose source does not say.
DEFAULT_FPS = 30.0


def label_lines(
  boxes: np.ndarray,
  scores: np.ndarray,
  classes: np.ndarray,
  *,
  original_hw: tuple[int, int],
  with_score: bool,
) -> list[str]:
  """Upstream's ``--save-txt`` lines: ``class x y w h [conf]``, lowest score first.

  ``boxes`` are the ``[n, 4]`` corners in the image's pixels, rounded to
  whole pixels as upstream does before writing; centre and size are
  normalised to the ``H x W`` image; numbers as ``%g``.
  """
  h0, w0 = original_hw
  xywh = box_lib.pixel_xyxy_to_normalized_cxcywh(np.round(boxes), width=w0, height=h0, xp=np)
  lines = []
  for row in reversed(range(len(boxes))):
    values = (int(classes[row]), *xywh[row].tolist(), *([scores[row]] if with_score else []))
    lines.append(('%g ' * len(values)).rstrip() % values)
  return lines


def _colour(index: int) -> tuple[int, int, int]:
  """A distinct BGR colour per class (hues spaced by the golden angle)."""
  hue = int(180 * ((index * 0.618033988749895) % 1.0))
  pixel = np.array([[[hue, 200, 230]]], np.uint8)
  return tuple(int(v) for v in cv2.cvtColor(pixel, cv2.COLOR_HSV2BGR)[0, 0])


def draw(
  image: np.ndarray,
  boxes: np.ndarray,
  scores: np.ndarray,
  classes: np.ndarray,
  *,
  names: Sequence[str],
) -> np.ndarray:
  """``image`` (``[H, W, 3]`` BGR) with each box outlined and labelled ``name score``.

  Boxes (``[n, 4]`` pixel corners, rounded to whole pixels) are drawn lowest
  score first, so the best lie on top.
  """
  out = np.ascontiguousarray(image).copy()
  h0, w0 = out.shape[:2]
  thickness = max(1, round((h0 + w0) / 1000))
  scale = thickness / 3
  for row in reversed(range(len(boxes))):
    x1, y1, x2, y2 = (int(v) for v in np.round(boxes[row]))
    colour = _colour(int(classes[row]))
    cv2.rectangle(out, (x1, y1), (x2, y2), colour, thickness, cv2.LINE_AA)
    text = f'{names[int(classes[row])]} {scores[row]:.2f}'
    (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    top = max(y1, th + 3)  # inside the image when the box touches its top
    cv2.rectangle(out, (x1, top - th - 3), (x1 + tw, top), colour, -1, cv2.LINE_AA)
    cv2.putText(
      out,
      text,
      (x1, top - 2),
      cv2.FONT_HERSHEY_SIMPLEX,
      scale,
      _TEXT_COLOUR,
      thickness,
      cv2.LINE_AA,
    )
  return out


def write_bytes(path: Path, data: bytes) -> None:
  """Writes ``data`` to ``path`` through a temporary file renamed at the end."""
  path.parent.mkdir(parents=True, exist_ok=True)
  partial = path.with_name(f'.{path.name}.partial')
  partial.write_bytes(data)
  os.replace(partial, path)


def save_image(path: Path, image: np.ndarray) -> None:
  """Writes an ``[H, W, 3]`` BGR image to ``path`` in its suffix's format (:func:`write_bytes`)."""
  done, encoded = cv2.imencode(path.suffix, image)
  if not done:
    raise OSError(f'OpenCV cannot encode {path.suffix} images')
  write_bytes(path, encoded.tobytes())


class VideoOut:
  """A video written under a temporary name, renamed to ``path`` when complete."""

  def __init__(self, path: Path, *, fps: float, size: tuple[int, int]):
    path.parent.mkdir(parents=True, exist_ok=True)
    self.path = path
    self.partial = path.with_name(f'.{path.stem}.partial{path.suffix}')
    self.writer = cv2.VideoWriter(str(self.partial), cv2.VideoWriter_fourcc(*'mp4v'), fps, size)
    if not self.writer.isOpened():
      raise OSError(f'OpenCV cannot write the video {path}')

  def write(self, frame: np.ndarray) -> None:
    self.writer.write(frame)

  def close(self, *, complete: bool) -> None:
    self.writer.release()
    if complete:
      os.replace(self.partial, self.path)
    else:
      self.partial.unlink(missing_ok=True)


def save_labels(
  path: Path,
  boxes: np.ndarray,
  scores: np.ndarray,
  classes: np.ndarray,
  *,
  original_hw: tuple[int, int],
  with_score: bool,
) -> bool:
  """Writes :func:`label_lines` to ``path``; none (an earlier run's removed) without boxes.

  Returns:
    Whether ``path`` was written.
  """
  if not len(boxes):
    path.unlink(missing_ok=True)  # an earlier run's
    return False
  lines = label_lines(boxes, scores, classes, original_hw=original_hw, with_score=with_score)
  write_bytes(path, ''.join(f'{line}\n' for line in lines).encode())
  return True


def source_fps(path: Path) -> float:
  """The frame rate of the video ``path`` as OpenCV reads it, else :data:`DEFAULT_FPS`."""
  capture = cv2.VideoCapture(str(path))
  fps = capture.get(cv2.CAP_PROP_FPS)
  capture.release()
  return fps if fps and math.isfinite(fps) and fps > 0 else DEFAULT_FPS


def record(
  path: Path,
  boxes: np.ndarray,
  scores: np.ndarray,
  classes: np.ndarray,
  *,
  frame: int,
  original_hw: tuple[int, int],
  input_hw: tuple[int, int],
  candidates: int,
  names: Sequence[str],
) -> dict[str, Any]:
  """An image's (``frame`` 0) or video frame's entry of ``detections.json``.

  Args:
    path: the source file.
    boxes: ``[n, 4]`` corners in the ``H x W`` image's pixels (rounded to 3 decimals).
    scores: ``[n]`` objectness times class probability.
    classes: ``[n]`` class indices, below ``C``.
    frame: the frame, from 1; 0: an image.
    original_hw: ``(H, W)``.
    input_hw: ``(h, w)``.
    candidates: the boxes that entered suppression.
    names: the ``C`` class names.
  """
  h0, w0 = original_hw
  return {
    'file': str(path),
    'frame': frame or None,
    'height': int(h0),
    'width': int(w0),
    'input': [int(v) for v in input_hw],
    'candidates': candidates,
    'detections': [
      {
        'class': int(c),
        'name': names[int(c)],
        'score': float(s),
        'box': [round(float(v), 3) for v in box],
      }
      for box, s, c in zip(boxes, scores, classes, strict=True)
    ],
  }
