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
positives, so no dense target grid is built.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from reorg_jax import boxes as box_lib
from reorg_jax.loss import _assign, _packed
from reorg_jax.loss._config import LossConfig
from reorg_jax.loss._slots import SlotLayout, take_rows
from reorg_jax.targets import Targets


@jax.custom_jvp
def softplus(x: jax.Array) -> jax.Array:
  """``log(1 + exp(x))``, element-wise, with derivative ``sigmoid(x)``.

  ``logaddexp(x, 0)``, that is ``max(x, 0) + log1p(exp(-|x|))``. Written with
  ``where``, XLA:CPU read the strided objectness channel of the head outputs
  twice (one fusion for each term); as ``logaddexp`` it reads it once, and the
  loss's dense objectness sum takes about half the time.
  """
  return jnp.logaddexp(x, 0.0)


@softplus.defjvp
def _softplus_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  return softplus(x), dx * jax.nn.sigmoid(x)


def _level_sums(values: jax.Array, level: jax.Array, num_levels: int) -> jax.Array:
  """``[L]`` sums of ``[B, N]`` values by the ``[B, N]`` level of their slot."""
  one_hot = level[..., None] == jnp.arange(num_levels)  # [B, N, L]
  return jnp.sum(jnp.where(one_hot, values[..., None], 0.0), axis=(0, 1))


def _class_bce_sums(
  rows: jax.Array, place: jax.Array, true_class: jax.Array, config: LossConfig
) -> jax.Array:
  """``[B, N]`` class BCE summed over classes, against the smoothed one-hot class.

  With targets ``t_c`` equal to ``cn`` except ``cp`` at the true class and
  ``pw = cls_pw``, ``BCE = (1 + (pw - 1) t) softplus(x) - pw t x``; the class
  sum needs only ``sum softplus`` and ``sum x`` of each row and the true
  class's logit.

  Args:
    rows: ``[B, R, 5 + C]`` head outputs.
    place: ``[B, N]`` row of each entry.
    true_class: ``[B, N]`` class of each entry's box.
    config: ``label_smoothing`` and ``cls_pw``.
  """
  smooth = config.label_smoothing
  high, low = 1.0 - 0.5 * smooth, 0.5 * smooth
  pw = config.cls_pw
  logits = rows[..., 5:]
  softplus_sum = take_rows(jnp.sum(softplus(logits), axis=-1), place)  # [B, N]
  logit_sum = take_rows(jnp.sum(logits, axis=-1), place)
  true_logit = jax.vmap(lambda values, row, c: values[row, c])(logits, place, true_class)
  return (
    (1.0 + (pw - 1.0) * low) * softplus_sum
    + (pw - 1.0) * (high - low) * softplus(true_logit)
    - pw * (low * logit_sum + (high - low) * true_logit)
  )


def _head_terms(
  rows: jax.Array,
  packed: _packed.PackedAssignment,
  slots: _packed.HeadSlots,
  targets: Targets,
  layout: SlotLayout,
) -> dict[str, jax.Array]:
  """Per-level sums of one head's loss terms at its packed positives.

  Args:
    rows: ``[B, N, F]`` the head's outputs at the packed coarse slots' cells.
    packed: the head's ``[B, N]`` assignment; ``packed.place`` is the row of
      each entry.
    slots: candidate cells.
    targets: ``[B, M, ...]`` boxes.
    layout: the slots; its ``config`` gives the hyper-parameters.

  Returns:
    ``[L]`` arrays: ``box`` (sum of ``1 - CIoU``), ``positives``, ``cls``
    (sum of class BCE over positives and classes) and ``obj`` (the
    objectness correction summed over the cells that positives write).
  """
  config = layout.config
  levels = config.num_levels
  level = jnp.asarray(layout.level)[packed.slot]  # [B, N]
  gj, gi = take_rows(slots.gj, packed.source), take_rows(slots.gi, packed.source)
  positive = packed.positive & packed.filled
  preds = take_rows(rows[..., :5], packed.place)  # [B, N, 5]

  gain = jnp.asarray(layout.grid_wh)[packed.slot]  # [B, N, 2]
  true = take_rows(targets.boxes, packed.gt).astype(jnp.float32)  # [B, N, 4]
  cell = jnp.stack([gi, gj], axis=-1).astype(jnp.float32)
  true = jnp.concatenate([true[..., :2] * gain - cell, true[..., 2:] * gain], axis=-1)
  ciou = box_lib.ciou_cxcywh(layout.decode(preds, packed.slot), true)  # [B, N]
  terms = {
    'box': _level_sums(jnp.where(positive, 1.0 - ciou, 0.0), level, levels),
    'positives': _level_sums(positive.astype(jnp.float32), level, levels),
  }
  if config.num_classes > 1:
    true_class = take_rows(targets.classes, packed.gt)
    bce = _class_bce_sums(rows, packed.place, true_class, config)
    terms['cls'] = _level_sums(jnp.where(positive, bce, 0.0), level, levels)
  else:
    terms['cls'] = jnp.zeros((levels,), jnp.float32)

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
  correction = value * ((config.obj_pw - 1.0) * softplus(-logit) - logit)
  terms['obj'] = _level_sums(jnp.where(writes, correction, 0.0), level, levels)
  return terms


_TERMS = ('box', 'positives', 'cls', 'obj')


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
    ``heads`` (lead then auxiliary: each the ``[G, N, F]`` rows at the packed
    coarse places and a function of those rows giving ``sum(box) + sum(obj) +
    sum(cls)`` and the ``[4, L]`` :data:`_TERMS` sums), the packed ``slot``
    and ``filled`` (``[G, N]``) and the group's ``slots``.
  """
  levels = layout.config.num_levels
  outputs = [out[images] for out in outputs]
  slots = jax.tree.map(lambda x: x[images], slots)
  targets = jax.tree.map(lambda x: x[images], targets)
  lead, aux = outputs[:levels], outputs[levels:]
  slot, filled = _packed.pack(slots.live, capacity)
  lead_preds = _packed.rows_at(lead, slot, slots, layout).astype(jnp.float32)  # [G, N, F]
  fine, coarse = _packed.assign_packed(lead_preds, slot, filled, slots, targets, image_hw, layout)
  aux_preds = _packed.rows_at(aux, slot, slots, layout).astype(jnp.float32)
  heads = []
  # Both heads read their rows at the coarse places: the fine head's entries
  # point into them through ``place``, so its gradient lands on coarse slots.
  for rows, packed in ((lead_preds, fine), (aux_preds, coarse)):

    def head_sums(rows, packed=packed):
      head = _head_terms(rows, packed, slots, targets, layout)
      total = jnp.sum(head['box']) + jnp.sum(head['obj']) + jnp.sum(head['cls'])
      return total, jnp.stack([head[name] for name in _TERMS])

    heads.append((rows, head_sums))
  return heads, slot, filled, slots


def _group_terms(*args, images: slice, capacity: int) -> jax.Array:
  """``[2, 4, L]`` (lead, auxiliary) x :data:`_TERMS` x levels: unweighted sums of a group."""
  heads, _, _, _ = _group_heads(*args, images=images, capacity=capacity)
  return jnp.stack([head_sums(rows)[1] for rows, head_sums in heads])


def _group_terms_and_gradients(
  *args, images: slice, capacity: int
) -> tuple[jax.Array, list[jax.Array]]:
  """:func:`_group_terms` and each head's gradient of its ``sum(box) + sum(obj) + sum(cls)``.

  The gradients are with respect to the head's rows at all ``K`` slots
  (``2 x [G, K, F]``). The three sums touch disjoint channels (box: 0-3,
  objectness: 4, class: 5 on), so their per-level weights can be applied to
  the gradient later, channel by channel.
  """
  heads, slot, filled, slots = _group_heads(*args, images=images, capacity=capacity)
  terms, gradients = [], []
  for rows, head_sums in heads:
    _, pullback, head = jax.vjp(head_sums, rows, has_aux=True)
    (gradient,) = pullback(jnp.ones((), jnp.float32))  # [G, N, F]
    batch, num_slots = slots.live.shape
    full = jnp.zeros((batch, num_slots, gradient.shape[-1]), gradient.dtype)
    full = full.at[jnp.arange(batch)[:, None], slot].add(
      jnp.where(filled[..., None], gradient, 0.0)
    )
    terms.append(head)
    gradients.append(full)
  return jnp.stack(terms), gradients


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
  its derivative, so that the backward pass does not read the outputs again.
  """
  levels = layout.config.num_levels
  weights = layout.objectness_weight(outputs[0].shape[0])
  dense, sigmoids = [], []
  for head in (outputs[:levels], outputs[levels:]):
    total = jnp.zeros((), jnp.float32)
    for level, out in enumerate(head):
      logits = out[..., 4].astype(jnp.float32)
      total = total + weights[level] * jnp.sum(softplus(logits))
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _loss_parts(outputs, slots, targets, layout, image_hw):
  """``[2, 3]``: (lead, aux) x (box, objectness, class), before gains and head weights."""
  terms = _capacity_switch(_group_terms, outputs, slots, targets, layout, image_hw)
  sparse, _ = _weighted(terms, outputs, layout)
  dense, _ = _dense_objectness(outputs, layout)
  return sparse + dense


def _loss_parts_forward(outputs, slots, targets, layout, image_hw):
  groups = _capacity_switch(_group_terms_and_gradients, outputs, slots, targets, layout, image_hw)
  sparse, weights = _weighted([terms for terms, _ in groups], outputs, layout)
  dense, sigmoids = _dense_objectness(outputs, layout)
  gradients = [
    jnp.concatenate([group[head] for _, group in groups], axis=0) for head in range(2)
  ]  # 2 x [B, K, F]
  return sparse + dense, (outputs, sigmoids, slots, gradients, weights)


def _loss_parts_backward(layout, image_hw, residuals, cotangent):
  """Each output's gradient written once: objectness everywhere, the rest at candidate rows."""
  del image_hw
  outputs, sigmoids, slots, gradients, weights = residuals
  levels = layout.config.num_levels
  num_classes = layout.config.num_classes
  obj_weights = layout.objectness_weight(outputs[0].shape[0])
  result = []
  for head in range(2):
    box, obj, cls = cotangent[head, 0], cotangent[head, 1], cotangent[head, 2]
    for level in range(levels):
      box_w, obj_w, cls_w = (weights[head, part, level] for part in range(3))
      scale = jnp.concatenate(
        [jnp.full((4,), box * box_w), (obj * obj_w)[None], jnp.full((num_classes,), cls * cls_w)]
      )
      out = outputs[head * levels + level]
      batch, anchors, grid_h, grid_w, features = out.shape
      sigmoid = sigmoids[head * levels + level]
      full = jnp.zeros(out.shape, jnp.float32).at[..., 4].set(obj * obj_weights[level] * sigmoid)
      full = full.reshape(batch, anchors * grid_h * grid_w, features)
      part = layout.level_slice(level)
      row = layout.level_row(
        level, jnp.asarray(layout.anchor[part]), slots.gj[:, part], slots.gi[:, part]
      )
      rows = gradients[head][:, part] * scale
      full = full.at[jnp.arange(batch)[:, None], row].add(rows)
      result.append(full.reshape(out.shape).astype(out.dtype))
  return tuple(result), None, None


_loss_parts.defvjp(_loss_parts_forward, _loss_parts_backward)


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
    before the batch factor), like upstream's returned loss items.

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
  parts = _loss_parts(tuple(lead + aux), slots, targets, layout, tuple(image_hw))
  weights = jnp.asarray([1.0, config.aux_weight], jnp.float32)
  box, obj, cls = jnp.sum(parts * weights[:, None], axis=0)
  box, obj, cls = box * config.box, obj * config.obj, cls * config.cls
  total = box + obj + cls
  # A valid box's class outside [0, C) cannot be seen at trace time: it makes the loss NaN.
  classes = targets.classes
  foreign = jnp.any(targets.valid & ((classes < 0) | (classes >= config.num_classes)))
  total = jnp.where(foreign, jnp.nan, total)
  loss = total * lead[0].shape[0]
  return loss, {'box': box, 'obj': obj, 'cls': cls, 'total': total}
