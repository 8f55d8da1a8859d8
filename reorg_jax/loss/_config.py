"""Static description of the detection head and the loss hyper-parameters.

Glossary: ``L`` levels, ``A`` anchors per level.

:class:`LossConfig` is a frozen, hashable dataclass so that it can be passed
to ``jax.jit`` as a static argument. Hyper-parameter defaults are those of
upstream's ``data/hyp.scratch.p6.yaml`` and live here only; the per-layer and
per-image-size scaling of the ``box``/``obj``/``cls`` gains that upstream's
training script applies is the trainer's business, not the loss's.
"""

from __future__ import annotations

import dataclasses

# YOLOv7-W6/E6/D6/E6E anchors in pixels, (w, h) per anchor, one row per level.
P6_ANCHORS: tuple[tuple[tuple[float, float], ...], ...] = (
  ((19, 27), (44, 40), (38, 94)),
  ((96, 68), (86, 152), (180, 137)),
  ((140, 301), (303, 264), (238, 542)),
  ((436, 615), (739, 380), (925, 792)),
)
P6_STRIDES: tuple[int, ...] = (8, 16, 32, 64)


def upstream_balance(num_levels: int) -> tuple[float, ...]:
  """Upstream's per-level objectness weights for ``num_levels`` levels."""
  if num_levels == 3:
    return (4.0, 1.0, 0.4)
  table = (4.0, 1.0, 0.25, 0.06, 0.02)
  if num_levels > len(table):
    raise ValueError(f'upstream defines objectness balance for at most 5 levels, got {num_levels}')
  return table[:num_levels]


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Head geometry and hyper-parameters of the lead-guided auxiliary OTA loss.

  Attributes:
    num_classes: ``C``.
    anchors: ``L`` rows of ``A`` anchor ``(w, h)`` pairs, in pixels.
    strides: ``L`` level strides in pixels.
    balance: ``L`` objectness weights per level.
    anchor_t: an (anchor, box) pair is a candidate when neither side ratio
      exceeds this.
    box: box (CIoU) loss gain.
    obj: objectness loss gain.
    cls: classification loss gain.
    cls_pw: positive weight of the class BCE.
    obj_pw: positive weight of the objectness BCE.
    label_smoothing: class targets become ``1 - eps/2`` and ``eps/2``.
    gr: objectness target is ``(1 - gr) + gr * clamp(CIoU, 0)``.
    aux_weight: weight of the auxiliary head's three terms.
    iou_cost_weight: SimOTA cost is ``class BCE + iou_cost_weight * -log(IoU)``.
    dynamic_k_candidates: dynamic k of a box is the integer part of the sum of
      its this-many best IoUs (at least 1); also the static bound on k.
    capacity_fractions: the loss packs each image's live candidate slots into
      the smallest of these fractions of all ``K`` slots that holds the batch's
      fullest image (``K`` itself when none does); a speed setting only, the
      result does not depend on it.
    batch_groups: the batch is split into this many contiguous image groups
      (at most ``B``), each packed and assigned on its own capacity. Groups are
      independent, so XLA can run them in parallel; on a CPU, where each
      capacity branch runs on one core, about the core count is fastest. A
      speed setting only: the result does not depend on it.
  """

  num_classes: int
  anchors: tuple[tuple[tuple[float, float], ...], ...]
  strides: tuple[int, ...]
  balance: tuple[float, ...]
  anchor_t: float = 4.0
  box: float = 0.05
  obj: float = 0.7
  cls: float = 0.3
  cls_pw: float = 1.0
  obj_pw: float = 1.0
  label_smoothing: float = 0.0
  gr: float = 1.0
  aux_weight: float = 0.25
  iou_cost_weight: float = 3.0
  dynamic_k_candidates: int = 20
  capacity_fractions: tuple[float, ...] = (0.0625, 0.125, 0.1875, 0.3125, 0.5)
  batch_groups: int = 2

  def __post_init__(self):
    if self.num_classes < 1:
      raise ValueError(f'num_classes must be >= 1, got {self.num_classes}')
    levels = len(self.strides)
    if levels == 0:
      raise ValueError('strides must name at least one level')
    if len(self.anchors) != levels or len(self.balance) != levels:
      raise ValueError(
        f'anchors ({len(self.anchors)} rows), strides ({levels}) and balance '
        f'({len(self.balance)}) must all have one entry per level'
      )
    counts = {len(row) for row in self.anchors}
    if len(counts) != 1 or 0 in counts:
      raise ValueError(f'every level needs the same, non-zero number of anchors, got {counts}')
    if any(len(pair) != 2 or min(pair) <= 0 for row in self.anchors for pair in row):
      raise ValueError(f'anchors must be positive (w, h) pairs, got {self.anchors}')
    if not all(0 < f < 1 for f in self.capacity_fractions):
      raise ValueError(f'capacity_fractions must lie in (0, 1), got {self.capacity_fractions}')
    if self.batch_groups < 1:
      raise ValueError(f'batch_groups must be >= 1, got {self.batch_groups}')
    if self.dynamic_k_candidates < 1:
      raise ValueError(f'dynamic_k_candidates must be >= 1, got {self.dynamic_k_candidates}')
    if not self.anchor_t > 1:
      raise ValueError(f'anchor_t is a side ratio and must be > 1, got {self.anchor_t}')
    for name in ('box', 'obj', 'cls', 'aux_weight', 'iou_cost_weight'):
      if not getattr(self, name) >= 0:
        raise ValueError(f'{name} is a loss weight and must be >= 0, got {getattr(self, name)}')
    for name in ('cls_pw', 'obj_pw'):
      if not getattr(self, name) > 0:
        raise ValueError(
          f'{name} is a BCE positive weight and must be > 0, got {getattr(self, name)}'
        )
    for name in ('label_smoothing', 'gr'):
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise ValueError(f'{name} must lie in [0, 1], got {getattr(self, name)}')

  @property
  def num_levels(self) -> int:
    """``L``."""
    return len(self.strides)

  @property
  def num_anchors(self) -> int:
    """``A``."""
    return len(self.anchors[0])

  @classmethod
  def p6(cls, num_classes: int, **overrides) -> LossConfig:
    """W6/E6/D6/E6E head (4 levels, strides 8..64, 3 anchors) with ``hyp.scratch.p6`` values."""
    fields = {'anchors': P6_ANCHORS, 'strides': P6_STRIDES, 'balance': upstream_balance(4)}
    fields.update(overrides)
    return cls(num_classes=num_classes, **fields)
