"""Figures that explain ReOrg, the lead-guided assigner, parity and training.

Glossary: ``B`` batch, ``H``/``W`` image height/width, ``C`` channels (of an
image) or classes (of a detector), ``L`` levels, ``M`` max boxes per image,
``K`` candidate slots per image, ``D`` detections per image.

Used by the notebooks in ``notebooks/`` and by ``notebooks/make_figures.py``,
which writes the README's pictures. Every function only draws what the
library computed and returns a ``matplotlib.figure.Figure``; matplotlib is
imported inside the functions, so the library itself does not need it.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from reorg_jax.loss._assign import Assignment
from reorg_jax.loss._config import LossConfig
from reorg_jax.models.reorg import reorg
from reorg_jax.targets import Targets

if TYPE_CHECKING:
  from matplotlib.axes import Axes
  from matplotlib.figure import Figure

__all__ = [
  'REORG_SLOTS',
  'assignment_change_figure',
  'assignment_figure',
  'box_colour',
  'channel_order_figure',
  'detections_figure',
  'gradient_figure',
  'loss_curves_figure',
  'reorg_figure',
  'save_png',
  'space_to_depth',
]

# ReOrg's four sub-images, in channel order: (name, row slice, column slice).
REORG_SLOTS = (
  ('rows 0::2, cols 0::2', slice(0, None, 2), slice(0, None, 2)),
  ('rows 1::2, cols 0::2', slice(1, None, 2), slice(0, None, 2)),
  ('rows 0::2, cols 1::2', slice(0, None, 2), slice(1, None, 2)),
  ('rows 1::2, cols 1::2', slice(1, None, 2), slice(1, None, 2)),
)
_SLOT_COLOURS = ('#4c72b0', '#dd8452', '#55a868', '#c44e52')
_RGB = 'RGB'
_HEADS = (
  ('lead head, fine: centre + 2 neighbours (g = 0.5)', 'fine'),
  ('aux head, coarse: centre + 4 neighbours (g = 1.0)', 'coarse'),
)


def box_colour(index: int) -> tuple[float, float, float]:
  """Colour of box ``index`` in every figure (matplotlib's ``tab10`` cycle)."""
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


def space_to_depth(x: np.ndarray) -> np.ndarray:
  """The reshape/transpose space-to-depth, for comparison with :func:`reorg_jax.reorg`.

  ``[B, H, W, C] -> [B, H/2, W/2, 4C]`` with channel ``(2 * row parity +
  column parity) * C + c``: the same four sub-images as ReOrg, but slots 1
  and 2 (odd rows / odd columns) swapped. Weights trained on ReOrg's order
  read shuffled inputs under this one.
  """
  batch, height, width, channels = x.shape
  blocks = np.asarray(x).reshape(batch, height // 2, 2, width // 2, 2, channels)
  return blocks.transpose(0, 1, 3, 2, 4, 5).reshape(batch, height // 2, width // 2, 4 * channels)


def _pattern(ax: Axes, size: int = 4) -> None:
  """A ``size x size`` pixel grid, each pixel coloured and numbered by its ReOrg slot."""
  from matplotlib.patches import Rectangle

  for row in range(size):
    for col in range(size):
      slot = (row % 2) + 2 * (col % 2)
      ax.add_patch(Rectangle((col, row), 1, 1, facecolor=_SLOT_COLOURS[slot], edgecolor='white'))
      ax.text(col + 0.5, row + 0.5, str(slot), ha='center', va='center', color='white')
  ax.set_xlim(0, size)
  ax.set_ylim(size, 0)
  ax.set_aspect('equal')
  ax.set_xticks(np.arange(size) + 0.5, [str(i) for i in range(size)])
  ax.set_yticks(np.arange(size) + 0.5, [str(i) for i in range(size)])
  ax.set_xlabel('column')
  ax.set_ylabel('row')
  ax.set_title('slot of each input pixel')


def reorg_figure(image: np.ndarray, *, crop: tuple[int, int, int] | None = None) -> Figure:
  """ReOrg of one RGB image: its four sub-images and their channel ranges.

  Top row: the image and the four ``H/2 x W/2`` sub-images that
  :func:`reorg_jax.reorg` concatenates, in channel order. Bottom row: which
  slot every input pixel goes to, and the same crop of each sub-image at
  nearest-neighbour zoom, where the one-pixel shifts between slots show.

  Args:
    image: ``[H, W, 3]`` uint8 RGB, ``H`` and ``W`` even.
    crop: ``(top, left, side)`` of the zoomed square in input pixels (even
      numbers); default: a square of a quarter of the shorter side around the
      middle.
  """
  import matplotlib.pyplot as plt
  from matplotlib.patches import Rectangle

  height, width, _ = image.shape
  if crop is None:
    side = (min(height, width) // 8) * 2
    crop = ((height - side) // 4 * 2, (width - side) // 4 * 2, side)
  top, left, side = crop
  out = np.asarray(reorg(image[None].astype(np.float32)))[0]  # [H/2, W/2, 12]
  figure, axes = plt.subplots(2, 5, figsize=(13.5, 5.8), layout='constrained')
  axes[0, 0].imshow(image)
  axes[0, 0].add_patch(
    Rectangle((left - 0.5, top - 0.5), side, side, fill=False, edgecolor='black', linewidth=1.5)
  )
  axes[0, 0].set_title(f'input [{height}, {width}, 3]')
  _pattern(axes[1, 0])
  for slot, (name, _, _) in enumerate(REORG_SLOTS):
    sub = out[..., 3 * slot : 3 * slot + 3].astype(np.uint8)
    colour = _SLOT_COLOURS[slot]
    axes[0, slot + 1].imshow(sub)
    axes[0, slot + 1].set_title(
      f'slot {slot}: x[{name}]\nchannels {3 * slot}-{3 * slot + 2} (R, G, B)', color=colour
    )
    zoom = sub[top // 2 : (top + side) // 2, left // 2 : (left + side) // 2]
    axes[1, slot + 1].imshow(zoom, interpolation='nearest')
    axes[1, slot + 1].set_title(f'slot {slot}, crop', color=colour)
  for ax in axes.flat[1:]:
    if ax is not axes[1, 0]:
      ax.set_xticks([])
      ax.set_yticks([])
  axes[0, 0].set_xticks([])
  axes[0, 0].set_yticks([])
  figure.suptitle(
    f'ReOrg: [1, {height}, {width}, 3] -> [1, {height // 2}, {width // 2}, 12]; '
    'output channel 3 * slot + c holds colour c of sub-image slot'
  )
  return figure


def _channel_labels(order: str) -> list[str]:
  """Names ``slot/colour`` of the 12 output channels of an RGB input in ``order``."""
  labels = []
  for channel in range(12):
    group, colour = divmod(channel, 3)
    if order == 'reorg':
      rows, cols = group % 2, group // 2
    else:
      rows, cols = group // 2, group % 2
    labels.append(f'{channel}: r{rows} c{cols} {_RGB[colour]}')
  return labels


def channel_order_figure(image: np.ndarray, *, crop: tuple[int, int, int] | None = None) -> Figure:
  """ReOrg's channel order against the reshape/transpose space-to-depth.

  Three rows of 12 tiles (one per output channel, the same crop each):
  :func:`reorg_jax.reorg`, :func:`space_to_depth`, and the absolute
  difference. Tile labels read ``channel: r<row parity> c<column parity>
  <colour>``. The outputs hold the same values, but channels 3-5 and 6-8
  trade places, so the difference is an edge image there and zero elsewhere.

  Args:
    image: ``[H, W, 3]`` uint8 RGB, ``H`` and ``W`` even.
    crop: ``(top, left, side)`` in input pixels (even numbers); default: the
      middle half of the shorter side.
  """
  import matplotlib.pyplot as plt

  height, width, _ = image.shape
  if crop is None:
    side = (min(height, width) // 4) * 2
    crop = ((height - side) // 4 * 2, (width - side) // 4 * 2, side)
  top, left, side = crop
  window = image[top : top + side, left : left + side][None].astype(np.float32)
  ours = np.asarray(reorg(window))[0]
  other = space_to_depth(window)[0]
  difference = np.abs(ours - other)
  rows = (
    ('reorg_jax.reorg (upstream order)', ours, _channel_labels('reorg'), 'gray'),
    ('reshape/transpose space-to-depth', other, _channel_labels('s2d'), 'gray'),
    ('|difference|', difference, None, 'magma'),
  )
  figure, axes = plt.subplots(3, 12, figsize=(15, 4.6), layout='constrained')
  for row, (name, values, labels, cmap) in enumerate(rows):
    for channel in range(12):
      ax = axes[row, channel]
      limit = 255 if cmap == 'gray' else max(float(difference.max()), 1.0)
      ax.imshow(values[..., channel], cmap=cmap, vmin=0, vmax=limit, interpolation='nearest')
      ax.set_xticks([])
      ax.set_yticks([])
      if labels is not None:
        ax.set_title(labels[channel], fontsize=7.5, color=_SLOT_COLOURS[_slot_of(labels[channel])])
      else:
        ax.set_title(f'max {values[..., channel].max():.0f}', fontsize=7.5)
    axes[row, 0].set_ylabel(name, fontsize=8, rotation=0, ha='right', va='center')
  figure.suptitle(
    'Same values, different channel order: slots 1 (r1 c0) and 2 (r0 c1) are swapped, so a '
    'first conv trained on one order reads shuffled inputs under the other'
  )
  return figure


def _slot_of(label: str) -> int:
  """ReOrg slot of a ``_channel_labels`` entry (``slot = row parity + 2 * column parity``)."""
  rows, cols = int(label.split(' r')[1][0]), int(label.split(' c')[1][0])
  return rows + 2 * cols


def _backdrop(image: np.ndarray) -> np.ndarray:
  """``image`` desaturated and lightened, so that coloured cells and boxes stand out on it."""
  rgb = np.asarray(image, np.float32)
  grey = rgb.mean(axis=-1, keepdims=True)
  return (0.55 * (0.4 * rgb + 0.6 * grey) + 0.45 * 255).astype(np.uint8)


def _one_image(assignment: Assignment, image_index: int) -> dict[str, np.ndarray]:
  """The ``[K]`` fields of one image, as NumPy arrays."""
  fields = ('level', 'anchor', 'gj', 'gi', 'gt', 'candidate', 'positive')
  return {name: np.asarray(getattr(assignment, name))[image_index] for name in fields}


def _boxes_pixels(targets: Targets, image_index: int, image_hw: tuple[int, int]) -> np.ndarray:
  """``[N, 4]`` corner boxes in pixels of the valid boxes of one image."""
  height, width = image_hw
  valid = np.asarray(targets.valid)[image_index]
  boxes = np.asarray(targets.boxes, np.float64)[image_index][valid]
  scale = np.asarray([width, height, width, height])
  cx, cy, w, h = (boxes * scale).T
  return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1)


def _draw_boxes(ax: Axes, boxes: np.ndarray, *, labels: Sequence[str] | None = None) -> None:
  """Ground-truth outlines in their box colours, with a label at the top-left corner."""
  from matplotlib.patches import Rectangle

  for m, (x1, y1, x2, y2) in enumerate(boxes):
    colour = box_colour(m)
    ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, linewidth=1.6))
    text = str(m) if labels is None else labels[m]
    ax.text(
      x1 + 1,
      y1 + 1,
      text,
      color='white',
      fontsize=7,
      va='top',
      bbox={'facecolor': colour, 'edgecolor': 'none', 'pad': 1, 'alpha': 0.9},
    )


def _draw_cells(
  ax: Axes,
  slots: dict[str, np.ndarray],
  config: LossConfig,
  *,
  max_boxes: int,
  level: int | None,
  candidates: bool,
) -> tuple[int, int]:
  """Candidate cells (dashed outline, colour of the proposing box) and positive cells
  (filled, colour of the box they are trained on) of one level, or all levels.

  Returns:
    ``(candidates, positives)``: numbers of slots (cell and anchor pairs) drawn.
  """
  from matplotlib.patches import Rectangle

  chosen = np.ones_like(slots['candidate']) if level is None else slots['level'] == level
  live = slots['candidate'] & chosen
  positive = slots['positive'] & chosen
  proposer = np.arange(live.shape[0]) % max_boxes
  if candidates:
    seen = set()
    for k in np.flatnonzero(live):
      key = (int(slots['level'][k]), int(slots['gj'][k]), int(slots['gi'][k]), int(proposer[k]))
      if key in seen:
        continue
      seen.add(key)
      stride = config.strides[key[0]]
      ax.add_patch(
        Rectangle(
          (key[2] * stride, key[1] * stride),
          stride,
          stride,
          fill=False,
          edgecolor=box_colour(key[3]),
          linewidth=0.9,
          linestyle='--',
        )
      )
  cells: dict[tuple[int, int, int, int], int] = {}
  for k in np.flatnonzero(positive):
    key = (int(slots['level'][k]), int(slots['gj'][k]), int(slots['gi'][k]), int(slots['gt'][k]))
    cells[key] = cells.get(key, 0) + 1
  for (lvl, gj, gi, box), count in cells.items():
    stride = config.strides[lvl]
    ax.add_patch(
      Rectangle(
        (gi * stride, gj * stride),
        stride,
        stride,
        facecolor=box_colour(box),
        edgecolor=box_colour(box),
        alpha=0.45,
        linewidth=1.2,
      )
    )
    if count > 1 and stride >= 16:
      ax.text(
        (gi + 0.5) * stride,
        (gj + 0.5) * stride,
        f'x{count}',
        ha='center',
        va='center',
        fontsize=6.5,
        color='black',
      )
  return int(live.sum()), int(positive.sum())


def _grid(ax: Axes, stride: int, image_hw: tuple[int, int]) -> None:
  height, width = image_hw
  ax.set_xticks(np.arange(0, width + 1, stride), minor=True)
  ax.set_yticks(np.arange(0, height + 1, stride), minor=True)
  ax.grid(which='minor', color='black', linewidth=0.3, alpha=0.25)
  ax.tick_params(which='both', length=0, labelbottom=False, labelleft=False)


def _box_legend(
  targets: Targets,
  image_index: int,
  class_names: Sequence[str] | None,
  columns: Mapping[str, np.ndarray],
) -> list[str]:
  """One line per valid box: index, class, size and the given per-box columns."""
  valid = np.asarray(targets.valid)[image_index]
  classes = np.asarray(targets.classes)[image_index]
  lines = []
  for m in np.flatnonzero(valid):
    name = str(classes[m]) if class_names is None else class_names[classes[m]]
    extra = ', '.join(f'{key} {int(value[m])}' for key, value in columns.items())
    lines.append(f'box {m} ({name}): {extra}')
  return lines


def assignment_figure(
  image: np.ndarray,
  targets: Targets,
  fine: Assignment,
  coarse: Assignment,
  config: LossConfig,
  *,
  image_index: int = 0,
  class_names: Sequence[str] | None = None,
) -> Figure:
  """Candidates and positives of both heads, level by level, over the image.

  Rows: the lead head (``assign(..., coarse=False)``) and the auxiliary head
  (``coarse=True``); columns: levels. Dashed squares are candidate cells, in
  the colour of the box that proposed them; filled squares are the cells
  SimOTA kept, in the colour of the box they are trained on (``xN``: N
  anchors of that cell). Panel titles count slots, i.e. (cell, anchor) pairs.

  Args:
    image: ``[H, W, 3]`` uint8, the network input.
    targets: the boxes (``[B, M]``).
    fine: lead-head assignment of the batch.
    coarse: auxiliary-head assignment of the batch.
    config: head geometry.
    image_index: which image of the batch ``image`` is.
    class_names: names for the legend.
  """
  import matplotlib.pyplot as plt

  image_hw = image.shape[:2]
  boxes = _boxes_pixels(targets, image_index, image_hw)
  levels = config.num_levels
  figure, axes = plt.subplots(
    2, levels, figsize=(3.1 * levels, 7.0), layout='constrained', squeeze=False
  )
  for row, ((title, _), assignment) in enumerate(zip(_HEADS, (fine, coarse), strict=True)):
    slots = _one_image(assignment, image_index)
    for level in range(levels):
      ax = axes[row, level]
      ax.imshow(_backdrop(image))
      stride = config.strides[level]
      _grid(ax, stride, image_hw)
      live, positive = _draw_cells(
        ax, slots, config, max_boxes=targets.max_boxes, level=level, candidates=True
      )
      _draw_boxes(ax, boxes)
      ax.set_title(f'level {level} (stride {stride})\n{live} candidates, {positive} positives')
    axes[row, 0].set_ylabel(title.replace(': ', ':\n'), fontsize=9)
  legend = _box_legend(
    targets,
    image_index,
    class_names,
    {
      'dynamic k lead': np.asarray(fine.dynamic_k)[image_index],
      'aux': np.asarray(coarse.dynamic_k)[image_index],
    },
  )
  figure.suptitle(
    "Both heads are assigned with the lead head's predictions. Dashed: candidates (coloured by "
    'proposing box); filled: positives after SimOTA (coloured by assigned box)\n'
    + ';  '.join(legend),
    fontsize=9,
  )
  return figure


def assignment_change_figure(
  image: np.ndarray,
  targets: Targets,
  stages: Sequence[tuple[str, Assignment, Assignment]],
  config: LossConfig,
  *,
  image_index: int = 0,
) -> Figure:
  """How the positives move as the lead head's predictions change.

  One column per stage (e.g. freshly initialised predictions, then better
  ones), one row per head; all levels are drawn together (a filled square is
  a positive cell at its level's size). Each box is labelled with its dynamic
  k in that stage.

  Args:
    image: ``[H, W, 3]`` uint8, the network input.
    targets: the boxes (``[B, M]``).
    stages: ``(name, fine, coarse)`` per column.
    config: head geometry.
    image_index: which image of the batch ``image`` is.
  """
  import matplotlib.pyplot as plt

  image_hw = image.shape[:2]
  boxes = _boxes_pixels(targets, image_index, image_hw)
  figure, axes = plt.subplots(
    2, len(stages), figsize=(3.6 * len(stages), 7.4), layout='constrained', squeeze=False
  )
  for column, (name, fine, coarse) in enumerate(stages):
    for row, ((title, _), assignment) in enumerate(zip(_HEADS, (fine, coarse), strict=True)):
      ax = axes[row, column]
      ax.imshow(_backdrop(image))
      ax.set_xticks([])
      ax.set_yticks([])
      slots = _one_image(assignment, image_index)
      _, positive = _draw_cells(
        ax, slots, config, max_boxes=targets.max_boxes, level=None, candidates=False
      )
      ks = np.asarray(assignment.dynamic_k)[image_index]
      _draw_boxes(ax, boxes, labels=[f'{m}: k={ks[m]}' for m in range(len(boxes))])
      per_level = np.bincount(slots['level'][slots['positive']], minlength=config.num_levels)
      ax.set_title(f'{name}\n{positive} positives (per level {per_level.tolist()})', fontsize=9)
      if column == 0:
        ax.set_ylabel(title.replace(': ', ':\n'), fontsize=9)
  figure.suptitle(
    "Positives (filled, all levels) and dynamic k as the lead head's predictions change",
    fontsize=10,
  )
  return figure


def gradient_figure(
  ours: Sequence[np.ndarray], reference: Sequence[np.ndarray], *, num_levels: int
) -> Figure:
  """Gradient of the loss with respect to the ``2L`` head outputs: ours against upstream's.

  Left: histogram of ``log10 |ours - reference|`` per head (entries where
  both are exactly equal are counted at the left edge). Right: ours against
  reference for the entries of largest magnitude.

  Args:
    ours: ``2L`` gradients (lead levels, then auxiliary levels).
    reference: the same from torch autograd.
    num_levels: ``L``.
  """
  import matplotlib.pyplot as plt

  figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4), layout='constrained')
  floor = -16.0
  for name, part in (('lead', slice(0, num_levels)), ('aux', slice(num_levels, None))):
    a = np.concatenate([np.ravel(x) for x in ours[part]]).astype(np.float64)
    b = np.concatenate([np.ravel(x) for x in reference[part]]).astype(np.float64)
    diff = np.abs(a - b)
    logs = np.log10(np.maximum(diff, 10.0**floor))
    left.hist(logs, bins=60, range=(floor, 0), alpha=0.6, label=f'{name} ({a.size} entries)')
    top = np.argsort(-np.abs(b))[:2000]
    right.scatter(b[top], a[top], s=4, alpha=0.6, label=name)
  left.set_yscale('log')
  left.set_xlabel(f'log10 |ours - upstream| per entry (bar at {floor:.0f}: equal)')
  left.set_ylabel('entries')
  left.legend()
  left.set_title('absolute gradient differences')
  lo, hi = right.get_xlim()
  right.plot([lo, hi], [lo, hi], color='black', linewidth=0.6)
  right.set_xlabel('upstream (torch autograd)')
  right.set_ylabel('ours (jax.grad)')
  right.set_title('2000 largest entries per head')
  right.legend()
  return figure


def loss_curves_figure(
  history: Mapping[str, Sequence[float]], *, smooth: int = 1, title: str | None = None
) -> Figure:
  """Loss parts per training step.

  Args:
    history: name (e.g. ``box``, ``obj``, ``cls``, ``total``) to one value per step.
    smooth: width of a trailing moving average drawn over the raw values (1: none).
    title: figure title.
  """
  import matplotlib.pyplot as plt

  names = list(history)
  figure, axes = plt.subplots(
    1, len(names), figsize=(3.2 * len(names), 3.0), layout='constrained', squeeze=False
  )
  for ax, name in zip(axes[0], names, strict=True):
    values = np.asarray(history[name], np.float64)
    steps = np.arange(values.size)
    ax.plot(steps, values, linewidth=0.8, alpha=0.5 if smooth > 1 else 1.0)
    if smooth > 1 and values.size >= smooth:
      kernel = np.ones(smooth) / smooth
      ax.plot(steps[smooth - 1 :], np.convolve(values, kernel, mode='valid'), linewidth=1.6)
    ax.set_title(name)
    ax.set_xlabel('step')
  if title:
    figure.suptitle(title)
  return figure


def detections_figure(
  images: np.ndarray,
  detections: Any,
  labels: Sequence[np.ndarray],
  *,
  class_names: Sequence[str],
  max_shown: int = 10,
) -> Figure:
  """Predictions (solid, with class and score) against ground truth (dashed, white).

  Args:
    images: ``[B, H, W, 3]`` uint8.
    detections: :class:`reorg_jax.models.inference.Detections` of the batch (``[B, D]``).
    labels: per image, ``[N, 5]`` rows ``(class, cx, cy, w, h)`` normalised to the image.
    class_names: ``C`` names.
    max_shown: draw at most this many detections per image (best first).
  """
  import matplotlib.pyplot as plt
  from matplotlib.patches import Rectangle

  count = len(images)
  figure, axes = plt.subplots(
    1, count, figsize=(3.0 * count, 3.3), layout='constrained', squeeze=False
  )
  boxes = np.asarray(detections.boxes)
  scores = np.asarray(detections.scores)
  classes = np.asarray(detections.classes)
  valid = np.asarray(detections.valid)
  for b, ax in enumerate(axes[0]):
    height, width = images[b].shape[:2]
    ax.imshow(images[b])
    ax.set_xticks([])
    ax.set_yticks([])
    for row in np.asarray(labels[b]).reshape(-1, 5):
      cx, cy, w, h = row[1:] * np.asarray([width, height, width, height])
      ax.add_patch(
        Rectangle(
          (cx - w / 2, cy - h / 2), w, h, fill=False, edgecolor='white', linestyle='--', linewidth=1
        )
      )
    shown = np.flatnonzero(valid[b])[:max_shown]
    for d in shown:
      x1, y1, x2, y2 = boxes[b, d]
      colour = box_colour(int(classes[b, d]))
      ax.add_patch(
        Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, linewidth=1.4)
      )
      ax.text(
        x1,
        y1,
        f'{class_names[classes[b, d]]} {scores[b, d]:.2f}',
        fontsize=6.5,
        color='white',
        va='bottom',
        bbox={'facecolor': colour, 'edgecolor': 'none', 'pad': 0.8, 'alpha': 0.85},
      )
    ax.set_title(f'{int(valid[b].sum())} detections, {len(labels[b])} boxes', fontsize=9)
  return figure
