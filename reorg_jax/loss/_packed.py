"""Both heads' assignment on packed candidate lists, sized to the batch at run time.

Glossary: ``B`` batch, ``L`` levels, ``A`` anchors per level, ``M`` max boxes,
``K = L * 5 * A * M`` candidate slots per image, ``N`` packed capacity
(``N <= K``), ``C`` classes, ``F = 5 + C``.

:func:`reorg_jax.loss._assign.assign` scores every box against all ``K`` slots of
its image, live or not. Most slots are dead (an anchor whose shape does not fit
the box, an offset that does not apply): on COCO-like boxes only 10-20% are
live. The loss therefore

1. finds the live slots of both heads in the ``[B, K]`` layout
   (:func:`head_slots`). A fine slot always lies on the cell of a coarse slot
   of the same box, anchor and level (itself, or the centre when the box
   centre sits exactly on a cell corner), so the lead predictions are read and
   scored once, on the coarse slots, and the fine head reuses those scores;
2. packs each head's live slots, in slot order, into ``N`` places
   (:func:`pack`). Order is what upstream's tie-breaks and objectness writes
   depend on, and packing keeps it;
3. runs SimOTA (:func:`reorg_jax.loss._assign.simota`) on ``[B, M, N]``.

``N`` is static, so it is picked at run time from a ladder of capacities
(``LossConfig.capacity_fractions`` of ``K``, then ``K``) with ``lax.switch``:
the smallest one that holds the fullest image of the batch. Nothing is ever
dropped: a batch that fills every image's ``K`` slots runs the ``K`` branch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp

from reorg_jax.loss import _assign
from reorg_jax.loss._config import LossConfig
from reorg_jax.loss._slots import SlotLayout, take_rows
from reorg_jax.targets import Targets


@flax.struct.dataclass
class HeadSlots:
  """Live slots of both heads in the ``[B, K]`` slot layout.

  Attributes:
    gj, gi: ``[B, K]`` int32 coarse cells (0 where dead).
    live: ``[B, K]`` the slot is a coarse (auxiliary-head) candidate.
    fine_live: ``[B, K]`` the slot is a fine (lead-head) candidate.
    fine_source: ``[B, K]`` int32 coarse slot on the fine slot's cell: the slot
      itself, or the centre slot of the same box, anchor and level.
  """

  gj: jax.Array
  gi: jax.Array
  live: jax.Array
  fine_live: jax.Array
  fine_source: jax.Array


def head_slots(targets: Targets, layout: SlotLayout) -> HeadSlots:
  """Candidates of both heads (upstream's ``find_5_positive`` and ``find_3_positive``).

  Fine cells are ``floor(xy -/+ 0.5)``, coarse ones ``floor(xy -/+ 1)``; the
  two agree wherever the fine offset applies, except that on an integer
  coordinate the fine right/down neighbour is the centre cell.
  """
  gj, gi, live = _assign.find_candidates(targets, layout, coarse=True)
  fine_gj, fine_gi, fine_live = _assign.find_candidates(targets, layout, coarse=False)
  slot = jnp.arange(layout.num_slots, dtype=jnp.int32)
  same = (fine_gj == gj) & (fine_gi == gi)
  source = jnp.where(same, slot, jnp.asarray(layout.centre_slot)[None, :])
  return HeadSlots(gj=gj, gi=gi, live=live, fine_live=fine_live, fine_source=source)


def capacities(num_slots: int, config: LossConfig) -> tuple[int, ...]:
  """Ascending static capacities: ``capacity_fractions`` of ``K`` (multiples of 8), then ``K``."""
  sizes = {min(num_slots, 8 * math.ceil(num_slots * f / 8)) for f in config.capacity_fractions}
  return tuple(sorted(sizes | {num_slots}))


def capacity_index(live: jax.Array, ladder: Sequence[int]) -> jax.Array:
  """Index into ``ladder`` of the smallest capacity holding every image's ``[B, K]`` live slots."""
  fullest = jnp.max(jnp.sum(live, axis=1))
  return jnp.sum(fullest > jnp.asarray(ladder[:-1])).astype(jnp.int32)


def pack(live: jax.Array, capacity: int) -> tuple[jax.Array, jax.Array]:
  """Live slots of each image, in slot order, in ``capacity`` places.

  Args:
    live: ``[B, K]`` mask.
    capacity: ``N``; live slots past it are not kept, so callers pick ``N``
      with :func:`capacity_index`.

  Returns:
    ``slot`` (``[B, N]`` int32 slot index, 0 in empty places) and ``filled``
    (``[B, N]``).
  """
  batch, num_slots = live.shape
  place = jnp.cumsum(live, axis=1, dtype=jnp.int32) - 1  # [B, K]
  place = jnp.where(live, place, capacity)
  rows = jnp.arange(batch)[:, None]
  slot = jnp.zeros((batch, capacity), jnp.int32)
  slot = slot.at[rows, place].set(jnp.arange(num_slots, dtype=jnp.int32), mode='drop')
  filled = jnp.arange(capacity)[None, :] < jnp.sum(live, axis=1, keepdims=True)
  return slot, filled


@flax.struct.dataclass
class PackedAssignment:
  """One head's assignment on ``N`` packed slots.

  Attributes:
    slot: ``[B, N]`` slot index in the ``[B, K]`` layout (its level, anchor
      and box follow from the :class:`~reorg_jax.loss._slots.SlotLayout`).
    source: ``[B, N]`` coarse slot on the same cell (``slot`` itself for the
      auxiliary head).
    place: ``[B, N]`` position of ``source`` in the packed coarse list.
    filled: ``[B, N]`` the place holds a candidate.
    positive: ``[B, N]`` the slot survived SimOTA.
    gt: ``[B, N]`` box index of each positive, 0 elsewhere.
    dynamic_k: ``[B, M]``.
  """

  slot: jax.Array
  source: jax.Array
  place: jax.Array
  filled: jax.Array
  positive: jax.Array
  gt: jax.Array
  dynamic_k: jax.Array

  def scatter(self, num_slots: int) -> tuple[jax.Array, jax.Array]:
    """``positive`` and ``gt`` back in the ``[B, K]`` layout of :func:`reorg_jax.assign`."""
    rows = jnp.arange(self.slot.shape[0])[:, None]
    where = jnp.where(self.filled, self.slot, num_slots)
    positive = jnp.zeros((self.slot.shape[0], num_slots), bool)
    positive = positive.at[rows, where].set(self.positive, mode='drop')
    gt = jnp.zeros((self.slot.shape[0], num_slots), jnp.int32)
    gt = gt.at[rows, where].set(self.gt, mode='drop')
    return positive, gt


def rows_at(
  outputs: Sequence[jax.Array], slot: jax.Array, slots: HeadSlots, layout: SlotLayout
) -> jax.Array:
  """``[B, N, F]`` rows of ``L`` head outputs ``[B, A, H_l, W_l, F]`` at the cells of ``[B, N]`` slots.

  Args:
    outputs: one head's ``L`` outputs.
    slot: slot indices in the ``[B, K]`` layout; their coarse cells are read.
    slots: candidate cells.
    layout: the slots.
  """
  row = layout.cell_row(slot, take_rows(slots.gj, slot), take_rows(slots.gi, slot))  # [B, N]
  # XLA fuses the concatenation into the gather, so no output is copied.
  table = jnp.concatenate([out.reshape(out.shape[0], -1, out.shape[-1]) for out in outputs], axis=1)
  return jnp.take_along_axis(table, row[..., None], axis=1, mode='promise_in_bounds')


def assign_packed(
  lead_preds: jax.Array,
  slot: jax.Array,
  filled: jax.Array,
  slots: HeadSlots,
  targets: Targets,
  image_hw: tuple[int, int],
  layout: SlotLayout,
) -> tuple[PackedAssignment, PackedAssignment]:
  """Fine and coarse SimOTA on packed slots, equal to :func:`reorg_jax.assign`.

  Args:
    lead_preds: ``[B, N, F]`` lead-head outputs at the packed coarse slots
      (:func:`rows_at`); read without gradient.
    slot, filled: ``[B, N]`` packed coarse slots (:func:`pack` of
      ``slots.live``), ``N`` at least the largest live count of the batch.
    slots: from :func:`head_slots`.
    targets: ``[B, M, ...]`` boxes.
    image_hw: ``(H, W)`` network input in pixels.
    layout: the slots; its ``config`` gives the cost weights.

  Returns:
    ``(fine, coarse)`` assignments, both ``[B, N]``.
  """
  config = layout.config
  preds = jax.lax.stop_gradient(lead_preds).astype(jnp.float32)
  targets = jax.lax.stop_gradient(targets)
  capacity = slot.shape[1]
  pred_xyxy = _assign.decode_pixels(
    preds, slot, take_rows(slots.gj, slot), take_rows(slots.gi, slot), layout
  )
  total = _assign.class_total(preds)
  class_logit = _assign.class_logits_at(preds, targets.classes)
  iou, cost = _assign.pair_scores(pred_xyxy, total, class_logit, filled, targets, image_hw, config)
  positive, gt, dynamic_k = _assign.simota(iou, cost, filled, targets.valid, config)
  coarse = PackedAssignment(
    slot=slot,
    source=slot,
    place=jnp.broadcast_to(jnp.arange(capacity, dtype=jnp.int32), slot.shape),
    filled=filled,
    positive=positive,
    gt=gt,
    dynamic_k=dynamic_k,
  )

  fine_slot, fine_filled = pack(slots.fine_live, capacity)
  fine_source = take_rows(slots.fine_source, fine_slot)
  coarse_place = jnp.cumsum(slots.live, axis=1, dtype=jnp.int32) - 1  # [B, K]
  place = jnp.where(fine_filled, take_rows(coarse_place, fine_source), 0)  # [B, N]
  pair = targets.valid[:, :, None] & fine_filled[:, None, :]  # [B, M, N]
  fine_iou = jnp.where(pair, jnp.take_along_axis(iou, place[:, None, :], axis=2), 0.0)
  fine_cost = jnp.where(pair, jnp.take_along_axis(cost, place[:, None, :], axis=2), jnp.inf)
  positive, gt, dynamic_k = _assign.simota(fine_iou, fine_cost, fine_filled, targets.valid, config)
  fine = PackedAssignment(
    slot=fine_slot,
    source=fine_source,
    place=place,
    filled=fine_filled,
    positive=positive,
    gt=gt,
    dynamic_k=dynamic_k,
  )
  return fine, coarse
