"""Loss curves of a training run and its detections on validation images.

Glossary (the package's, see the README): ``B`` batch, ``D`` detections kept
per image, ``N`` label rows of an image, ``C`` classes, ``H``/``W`` image
height/width in pixels.

The curves are the training program's own (``reorg_jax.program.report.curves_figure``,
which also draws a run's ``losses.png``), fed per step instead of per epoch.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

from figures.common import box_colour
from reorg_jax import boxes as box_lib
from reorg_jax.models.inference import Detections

if TYPE_CHECKING:
  from matplotlib.figure import Figure

__all__ = ['detections_figure', 'loss_curves_figure']


def _report() -> ModuleType:
  """:mod:`reorg_jax.program.report` (the training program's plots)."""
  return importlib.import_module('reorg_jax.program.report')


def loss_curves_figure(
  history: Mapping[str, Sequence[float]], *, smooth: int = 1, title: str | None = None
) -> Figure:
  """Loss parts per training step, one panel each.

  Args:
    history: name (e.g. ``box``, ``obj``, ``cls``, ``total``) to one value per step.
    smooth: width of a trailing moving average drawn over the raw values (1: none).
    title: figure title.
  """
  names = tuple(history)
  steps = len(history[names[0]]) if names else 0
  rows = [{'step': float(i), **{n: float(history[n][i]) for n in names}} for i in range(steps)]
  return _report().curves_figure(rows, columns=names, x='step', title=title, smooth=smooth)


def detections_figure(
  images: np.ndarray,
  detections: Detections,
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
  boxes = box_lib.xyxy_to_xywh(np.asarray(detections.boxes), xp=np)
  scores = np.asarray(detections.scores)
  classes = np.asarray(detections.classes)
  valid = np.asarray(detections.valid)
  for b, ax in enumerate(axes[0]):
    height, width = images[b].shape[:2]
    ax.imshow(images[b])
    ax.set_xticks([])
    ax.set_yticks([])
    truth = np.asarray(labels[b]).reshape(-1, 5)[:, 1:]
    truth = box_lib.normalized_cxcywh_to_pixel_xywh(truth, width=width, height=height, xp=np)
    for x, y, w, h in truth:
      ax.add_patch(
        Rectangle((x, y), w, h, fill=False, edgecolor='white', linestyle='--', linewidth=1)
      )
    shown = np.flatnonzero(valid[b])[:max_shown]
    for d in shown:
      x, y, w, h = boxes[b, d]
      colour = box_colour(int(classes[b, d]))
      ax.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor=colour, linewidth=1.4))
      ax.text(
        x,
        y,
        f'{class_names[classes[b, d]]} {scores[b, d]:.2f}',
        fontsize=6.5,
        color='white',
        va='bottom',
        bbox={'facecolor': colour, 'edgecolor': 'none', 'pad': 0.8, 'alpha': 0.85},
      )
    ax.set_title(f'{int(valid[b].sum())} detections, {len(labels[b])} boxes', fontsize=9)
  return figure
