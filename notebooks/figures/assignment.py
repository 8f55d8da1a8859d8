"""Candidates and positives of the lead and the auxiliary head, drawn over the image.

Glossary (the package's, see the README): ``B`` batch, ``L`` levels, ``A``
anchors per level, ``M`` max boxes per image, ``K = L * 5 * A * M`` candidate
slots per image, ``N`` label rows (boxes) of the drawn image, ``H``/``W`` image
height/width in pixels.

Which box proposed a slot, and the level and stride a slot sits on, come from
the loss's :class:`~reorg_jax.loss._slots.SlotLayout` (:func:`slot_layout`);
the cells and the boxes trained on come from the :class:`reorg_jax.Assignment`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from figures.common import backdrop, box_colour, draw_boxes, target_boxes
from reorg_jax.loss import Assignment, LossConfig
from reorg_jax.loss._slots import SlotLayout
from reorg_jax.targets import Targets

if TYPE_CHECKING:
  from matplotlib.axes import Axes
  from matplotlib.figure import Figure

__all__ = ['assignment_change_figure', 'assignment_figure', 'slot_layout']

_HEADS = (
  ('lead head, fine: centre + 2 neighbours (g = 0.5)', 'fine'),
  ('aux head, coarse: centre + 4 neighbours (g = 1.0)', 'coarse'),
)


def slot_layout(config: LossConfig, image_hw: tuple[int, int], *, max_boxes: int) -> SlotLayout:
  """The slot layout of an assignment of ``image_hw`` inputs with ``max_boxes`` boxes per image.

  ``layout.box[k]`` is the box that proposed slot ``k``, ``layout.level[k]``
  its level, ``layout.stride[k]`` that level's stride.
  """
  height, width = image_hw
  grids = tuple((height // stride, width // stride) for stride in config.strides)
  return SlotLayout(config, grids, max_boxes)


def _one_image(assignment: Assignment, image_index: int) -> dict[str, np.ndarray]:
  """The ``[K]`` fields of one image, as NumPy arrays."""
  fields = ('gj', 'gi', 'gt', 'candidate', 'positive')
  return {name: np.asarray(getattr(assignment, name))[image_index] for name in fields}


def _draw_cells(
  ax: Axes,
  slots: dict[str, np.ndarray],
  layout: SlotLayout,
  *,
  level: int | None,
  candidates: bool,
) -> tuple[int, int]:
  """Candidate cells (dashed outline, colour of the proposing box) and positive cells
  (filled, colour of the box they are trained on) of one level, or all levels.

  Returns:
    ``(candidates, positives)``: numbers of slots (cell and anchor pairs) drawn.
  """
  from matplotlib.patches import Rectangle

  chosen = np.ones_like(slots['candidate']) if level is None else layout.level == level
  live = slots['candidate'] & chosen
  positive = slots['positive'] & chosen
  if candidates:
    seen = set()
    for k in np.flatnonzero(live):
      key = (int(layout.level[k]), int(slots['gj'][k]), int(slots['gi'][k]), int(layout.box[k]))
      if key in seen:
        continue
      seen.add(key)
      stride = float(layout.stride[k])
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
  cells: dict[tuple[int, int, int, int], list[int]] = {}
  for k in np.flatnonzero(positive):
    key = (int(layout.level[k]), int(slots['gj'][k]), int(slots['gi'][k]), int(slots['gt'][k]))
    cells.setdefault(key, []).append(k)
  for (_, gj, gi, box), ks in cells.items():
    stride = float(layout.stride[ks[0]])
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
    if len(ks) > 1 and stride >= 16:
      ax.text(
        (gi + 0.5) * stride,
        (gj + 0.5) * stride,
        f'x{len(ks)}',
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
  layout = slot_layout(config, image_hw, max_boxes=targets.max_boxes)
  boxes = target_boxes(targets, image_index, image_hw)
  levels = config.num_levels
  figure, axes = plt.subplots(
    2, levels, figsize=(3.1 * levels, 7.0), layout='constrained', squeeze=False
  )
  for row, ((title, _), assignment) in enumerate(zip(_HEADS, (fine, coarse), strict=True)):
    slots = _one_image(assignment, image_index)
    for level in range(levels):
      ax = axes[row, level]
      ax.imshow(backdrop(image))
      stride = config.strides[level]
      _grid(ax, stride, image_hw)
      live, positive = _draw_cells(ax, slots, layout, level=level, candidates=True)
      draw_boxes(ax, boxes)
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
  layout = slot_layout(config, image_hw, max_boxes=targets.max_boxes)
  boxes = target_boxes(targets, image_index, image_hw)
  figure, axes = plt.subplots(
    2, len(stages), figsize=(3.6 * len(stages), 7.4), layout='constrained', squeeze=False
  )
  for column, (name, fine, coarse) in enumerate(stages):
    for row, ((title, _), assignment) in enumerate(zip(_HEADS, (fine, coarse), strict=True)):
      ax = axes[row, column]
      ax.imshow(backdrop(image))
      ax.set_xticks([])
      ax.set_yticks([])
      slots = _one_image(assignment, image_index)
      _, positive = _draw_cells(ax, slots, layout, level=None, candidates=False)
      ks = np.asarray(assignment.dynamic_k)[image_index]
      draw_boxes(ax, boxes, labels=[f'{m}: k={ks[m]}' for m in range(len(boxes))])
      per_level = np.bincount(layout.level[slots['positive']], minlength=config.num_levels)
      ax.set_title(f'{name}\n{positive} positives (per level {per_level.tolist()})', fontsize=9)
      if column == 0:
        ax.set_ylabel(title.replace(': ', ':\n'), fontsize=9)
  figure.suptitle(
    "Positives (filled, all levels) and dynamic k as the lead head's predictions change",
    fontsize=10,
  )
  return figure
