"""What every figure shares: colours, PNG writing, the image backdrop, box outlines.

Glossary (the package's, see the README): ``B`` batch, ``M`` max boxes per
image, ``N`` boxes drawn, ``H``/``W`` image height/width in pixels.

Boxes reach matplotlib as pixel ``xywh`` (a ``Rectangle``'s corner and size),
converted by :mod:`reorg_jax.boxes` with ``xp=np``.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from reorg_jax import boxes as box_lib
from reorg_jax.targets import Targets

if TYPE_CHECKING:
  from matplotlib.axes import Axes
  from matplotlib.figure import Figure

__all__ = ['backdrop', 'box_colour', 'draw_boxes', 'save_png', 'target_boxes']


def box_colour(index: int) -> tuple[float, float, float]:
  """Colour of box (or class) ``index`` in every figure (matplotlib's ``tab10`` cycle)."""
  import matplotlib

  return matplotlib.colormaps['tab10'](index % 10)[:3]


def save_png(
  figure: Figure, path: str | os.PathLike, *, dpi: int = 80, max_bytes: int = 200_000
) -> int:
  """Writes ``figure`` as a PNG of at most about ``max_bytes``.

  A figure whose full-colour PNG is larger is stored with a palette (octree
  quantisation, no dithering) of 256, then 128, 64 or 32 colours, the first
  that fits (the smallest otherwise).

  Returns:
    The size of the written file in bytes.
  """
  from PIL import Image

  buffer = io.BytesIO()
  figure.savefig(buffer, format='png', dpi=dpi, bbox_inches='tight', facecolor='white')
  data = buffer.getvalue()
  if len(data) > max_bytes:
    image = Image.open(io.BytesIO(data)).convert('RGB')
    for colours in (256, 128, 64, 32):
      quantised = image.quantize(
        colors=colours, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE
      )
      buffer = io.BytesIO()
      quantised.save(buffer, format='png', optimize=True)
      data = buffer.getvalue()
      if len(data) <= max_bytes:
        break
  with open(path, 'wb') as file:
    file.write(data)
  return len(data)


def backdrop(image: np.ndarray) -> np.ndarray:
  """``image`` desaturated and lightened, so that coloured cells and boxes stand out on it."""
  rgb = np.asarray(image, np.float32)
  grey = rgb.mean(axis=-1, keepdims=True)
  return (0.55 * (0.4 * rgb + 0.6 * grey) + 0.45 * 255).astype(np.uint8)


def target_boxes(targets: Targets, image_index: int, image_hw: tuple[int, int]) -> np.ndarray:
  """``[N, 4]`` pixel ``xywh`` boxes of the valid boxes of one image, in ``Targets`` order."""
  height, width = image_hw
  valid = np.asarray(targets.valid)[image_index]
  boxes = np.asarray(targets.boxes, np.float64)[image_index][valid]
  return box_lib.normalized_cxcywh_to_pixel_xywh(boxes, width=width, height=height, xp=np)


def draw_boxes(ax: Axes, boxes: np.ndarray, *, labels: Sequence[str] | None = None) -> None:
  """Outlines of ``[N, 4]`` pixel ``xywh`` boxes in their box colours, labelled at the top left.

  Args:
    ax: the panel.
    boxes: ``[N, 4]``; box ``m`` is drawn in :func:`box_colour` ``(m)``.
    labels: ``N`` texts; default: the box index.
  """
  from matplotlib.patches import Rectangle

  for m, (x, y, w, h) in enumerate(boxes):
    colour = box_colour(m)
    ax.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor=colour, linewidth=1.6))
    text = str(m) if labels is None else labels[m]
    ax.text(
      x + 1,
      y + 1,
      text,
      color='white',
      fontsize=7,
      va='top',
      bbox={'facecolor': colour, 'edgecolor': 'none', 'pad': 1, 'alpha': 0.9},
    )
