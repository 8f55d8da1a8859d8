"""YOLOv7's auxiliary-head OTA loss (``ComputeLossAuxOTA``) on fixed shapes.

Glossary: ``B`` batch, ``L`` levels, ``A`` anchors per level, ``M`` max boxes,
``K`` candidate slots per image (``K = L * 5 * A * M``, ``S = K / L`` per
level), ``N`` packed places (:mod:`reorg_jax.loss._packed`), ``C`` classes,
``F = 5 + C``, ``H_l``/``W_l`` the grid of level ``l``.

The objective has two heads. Both are trained on targets chosen with the
*lead* head's predictions: the lead head on the fine assignment (centre cell
plus the two nearest neighbours), the auxiliary head on the coarse one
(centre plus four neighbours), each filtered by SimOTA
(:func:`reorg_jax.loss._assign.assign`). Per level ``l`` and head:

* box: mean over positives of ``1 - CIoU(pred, box)`` in grid units;
* objectness: BCE of every cell's objectness logit against
  ``(1 - gr) + gr * clamp(CIoU, 0)`` at positives (no gradient through the
  target) and 0 elsewhere, mean over the grid, times ``balance[l]``;
* class: BCE against the (smoothed) one-hot class, mean over positives and
  classes; skipped when ``C == 1``.

The auxiliary head's three terms enter with weight ``aux_weight`` (0.25).
Sums over levels are multiplied by the ``box``/``obj``/``cls`` gains and the
total by the batch size, as upstream does.

How it is computed: the batch is cut into ``LossConfig.batch_groups`` image
groups; in each, the assignment runs on packed live slots
(:mod:`reorg_jax.loss._packed`), and so do the box and class terms, summed per
level. The per-level means are taken over the whole batch. The objectness
BCE is split as ``BCE(x, t) = softplus(x) + t * ((pw - 1) * softplus(-x) - x)``:
a dense sum of ``softplus`` over every cell, plus a correction at the
positives, so no dense target grid is built (:mod:`reorg_jax.loss._bce`).

The gradient (a custom VJP, equal to autodiff of the forward) writes each head
output once: ``sigmoid`` of the objectness everywhere, then, at the cells of
the entries, their box and objectness derivatives (taken by autodiff inside
the groups, kept per entry in the ``[B, K]`` slot layout) and their class
derivative, computed there from the class logits, the positive flag and the
class (:func:`reorg_jax.loss._bce.class_gradient`). No ``[B, K, F]`` array is
kept between the passes.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from reorg_jax import boxes as box_lib
from reorg_jax.loss import _assign, _bce, _packed
from reorg_jax.loss._config import LossConfig
from reorg_jax.loss._slots import SlotLayout, take_rows
from reorg_jax.targets import Targets


def _level_sums(values: jax.Array, level: jax.Array, num_levels: int) -> jax.Array:
  """``[L]`` sums of ``[B, N]`` values by the ``[B, N]`` level of their slot."""
  one_hot = level[..., None] == jnp.arange(num_levels)  # [B, N, L]
  return jnp.sum(jnp.where(one_hot, values[..., None], 0.0), axis=(0, 1))


def _entry_terms(
  preds: jax.Array,
  packed: _packed.PackedAssignment,
  slots: _packed.HeadSlots,
  targets: Targets,
  layout: SlotLayout,
) -> dict[str, jax.Array]:
  """Per-level sums of one head's box and objectness terms at its packed positives.

  Args:
    preds: ``[B, N, 5]`` the head's box and objectness logits at the cell of
      each entry (``take_rows(rows[..., :5], packed.place)``).
    packed: the head's ``[B, N]`` assignment.
    slots: candidate cells.
    targets: ``[B, M, ...]`` boxes.
    layout: the slots; its ``config`` gives the hyper-parameters.

  Returns:
    ``[L]`` arrays: ``box`` (sum of ``1 - CIoU``), ``positives`` and ``obj``
    (the objectness correction summed over the cells that positives write).
  """
  config = layout.config
  levels = config.num_levels
  level = jnp.asarray(layout.level)[packed.slot]  # [B, N]
  gj, gi = take_rows(slots.gj, packed.source), take_rows(slots.gi, packed.source)
  positive = packed.positive & packed.filled

  gain = jnp.asarray(layout.grid_wh)[packed.slot]  # [B, N, 2]
  true = take_rows(targets.boxes, packed.gt).astype(jnp.float32)  # [B, N, 4]
  cell = jnp.stack([gi, gj], axis=-1).astype(jnp.float32)
  true = jnp.concatenate([true[..., :2] * gain - cell, true[..., 2:] * gain], axis=-1)
  ciou = box_lib.ciou_cxcywh(layout.decode(preds, packed.slot), true)  # [B, N]
  terms = {
    'box': _level_sums(jnp.where(positive, 1.0 - ciou, 0.0), level, levels),
    'positives': _level_sums(positive.astype(jnp.float32), level, levels),
  }

  # Several positives can write the same cell (two boxes proposing one cell and
  # anchor). Upstream's indexed write leaves the order unspecified; on CPU the
  # last write wins. Here the rule is explicit: the last positive in slot order.
  batch, places = positive.shape
  num_cells = layout.num_cells
  flat_cell = layout.cell_row(packed.slot, gj, gi)  # [B, N]
  order = jnp.where(positive, jnp.arange(places), -1)
  rows = jnp.arange(batch)[:, None]
  last = jnp.full((batch, num_cells + 1), -1, jnp.int32)
  last = last.at[rows, jnp.where(positive, flat_cell, num_cells)].max(order)
  writes = positive & (last[rows, flat_cell] == order)
  value = (1.0 - config.gr) + config.gr * jnp.clip(jax.lax.stop_gradient(ciou), 0)
  logit = preds[..., 4]
  correction = value * ((config.obj_pw - 1.0) * _bce.softplus(-logit) - logit)
  terms['obj'] = _level_sums(jnp.where(writes, correction, 0.0), level, levels)
  return terms


def _class_terms(
  rows: jax.Array, packed: _packed.PackedAssignment, targets: Targets, layout: SlotLayout
) -> jax.Array:
  """``[L]`` sums of one head's class BCE over its packed positives and the classes.

  Zero when ``C == 1`` (upstream has no class term then).

  Args:
    rows: ``[B, N, F]`` the head's outputs at the packed coarse places.
    packed: the head's ``[B, N]`` assignment; ``packed.place`` is the row of
      each entry.
    targets: ``[B, M, ...]`` boxes.
    layout: the slots; its ``config`` gives the hyper-parameters.
  """
  config = layout.config
  levels = config.num_levels
  if config.num_classes == 1:
    return jnp.zeros((levels,), jnp.float32)
  level = jnp.asarray(layout.level)[packed.slot]  # [B, N]
  positive = packed.positive & packed.filled
  true_class = take_rows(targets.classes, packed.gt)
  bce = _bce.class_sums(rows, packed.place, true_class, config)
  return _level_sums(jnp.where(positive, bce, 0.0), level, levels)


_TERMS = ('box', 'positives', 'cls', 'obj')


class EntryGradients(NamedTuple):
  """One head's positives and their box and objectness gradient, in the ``[B, K]`` slot layout.

  Each entry (a candidate of the head) sits at its own slot ``k``; its cell is
  the coarse cell of ``k`` for the auxiliary head and of ``fine_source[k]``
  for the lead head.

  Attributes:
    box_obj: ``[B, K, 5]`` derivative of the head's ``sum(box) + sum(obj)``
      (per-level sums, unweighted) by the entry's box and objectness logits.
    positive: ``[B, K]`` the entry survived SimOTA.
    true_class: ``[B, K]`` int32 class of its box (0 where not positive).
  """

  box_obj: jax.Array
  positive: jax.Array
  true_class: jax.Array


def _group_heads(outputs, slots, targets, layout, image_hw, *, images: slice, capacity: int):
  """Both heads of one image group on ``N = capacity`` packed slots.

  Args:
    outputs: the ``2L`` head outputs of the whole batch.
    slots, targets: candidates and boxes of the whole batch.
    layout, image_hw: as in :func:`aux_ota_loss`.
    images: static batch slice of the group (``G`` images); the group is cut
      out here, inside the caller's branch, so no output is copied.
    capacity: ``N``, at least the group's largest live slot count.

  Returns:
    ``(heads, slots, targets)``: ``heads`` holds, lead then auxiliary, the
    ``[G, N, F]`` rows at the packed coarse places and the head's
    ``[G, N]`` :class:`~reorg_jax.loss._packed.PackedAssignment` (both heads
    read their rows at the coarse places: the lead head's entries point into
    them through ``place``); ``slots`` and ``targets`` are the group's.
  """
  levels = layout.config.num_levels
  outputs = [out[images] for out in outputs]
  slots = jax.tree.map(lambda x: x[images], slots)
  targets = jax.tree.map(lambda x: x[images], targets)
  lead, aux = outputs[:levels], outputs[levels:]
  slot, filled = _packed.pack(slots.live, capacity)
  lead_rows = _packed.rows_at(lead, slot, slots, layout).astype(jnp.float32)  # [G, N, F]
  fine, coarse = _packed.assign_packed(lead_rows, slot, filled, slots, targets, image_hw, layout)
  aux_rows = _packed.rows_at(aux, slot, slots, layout).astype(jnp.float32)
  return ((lead_rows, fine), (aux_rows, coarse)), slots, targets


def _group_terms(
  outputs, slots, targets, layout, image_hw, *, images: slice, capacity: int
) -> jax.Array:
  """``[2, 4, L]`` (lead, auxiliary) x :data:`_TERMS` x levels: unweighted sums of a group."""
  heads, slots, targets = _group_heads(
    outputs, slots, targets, layout, image_hw, images=images, capacity=capacity
  )
  sums = []
  for rows, packed in heads:
    head = _entry_terms(take_rows(rows[..., :5], packed.place), packed, slots, targets, layout)
    head['cls'] = _class_terms(rows, packed, targets, layout)
    sums.append(jnp.stack([head[name] for name in _TERMS]))
  return jnp.stack(sums)


def _group_terms_and_gradients(
  outputs, slots, targets, layout, image_hw, *, images: slice, capacity: int
) -> tuple[jax.Array, tuple[EntryGradients, EntryGradients]]:
  """:func:`_group_terms` and each head's :class:`EntryGradients` (``[G, K]``).

  Only the box and objectness derivatives are taken here, by entry; the class
  derivative is a function of the logits, the positive flag and the class
  (:func:`reorg_jax.loss._bce.class_gradient`), so the backward pass computes
  it at the cells and no ``[G, K, F]`` array leaves the branch.
  """
  heads, slots, targets = _group_heads(
    outputs, slots, targets, layout, image_hw, images=images, capacity=capacity
  )
  terms, entries = [], []
  for rows, packed in heads:

    def box_obj_sum(preds, packed=packed):
      head = _entry_terms(preds, packed, slots, targets, layout)
      return jnp.sum(head['box']) + jnp.sum(head['obj']), head

    preds = take_rows(rows[..., :5], packed.place)  # [G, N, 5]
    _, pullback, head = jax.vjp(box_obj_sum, preds, has_aux=True)
    (gradient,) = pullback(jnp.ones((), jnp.float32))
    head['cls'] = _class_terms(rows, packed, targets, layout)
    terms.append(jnp.stack([head[name] for name in _TERMS]))
    positive, gt = packed.scatter(layout.num_slots)
    batch = positive.shape[0]
    where = jnp.where(packed.filled, packed.slot, layout.num_slots)
    box_obj = jnp.zeros((batch, layout.num_slots, 5), jnp.float32)
    box_obj = box_obj.at[jnp.arange(batch)[:, None], where].set(gradient, mode='drop')
    true_class = jnp.where(positive, take_rows(targets.classes, gt), 0)
    entries.append(EntryGradients(box_obj=box_obj, positive=positive, true_class=true_class))
  return jnp.stack(terms), tuple(entries)


def _batch_groups(batch: int, config: LossConfig) -> list[slice]:
  """Contiguous, static image groups: ``config.batch_groups`` of them, at most ``B``."""
  groups = min(config.batch_groups, batch)
  bounds = [batch * g // groups for g in range(groups + 1)]
  return [slice(start, stop) for start, stop in zip(bounds[:-1], bounds[1:], strict=True)]


def _level_weights(terms: jax.Array, batch: int, layout: SlotLayout) -> jax.Array:
  """``[2, 3, L]`` weight of each head's (box, obj, cls) sum at each level.

  Box and class are means over the level's positives (0 for a level without
  any; class also over classes), the objectness correction is divided by the
  level's cell count and weighted by ``balance``.
  """
  count = jnp.maximum(terms[:, _TERMS.index('positives')], 1.0)  # [2, L]
  obj = jnp.broadcast_to(np.asarray(layout.objectness_weight(batch), np.float32), count.shape)
  return jnp.stack([1.0 / count, obj, 1.0 / (count * layout.config.num_classes)], axis=1)


def _dense_objectness(outputs, layout: SlotLayout) -> tuple[jax.Array, list[jax.Array]]:
  """Each head's ``sum_l balance_l * mean softplus(objectness)``, in column 1 of a ``[2, 3]``.

  Also returns ``sigmoid(objectness)`` of each output (``[B, A, H_l, W_l]``),
  its derivative, for the backward pass's dense objectness gradient.
  """
  levels = layout.config.num_levels
  weights = layout.objectness_weight(outputs[0].shape[0])
  dense, sigmoids = [], []
  for head in (outputs[:levels], outputs[levels:]):
    total = jnp.zeros((), jnp.float32)
    for level, out in enumerate(head):
      logits = out[..., 4].astype(jnp.float32)
      total = total + weights[level] * jnp.sum(_bce.softplus(logits))
      sigmoids.append(jax.nn.sigmoid(logits))
    dense.append(jnp.stack([jnp.zeros(()), total, jnp.zeros(())]))
  return jnp.stack(dense), sigmoids


def _with_static(branch, layout: SlotLayout, image_hw: tuple[int, int]):
  """``branch`` with its static ``layout`` and ``image_hw`` bound (switch operands are arrays)."""

  def bound(outputs, slots, targets, **kwargs):
    return branch(outputs, slots, targets, layout, image_hw, **kwargs)

  return bound


def _capacity_switch(branch, outputs, slots, targets, layout, image_hw):
  """Runs ``branch`` on each image group at the smallest capacity that holds it.

  One capacity switch per image group: the groups are independent, so the
  runtime can execute them side by side (XLA:CPU runs each branch on one core).
  Returns the list of the groups' results.
  """
  config = layout.config
  ladder = _packed.capacities(layout.num_slots, config)
  results = []
  for images in _batch_groups(outputs[0].shape[0], config):
    branches = [
      functools.partial(_with_static(branch, layout, image_hw), images=images, capacity=capacity)
      for capacity in ladder
    ]
    index = _packed.capacity_index(slots.live[images], ladder)
    results.append(jax.lax.switch(index, branches, outputs, slots, targets))
  return results


def _weighted(terms: list[jax.Array], outputs, layout: SlotLayout):
  """``[2, 3]`` loss parts from the groups' ``[2, 4, L]`` sums, and the level weights."""
  terms = sum(terms[1:], terms[0])  # [2, 4, L]
  weights = _level_weights(terms, outputs[0].shape[0], layout)  # [2, 3, L]
  sums = terms[:, [_TERMS.index('box'), _TERMS.index('obj'), _TERMS.index('cls')]]
  return jnp.sum(weights * sums, axis=-1), weights


def _positive_counts(terms: list[jax.Array]) -> jax.Array:
  """``[2]`` float32 positives of the batch, (lead, auxiliary), from the groups' ``[2, 4, L]`` sums."""
  return jnp.sum(jnp.stack(terms)[:, :, _TERMS.index('positives')], axis=(0, 2))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _loss_parts_and_positives(outputs, slots, targets, layout, image_hw):
  """``([2, 3], [2])``: the :func:`_loss_parts` and the heads' positive counts.

  The counts are the SimOTA positives the loss sums over (lead head: fine
  assignment, auxiliary head: coarse), taken from the same assignment; they
  have no gradient (their cotangent is ignored).
  """
  terms = _capacity_switch(_group_terms, outputs, slots, targets, layout, image_hw)
  sparse, _ = _weighted(terms, outputs, layout)
  dense, _ = _dense_objectness(outputs, layout)
  return sparse + dense, _positive_counts(terms)


def _loss_parts_forward(outputs, slots, targets, layout, image_hw):
  groups = _capacity_switch(_group_terms_and_gradients, outputs, slots, targets, layout, image_hw)
  terms = [terms for terms, _ in groups]
  sparse, weights = _weighted(terms, outputs, layout)
  dense, sigmoids = _dense_objectness(outputs, layout)
  entries = jax.tree.map(lambda *x: jnp.concatenate(x, axis=0), *[group for _, group in groups])
  primal = (sparse + dense, _positive_counts(terms))
  return primal, (outputs, sigmoids, slots, entries, weights)


def _loss_parts_backward(layout, image_hw, residuals, cotangents):
  """Each output's gradient written once: objectness everywhere, the rest at the entries' cells."""
  del image_hw
  cotangent, _ = cotangents  # the positive counts have no gradient
  outputs, sigmoids, slots, entries, weights = residuals
  config = layout.config
  levels = config.num_levels
  obj_weights = layout.objectness_weight(outputs[0].shape[0])
  # Lead-head entries sit on the cell of their coarse source slot.
  cells = (
    (take_rows(slots.gj, slots.fine_source), take_rows(slots.gi, slots.fine_source)),
    (slots.gj, slots.gi),
  )
  result = []
  for head in range(2):
    box, obj, cls = cotangent[head, 0], cotangent[head, 1], cotangent[head, 2]
    entry = entries[head]
    gj, gi = cells[head]
    for level in range(levels):
      box_w, obj_w, cls_w = (weights[head, part, level] for part in range(3))
      out = outputs[head * levels + level]
      batch, anchors, grid_h, grid_w, features = out.shape
      part = layout.level_slice(level)
      row = layout.level_row(level, jnp.asarray(layout.anchor[part]), gj[:, part], gi[:, part])
      scale = jnp.concatenate([jnp.full((4,), box * box_w), (obj * obj_w)[None]])
      flat = out.reshape(batch, anchors * grid_h * grid_w, features)
      if config.num_classes > 1:
        logits = take_rows(flat[..., 5:], row).astype(jnp.float32)  # [B, S, C]
        positive, true_class = entry.positive[:, part], entry.true_class[:, part]
        class_rows = _bce.class_gradient(logits, positive, true_class, config) * (cls * cls_w)
      else:
        class_rows = jnp.zeros((batch, row.shape[1], 1), jnp.float32)
      rows = jnp.concatenate([entry.box_obj[:, part] * scale, class_rows], axis=-1)
      sigmoid = sigmoids[head * levels + level]
      full = jnp.zeros(out.shape, jnp.float32).at[..., 4].set(obj * obj_weights[level] * sigmoid)
      full = full.reshape(batch, anchors * grid_h * grid_w, features)
      full = full.at[jnp.arange(batch)[:, None], row].add(rows)
      result.append(full.reshape(out.shape).astype(out.dtype))
  return tuple(result), None, None


_loss_parts_and_positives.defvjp(_loss_parts_forward, _loss_parts_backward)


def _loss_parts(outputs, slots, targets, layout, image_hw):
  """``[2, 3]``: (lead, aux) x (box, objectness, class), before gains and head weights."""
  parts, _ = _loss_parts_and_positives(outputs, slots, targets, layout, image_hw)
  return parts


def _check_targets(targets: Targets, *, batch: int, config: LossConfig) -> None:
  """Trace-time checks that ``targets`` fit outputs of ``batch`` images and the config's ``C``."""
  boxes, classes, valid = (jnp.shape(x) for x in (targets.boxes, targets.classes, targets.valid))
  if len(boxes) != 3 or boxes[2] != 4 or classes != boxes[:2] or valid != boxes[:2]:
    raise ValueError(
      f'targets must hold boxes [B, M, 4], classes [B, M] and valid [B, M], got {boxes}, '
      f'{classes} and {valid}'
    )
  if boxes[0] != batch:
    raise ValueError(
      f'targets hold {boxes[0]} images (boxes {boxes}) but the outputs {batch} '
      '(lead level 0 batch); pass the targets of the same batch'
    )
  if targets.num_classes is not None and targets.num_classes != config.num_classes:
    raise ValueError(
      f'targets were built for {targets.num_classes} classes, the loss config has '
      f"{config.num_classes}; build both with the dataset's class count"
    )


def aux_ota_loss(
  outputs: Sequence[jax.Array],
  targets: Targets,
  image_hw: tuple[int, int],
  config: LossConfig,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Lead + auxiliary OTA loss of YOLOv7's ``IAuxDetect`` head.

  Args:
    outputs: ``2L`` arrays ``[B, A, H_l, W_l, 5 + C]``: the ``L`` lead-head
      outputs, then the ``L`` auxiliary-head outputs on the same grids.
    targets: ``[B, M, ...]`` boxes.
    image_hw: static network input size ``(H, W)`` in pixels.
    config: head geometry and hyper-parameters (static).

  Returns:
    ``(loss, parts)``: ``loss = (box + obj + cls) * B`` and ``parts`` with
    scalar ``box``, ``obj``, ``cls`` (after gains) and ``total`` (their sum,
    before the batch factor), like upstream's returned loss items, and two
    assignment statistics of the batch, float32, without gradient:
    ``lead_positives`` and ``aux_positives``, the mean number per image of
    the lead head's (fine) and the auxiliary head's (coarse) SimOTA
    positives the loss trains on (the ``positive`` entries of
    :func:`reorg_jax.assign` with ``coarse=False`` and ``coarse=True``),
    taken from the loss's own assignment.

  Raises:
    ValueError: at trace time, naming both sides, when the outputs and
      targets disagree in batch size, the grids do not match ``image_hw``
      and the strides, the outputs' ``5 + C`` differs from the config's, or
      ``targets.num_classes`` differs from ``config.num_classes``. A valid
      box whose class lies outside ``[0, C)`` (possible only in targets
      built without :meth:`Targets.from_yolo`) makes ``loss`` and ``total`` NaN.
  """
  levels = config.num_levels
  if len(outputs) != 2 * levels:
    raise ValueError(
      f'outputs must hold {levels} lead then {levels} auxiliary arrays, got {len(outputs)}'
    )
  lead, aux = list(outputs[:levels]), list(outputs[levels:])
  grids = _assign.grid_shapes(lead, config)
  if grids != _assign.grid_shapes(aux, config) or aux[0].shape[0] != lead[0].shape[0]:
    raise ValueError(
      'lead and auxiliary outputs must have the same shapes level by level, got lead '
      f'{[tuple(x.shape) for x in lead]} and auxiliary {[tuple(x.shape) for x in aux]}'
    )
  _assign.check_image_hw(image_hw, grids, config)
  _check_targets(targets, batch=lead[0].shape[0], config=config)
  targets = jax.lax.stop_gradient(targets)
  layout = SlotLayout(config, grids, targets.max_boxes)
  slots = _packed.head_slots(targets, layout)
  parts, positives = _loss_parts_and_positives(
    tuple(lead + aux), slots, targets, layout, tuple(image_hw)
  )
  weights = jnp.asarray([1.0, config.aux_weight], jnp.float32)
  box, obj, cls = jnp.sum(parts * weights[:, None], axis=0)
  box, obj, cls = box * config.box, obj * config.obj, cls * config.cls
  total = box + obj + cls
  # A valid box's class outside [0, C) cannot be seen at trace time: it makes the loss NaN.
  classes = targets.classes
  foreign = jnp.any(targets.valid & ((classes < 0) | (classes >= config.num_classes)))
  total = jnp.where(foreign, jnp.nan, total)
  batch = lead[0].shape[0]
  loss = total * batch
  lead_positives, aux_positives = jax.lax.stop_gradient(positives) / batch
  return loss, {
    'box': box,
    'obj': obj,
    'cls': cls,
    'total': total,
    'lead_positives': lead_positives,
    'aux_positives': aux_positives,
  }
