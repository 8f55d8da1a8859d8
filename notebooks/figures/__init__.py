"""Figures that explain ReOrg, the lead-guided assigner, parity and training.

Glossary (the package's, see the README): ``B`` batch, ``L`` levels, ``A``
anchors per level, ``M`` max boxes per image, ``K = L * 5 * A * M`` candidate
slots per image, ``H``/``W`` image height/width in pixels.

Used by the notebooks next to this folder and by ``notebooks/make_figures.py``,
which writes the README's pictures; it is not part of the installed library.
Both import it as ``figures`` with ``notebooks/`` on the path (the notebooks
run there, and a script's own folder comes first on its path). Every function
only draws what the library computed and returns a
``matplotlib.figure.Figure``; matplotlib is imported inside the functions.

Modules by topic: :mod:`figures.common` (colours, PNG writing, box
outlines), :mod:`figures.reorg`, :mod:`figures.assignment`,
:mod:`figures.parity` and :mod:`figures.training` (loss curves through the
training program's report, detections).
"""

from figures.assignment import assignment_change_figure, assignment_figure, slot_layout
from figures.common import box_colour, save_png
from figures.parity import gradient_figure
from figures.reorg import (
  REORG_SLOTS,
  channel_order_figure,
  reorg_figure,
  reorg_slot,
  space_to_depth,
)
from figures.training import detections_figure, loss_curves_figure

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
  'reorg_slot',
  'save_png',
  'slot_layout',
  'space_to_depth',
]
