"""YOLOv7's auxiliary-head OTA loss (``ComputeLossAuxOTA``) on fixed shapes.

Glossary: ``B`` batch, ``L`` levels, ``A`` anchors per level, ``M`` max boxes,
``K`` candidate slots per image (``K = L * 5 * A * M``, ``S = K / L`` per
level), ``C`` classes, ``H_l``/``W_l`` the grid of level ``l``.

The objective has two heads. Both are trained on targets chosen with the
*lead* head's predictions: the lead head on the fine assignment (centre cell
plus the two nearest neighbours), the auxiliary head on the coarse one
(centre plus four neighbours), each filtered by SimOTA
(:func:`reorg_jax.assigner.assign`). Per level ``l`` and head:

* box: mean over positives of ``1 - CIoU(pred, box)`` in grid units;
* objectness: BCE of every cell's objectness logit against
  ``(1 - gr) + gr * clamp(CIoU, 0)`` at positives (no gradient through the
  target) and 0 elsewhere, mean over the grid, times ``balance[l]``;
* class: BCE against the (smoothed) one-hot class, mean over positives and
  classes; skipped when ``C == 1``.

The auxiliary head's three terms enter with weight ``aux_weight`` (0.25).
Sums over levels are multiplied by the ``box``/``obj``/``cls`` gains and the
total by the batch size, as upstream does.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from reorg_jax import assigner
from reorg_jax import boxes as box_lib
from reorg_jax.config import LossConfig
from reorg_jax.targets import Targets


def bce_with_logits(logits: jax.Array, labels: jax.Array, *, pos_weight: float) -> jax.Array:
  """Element-wise BCE with logits and a positive-class weight (unreduced).

  ``pos_weight * t * softplus(-x) + (1 - t) * softplus(x)``: optax's sigmoid
  BCE plus ``(pos_weight - 1) * t * softplus(-x)``.
  """
  loss = optax.sigmoid_binary_cross_entropy(logits, labels)
  if pos_weight != 1.0:
    loss = loss + (pos_weight - 1.0) * labels * jax.nn.softplus(-logits)
  return loss


def _masked_mean(values: jax.Array, mask: jax.Array, *, per_item: int = 1) -> jax.Array:
  """Mean of ``values`` where ``mask``; 0 when nothing is masked in."""
  count = jnp.sum(mask) * per_item
  return jnp.sum(jnp.where(mask, values, 0.0)) / jnp.maximum(count, 1)


def objectness_targets(
  shape: tuple[int, int, int, int],
  anchor: np.ndarray,
  gj: jax.Array,
  gi: jax.Array,
  positive: jax.Array,
  value: jax.Array,
) -> jax.Array:
  """Objectness target grid of one level.

  Several positives can share a cell (two boxes proposing the same cell and
  anchor). Upstream writes them with one indexed assignment whose order is
  unspecified; on CPU the last write wins. Here the rule is explicit: the
  positive that comes last in slot order (image, offset, anchor, box) wins.

  Args:
    shape: ``(B, A, H_l, W_l)``.
    anchor: ``[S]`` static anchor per slot of the level.
    gj, gi, positive, value: ``[B, S]``.

  Returns:
    ``[B, A, H_l, W_l]`` targets, 0 where no positive lies.
  """
  batch, num_anchors, grid_h, grid_w = shape
  cells = num_anchors * grid_h * grid_w
  flat = (jnp.asarray(anchor) * grid_h + gj) * grid_w + gi  # [B, S]
  rows = jnp.arange(batch)[:, None]
  order = jnp.where(positive, jnp.arange(flat.shape[1]), -1)
  last = jnp.full((batch, cells), -1, jnp.int32).at[rows, flat].max(order)
  winner = positive & (last[rows, flat] == order)
  target = jnp.zeros((batch, cells), value.dtype)
  target = target.at[rows, jnp.where(winner, flat, cells)].set(value, mode='drop')
  return target.reshape(shape)


@jax.custom_vjp
def read_head(out: jax.Array, flat_index: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The two reads the loss makes of a head output, with a one-pass gradient.

  Args:
    out: ``[B, A, H_l, W_l, F]`` head output.
    flat_index: ``[B, S]`` int32 rows ``(a * H_l + gj) * W_l + gi``.

  Returns:
    objectness logits ``out[..., 4]`` (``[B, A, H_l, W_l]``) and the rows at
    ``flat_index`` (``[B, S, F]``).

  The gradient of ``out`` is dense in channel 4 and touches the other channels
  only at ``S`` rows; it is built by writing channel 4 once and adding the
  rows in place, instead of summing two full-size cotangents.
  """
  return _read_head_forward(out, flat_index)[0]


def _read_head_forward(out, flat_index):
  batch, anchors, grid_h, grid_w, features = out.shape
  table = out.reshape(batch, anchors * grid_h * grid_w, features)
  rows = jnp.take_along_axis(table, flat_index[..., None], axis=1)
  return (out[..., 4], rows), flat_index


def _read_head_backward(flat_index, cotangents):
  obj_grad, rows_grad = cotangents
  batch, anchors, grid_h, grid_w = obj_grad.shape
  features = rows_grad.shape[-1]
  full = jnp.zeros((*obj_grad.shape, features), rows_grad.dtype).at[..., 4].set(obj_grad)
  full = full.reshape(batch, anchors * grid_h * grid_w, features)
  full = full.at[jnp.arange(batch)[:, None], flat_index].add(rows_grad)
  return full.reshape(batch, anchors, grid_h, grid_w, features), None


read_head.defvjp(_read_head_forward, _read_head_backward)


def _head_level_loss(
  out: jax.Array,
  level: int,
  assignment: assigner.Assignment,
  anchor: np.ndarray,
  targets: Targets,
  config: LossConfig,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(box, obj, cls)`` of one head on one level, before gains and head weight.

  Args:
    out: ``[B, A, H_l, W_l, 5 + C]`` raw head output.
    level: ``l``.
    assignment: ``[B, K]`` assignment of this head.
    anchor: ``[K]`` static anchor per slot.
    targets: ``[B, M, ...]`` boxes.
    config: head geometry and hyper-parameters.
  """
  batch, _, grid_h, grid_w, _ = out.shape
  per_level = anchor.shape[0] // config.num_levels
  part = slice(level * per_level, (level + 1) * per_level)
  gj, gi = assignment.gj[:, part], assignment.gi[:, part]
  positive = assignment.positive[:, part]  # [B, S]
  gt = assignment.gt[:, part]
  flat_index = (jnp.asarray(anchor[part]) * grid_h + gj) * grid_w + gi  # [B, S]
  obj_logits, preds = read_head(out, flat_index)  # [B, A, H_l, W_l], [B, S, 5 + C]

  anchor_wh = assigner.anchors_in_cells(config)[level][anchor[part]]  # [S, 2]
  pred_xy = jax.nn.sigmoid(preds[..., :2]) * 2.0 - 0.5
  pred_wh = (jax.nn.sigmoid(preds[..., 2:4]) * 2.0) ** 2 * anchor_wh
  gain = jnp.asarray([grid_w, grid_h, grid_w, grid_h], jnp.float32)
  true = jnp.take_along_axis(targets.boxes, gt[..., None], axis=1) * gain  # [B, S, 4]
  cell = jnp.stack([gi, gj], axis=-1).astype(true.dtype)
  true = jnp.concatenate([true[..., :2] - cell, true[..., 2:]], axis=-1)
  ciou = box_lib.ciou_cxcywh(jnp.concatenate([pred_xy, pred_wh], axis=-1), true)  # [B, S]
  box = _masked_mean(1.0 - ciou, positive)

  obj_value = (1.0 - config.gr) + config.gr * jnp.clip(jax.lax.stop_gradient(ciou), 0)
  obj_target = objectness_targets(
    (batch, config.num_anchors, grid_h, grid_w), anchor[part], gj, gi, positive, obj_value
  )
  obj = jnp.mean(bce_with_logits(obj_logits, obj_target, pos_weight=config.obj_pw))

  if config.num_classes > 1:
    smooth = config.label_smoothing
    true_class = jnp.take_along_axis(targets.classes, gt, axis=1)  # [B, S]
    onehot = jax.nn.one_hot(true_class, config.num_classes, dtype=preds.dtype)
    labels = onehot * (1.0 - smooth) + 0.5 * smooth  # [B, S, C]
    bce = bce_with_logits(preds[..., 5:], labels, pos_weight=config.cls_pw)
    cls = _masked_mean(bce, positive[..., None], per_item=config.num_classes)
  else:
    cls = jnp.zeros((), out.dtype)
  return box, obj, cls


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
  """
  levels = config.num_levels
  if len(outputs) != 2 * levels:
    raise ValueError(
      f'outputs must hold {levels} lead then {levels} auxiliary arrays, got {len(outputs)}'
    )
  lead, aux = list(outputs[:levels]), list(outputs[levels:])
  if assigner.grid_shapes(lead, config) != assigner.grid_shapes(aux, config):
    raise ValueError('lead and auxiliary outputs must have the same shapes level by level')
  fine = assigner.assign(lead, targets, image_hw, config, coarse=False)
  coarse = assigner.assign(lead, targets, image_hw, config, coarse=True)
  _, anchor = assigner.slot_layout(config, targets.max_boxes)

  box = obj = cls = jnp.zeros((), jnp.float32)
  for level in range(levels):
    for out, assignment, weight in (
      (lead[level], fine, 1.0),
      (aux[level], coarse, config.aux_weight),
    ):
      level_box, level_obj, level_cls = _head_level_loss(
        out, level, assignment, anchor, targets, config
      )
      box = box + weight * level_box
      obj = obj + weight * config.balance[level] * level_obj
      cls = cls + weight * level_cls
  box, obj, cls = box * config.box, obj * config.obj, cls * config.cls
  total = box + obj + cls
  loss = total * lead[0].shape[0]
  return loss, {'box': box, 'obj': obj, 'cls': cls, 'total': total}
