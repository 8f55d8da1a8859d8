"""Lead-guided label assignment: candidate cells, then SimOTA, on fixed shapes.

Glossary: ``B`` batch, ``L`` levels, ``A`` anchors per level, ``M`` max boxes
per image, ``O = 5`` cell offsets (centre, left, up, right, down),
``K = L * O * A * M`` candidate slots per image, ``C`` classes, ``H_l``/``W_l``
the grid of level ``l``.

Every image owns ``K`` candidate slots laid out as ``[L, O, A, M]``
(:class:`~reorg_jax.loss._slots.SlotLayout`, which every slot index goes
through), in the order upstream's ``find_3_positive`` / ``find_5_positive``
produce candidates. A slot is *live* when the box
is real, the anchor shape fits the box (``max(r, 1/r) < anchor_t``) and the
offset applies; dead slots are masked, never dropped.

SimOTA then runs over all live slots of an image for every box of that image,
also slots that other boxes produced: a box is scored against the whole
candidate list, as upstream does.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from reorg_jax import boxes as box_lib
from reorg_jax.loss._config import LossConfig
from reorg_jax.loss._slots import SlotLayout
from reorg_jax.targets import Targets

# Grid offsets in units of the neighbourhood radius g, subtracted from the box
# centre: centre, left (x - g), up (y - g), right (x + g), down (y + g).
_OFFSETS = np.array([[0, 0], [1, 0], [0, 1], [-1, 0], [0, -1]], np.float32)
_TINY = float(np.finfo(np.float32).tiny)
_BELOW_ONE = float(np.nextafter(np.float32(1), np.float32(0)))


@flax.struct.dataclass
class Assignment:
  """Which candidate cells are trained, and on which box.

  Attributes (``[B, K]`` unless noted):
    level: level of the slot.
    anchor: anchor index within the level.
    gj: grid row.
    gi: grid column.
    gt: index into the image's boxes (``Targets`` row) that the slot is
      trained on; 0 where not ``positive``.
    candidate: the slot is live (passed the anchor-shape and offset tests).
    positive: the slot survived SimOTA.
    dynamic_k: ``[B, M]`` dynamic k of each box (0 for padding).
  """

  level: jax.Array
  anchor: jax.Array
  gj: jax.Array
  gi: jax.Array
  gt: jax.Array
  candidate: jax.Array
  positive: jax.Array
  dynamic_k: jax.Array


def grid_shapes(outputs: Sequence[jax.Array], config: LossConfig) -> tuple[tuple[int, int], ...]:
  """Checks ``L`` head outputs ``[B, A, H_l, W_l, 5 + C]`` and returns their ``(H_l, W_l)``."""
  if len(outputs) != config.num_levels:
    raise ValueError(f'expected {config.num_levels} level outputs, got {len(outputs)}')
  want = (config.num_anchors, 5 + config.num_classes)
  shapes = []
  for level, out in enumerate(outputs):
    if out.ndim != 5 or (out.shape[1], out.shape[4]) != want:
      raise ValueError(
        f'level {level} output must be [B, A={want[0]}, H, W, 5+C={want[1]}], got {out.shape}'
      )
    if out.shape[0] != outputs[0].shape[0]:
      raise ValueError(f'level {level} has batch {out.shape[0]}, level 0 has {outputs[0].shape[0]}')
    shapes.append((out.shape[2], out.shape[3]))
  return tuple(shapes)


def check_image_hw(
  image_hw: tuple[int, int], grids: Sequence[tuple[int, int]], config: LossConfig
) -> None:
  """Raises ``ValueError`` unless each level's grid is the image size over its stride."""
  height, width = image_hw
  for level, ((grid_h, grid_w), stride) in enumerate(zip(grids, config.strides, strict=True)):
    if (grid_h * stride, grid_w * stride) != (height, width):
      raise ValueError(
        f'level {level} grid {grid_h}x{grid_w} at stride {stride} does not cover an image of '
        f'{height}x{width} (H x W); pass image_hw=(H, W) of the network input'
      )


def find_candidates(
  targets: Targets, layout: SlotLayout, *, coarse: bool
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Candidate cells of every box: upstream's ``find_3_positive`` / ``find_5_positive``.

  Per level, the box centre ``(x, y)`` in grid units always proposes its own
  cell; it also proposes the left cell when ``frac(x) < g and x > 1``, the
  upper when ``frac(y) < g and y > 1``, the right when
  ``frac(W_l - x) < g and W_l - x > 1`` and the lower likewise, where
  ``g = 0.5`` (fine: at most one of each pair) or ``g = 1.0`` (coarse: both).

  Args:
    targets: ``[B, M, ...]`` boxes.
    layout: the slots of ``L`` grids and ``M`` boxes.
    coarse: ``g = 1.0`` (auxiliary head) instead of ``g = 0.5`` (lead head).

  Returns:
    ``gj``, ``gi`` (``[B, K]`` int32 cells, clamped to the grid; 0 for dead
    slots) and ``live`` (``[B, K]`` bool).
  """
  g = 1.0 if coarse else 0.5
  config = layout.config
  offsets = jnp.asarray(_OFFSETS * g)  # [O, 2]
  gjs, gis, lives = [], [], []
  for (grid_h, grid_w), anchors in zip(layout.grids, layout.level_anchors(), strict=True):
    gain = jnp.asarray([grid_w, grid_h], jnp.float32)
    gxy = targets.boxes[..., :2].astype(jnp.float32) * gain  # [B, M, 2]
    gwh = targets.boxes[..., 2:].astype(jnp.float32) * gain
    ratio = gwh[:, None, :, :] / anchors[None, :, None, :]  # [B, A, M, 2]
    shape_ok = jnp.max(jnp.maximum(ratio, 1.0 / ratio), axis=-1) < config.anchor_t  # [B, A, M]
    gxy_inv = gain - gxy
    near_low = (jnp.mod(gxy, 1.0) < g) & (gxy > 1.0)  # [B, M, 2]: left, up
    near_high = (jnp.mod(gxy_inv, 1.0) < g) & (gxy_inv > 1.0)  # right, down
    use = jnp.stack(
      [
        jnp.ones_like(near_low[..., 0]),
        near_low[..., 0],
        near_low[..., 1],
        near_high[..., 0],
        near_high[..., 1],
      ],
      axis=1,
    )  # [B, O, M]
    live = use[:, :, None, :] & shape_ok[:, None, :, :] & targets.valid[:, None, None, :]
    cell = jnp.floor(gxy[:, None, :, :] - offsets[None, :, None, :]).astype(
      jnp.int32
    )  # [B, O, M, 2]
    gi = jnp.clip(cell[..., 0], 0, grid_w - 1)
    gj = jnp.clip(cell[..., 1], 0, grid_h - 1)
    gis.append(jnp.broadcast_to(gi[:, :, None, :], live.shape))  # [B, O, A, M]
    gjs.append(jnp.broadcast_to(gj[:, :, None, :], live.shape))
    lives.append(live)
  live = layout.from_levels(lives)  # [B, K]
  return (
    jnp.where(live, layout.from_levels(gjs), 0),
    jnp.where(live, layout.from_levels(gis), 0),
    live,
  )


def gather_cells(
  outputs: Sequence[jax.Array], layout: SlotLayout, gj: jax.Array, gi: jax.Array
) -> jax.Array:
  """Predictions at all ``K`` candidate slots.

  Args:
    outputs: ``L`` arrays ``[B, A, H_l, W_l, F]``.
    layout: the slots.
    gj, gi: ``[B, K]`` cells.

  Returns:
    ``[B, K, F]``.
  """
  pieces = []
  for level, out in enumerate(outputs):
    batch, num_anchors, grid_h, grid_w, features = out.shape
    part = layout.level_slice(level)
    row = layout.level_row(level, jnp.asarray(layout.anchor[part]), gj[:, part], gi[:, part])
    table = out.reshape(batch, num_anchors * grid_h * grid_w, features)
    pieces.append(jnp.take_along_axis(table, row[..., None], axis=1))  # [B, S, F]
  return jnp.concatenate(pieces, axis=1)


def decode_pixels(
  preds: jax.Array, slot: jax.Array, gj: jax.Array, gi: jax.Array, layout: SlotLayout
) -> jax.Array:
  """Pixel ``xyxy`` boxes ``[B, N, 4]`` of raw predictions ``[B, N, F]`` at ``[B, N]`` cells.

  ``slot`` (``[N]`` or ``[B, N]``) gives each prediction's level and anchor.
  """
  return box_lib.cxcywh_to_xyxy(layout.decode(preds, slot, cells=(gj, gi)))


def _class_score(cls_logit: jax.Array, obj_logit: jax.Array) -> jax.Array:
  """``y = sqrt(sigmoid(cls) * sigmoid(obj))``, kept inside ``[tiny, 1 - 2**-24]``."""
  y = jnp.sqrt(jax.nn.sigmoid(cls_logit) * jax.nn.sigmoid(obj_logit))
  return jnp.clip(y, _TINY, _BELOW_ONE)


def class_total(preds: jax.Array) -> jax.Array:
  """``[B, N]`` per-slot part of the SimOTA class cost, ``-sum_c log(1 - y_c)``.

  With ``y = sqrt(sigmoid(cls) * sigmoid(obj))`` upstream takes the
  BCE-with-logits of ``z = log(y / (1 - y))`` against the one-hot class,
  summed over classes. Since ``softplus(z) = -log(1 - y)``, that sum is
  ``-sum_c log(1 - y_c) - z_class``: this per-slot total minus one logit at
  the box's class (:func:`class_logits_at`), so no ``[M, N, C]`` tensor is
  ever formed. ``y`` is kept inside ``[tiny, 1 - 2**-24]`` so that saturated
  logits give a large finite cost where upstream gets inf or NaN.

  Args:
    preds: ``[B, N, 5 + C]`` raw logits.
  """
  return -jnp.sum(jnp.log1p(-_class_score(preds[..., 5:], preds[..., 4:5])), axis=-1)


def class_logits_at(preds: jax.Array, classes: jax.Array) -> jax.Array:
  """``[B, M, N]`` logit ``z = log(y / (1 - y))`` of every slot at every box's class.

  Evaluated at the ``M`` picked logits when there are fewer boxes than
  classes, otherwise on the ``[B, N, C]`` table and then picked; both give the
  same numbers.

  Args:
    preds: ``[B, N, 5 + C]`` raw logits.
    classes: ``[B, M]`` int32 class of each box.
  """
  num_classes = preds.shape[-1] - 5
  if classes.shape[1] < num_classes:
    picked = jax.vmap(lambda p, c: p[:, 5 + c])(preds, classes)  # [B, N, M]
    y = _class_score(jnp.swapaxes(picked, 1, 2), preds[:, None, :, 4])  # [B, M, N]
    return jnp.log(y) - jnp.log1p(-y)
  y = _class_score(preds[..., 5:], preds[..., 4:5])  # [B, N, C]
  table = jnp.log(y) - jnp.log1p(-y)
  return jax.vmap(lambda t, c: t[:, c])(table, classes).swapaxes(1, 2)  # [B, M, N]


def pair_scores(
  pred_xyxy: jax.Array,
  total: jax.Array,
  class_logit: jax.Array,
  live: jax.Array,
  targets: Targets,
  image_hw: tuple[int, int],
  config: LossConfig,
) -> tuple[jax.Array, jax.Array]:
  """IoU and SimOTA cost of every (box, slot) pair of an image.

  Args:
    pred_xyxy: ``[B, N, 4]`` decoded predictions in pixels.
    total: ``[B, N]`` :func:`class_total` of the same slots.
    class_logit: ``[B, M, N]`` :func:`class_logits_at` the boxes' classes.
    live: ``[B, N]`` the slot is a candidate.
    targets: ``[B, M, ...]`` boxes.
    image_hw: ``(H, W)``; boxes are scaled by ``W`` in x and ``H`` in y.
    config: cost weights.

  Returns:
    ``iou`` (``[B, M, N]``, 0 off valid pairs) and ``cost`` (``[B, M, N]``,
    ``inf`` off valid pairs).
  """
  height, width = image_hw
  scale = jnp.asarray([width, height, width, height], jnp.float32)
  true_xyxy = box_lib.cxcywh_to_xyxy(targets.boxes.astype(jnp.float32) * scale)  # [B, M, 4]
  pair = targets.valid[:, :, None] & live[:, None, :]  # [B, M, N]
  iou = jnp.where(pair, box_lib.iou_xyxy(true_xyxy, pred_xyxy), 0.0)
  cost = total[:, None, :] - class_logit + config.iou_cost_weight * -jnp.log(iou + 1e-8)
  return iou, jnp.where(pair, cost, jnp.inf)


@flax.struct.dataclass
class CandidateCosts:
  """Candidate slots of one head and their SimOTA scores against every box.

  Attributes:
    gj, gi: ``[B, K]`` int32 cells.
    live: ``[B, K]`` bool, the slot is a candidate.
    iou: ``[B, M, K]`` IoU of box and decoded lead prediction (0 where the
      box is padding or the slot is dead).
    cost: ``[B, M, K]`` SimOTA cost (``inf`` where the box is padding or the
      slot is dead).
  """

  gj: jax.Array
  gi: jax.Array
  live: jax.Array
  iou: jax.Array
  cost: jax.Array


def candidate_costs(
  lead: Sequence[jax.Array],
  targets: Targets,
  image_hw: tuple[int, int],
  config: LossConfig,
  *,
  coarse: bool,
) -> CandidateCosts:
  """Steps 1-3 of :func:`assign`: candidate slots, their IoU and cost per box.

  Boxes are scaled to pixels with ``x, w`` times the image width and
  ``y, h`` times its height. Upstream scales both by the height, which
  differs only for non-square images.

  Args and shapes as in :func:`assign`.
  """
  grids = grid_shapes(lead, config)
  check_image_hw(image_hw, grids, config)
  lead = [jax.lax.stop_gradient(out) for out in lead]
  targets = jax.lax.stop_gradient(targets)
  layout = SlotLayout(config, grids, targets.max_boxes)
  gj, gi, live = find_candidates(targets, layout, coarse=coarse)
  preds = gather_cells(lead, layout, gj, gi).astype(jnp.float32)  # [B, K, F]
  pred_xyxy = decode_pixels(preds, jnp.arange(layout.num_slots), gj, gi, layout)
  total = class_total(preds)
  class_logit = class_logits_at(preds, targets.classes)
  iou, cost = pair_scores(pred_xyxy, total, class_logit, live, targets, image_hw, config)
  return CandidateCosts(gj=gj, gi=gi, live=live, iou=iou, cost=cost)


def simota(
  iou: jax.Array, cost: jax.Array, live: jax.Array, valid: jax.Array, config: LossConfig
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Steps 4-5 of :func:`assign` on ``N`` slots per image (any slot order).

  Args:
    iou, cost: ``[B, M, N]`` from :func:`pair_scores`.
    live: ``[B, N]`` the slot is a candidate.
    valid: ``[B, M]`` the box is real.
    config: ``dynamic_k_candidates``.

  Returns:
    ``positive`` (``[B, N]`` bool), ``gt`` (``[B, N]`` int32 box of each
    positive, 0 elsewhere) and ``dynamic_k`` (``[B, M]`` int32, 0 for
    padding). Ties go to the lower slot, then to the lower box.
  """
  num_boxes = valid.shape[1]
  max_k = min(config.dynamic_k_candidates, cost.shape[-1])
  dynamic_k = dynamic_ks(iou, valid, config)
  pair = valid[:, :, None] & live[:, None, :]  # [B, M, N]
  selected = _select_cheapest(cost, dynamic_k, max_k=max_k) & pair
  takers = jnp.sum(selected, axis=1)  # [B, N]
  box_index = jnp.arange(num_boxes, dtype=jnp.int32)[None, :, None]
  lowest_cost = jnp.min(cost, axis=1, keepdims=True)
  # First box at the minimum / first selecting box, as plain min-reductions.
  cheapest_box = jnp.min(jnp.where(cost == lowest_cost, box_index, num_boxes), axis=1)
  only_box = jnp.min(jnp.where(selected, box_index, num_boxes), axis=1)
  gt = jnp.where(takers > 1, cheapest_box, jnp.where(takers > 0, only_box, 0))
  return takers > 0, gt, dynamic_k


def dynamic_ks(iou: jax.Array, valid: jax.Array, config: LossConfig) -> jax.Array:
  """``[B, M]`` dynamic k: ``max(1, int(sum of the best IoUs))`` per real box, 0 for padding."""
  top = jax.lax.top_k(iou, min(config.dynamic_k_candidates, iou.shape[-1]))[0]  # [B, M, k]
  dynamic_k = jnp.maximum(jnp.sum(top, axis=-1).astype(jnp.int32), 1)
  return jnp.where(valid, dynamic_k, 0)


def assign(
  lead: Sequence[jax.Array],
  targets: Targets,
  image_hw: tuple[int, int],
  config: LossConfig,
  *,
  coarse: bool,
) -> Assignment:
  """Lead-guided SimOTA assignment for one head, vectorised over the batch.

  ``coarse=False`` reproduces upstream's ``build_targets`` (lead head, fine
  candidates), ``coarse=True`` its ``build_targets2`` (auxiliary head, coarse
  candidates); both score candidates with the *lead* head's predictions.

  For every image and box ``m``:

  1. decode the lead predictions at all live slots to pixel boxes;
  2. ``iou[m, k]`` against every slot, ``dynamic_k[m] = max(1, int(sum of the
     top-20 IoUs))``;
  3. ``cost[m, k] = BCE(sqrt(sigmoid(cls) * sigmoid(obj)), one-hot) +
     3 * -log(iou + 1e-8)``, the class part computed as
     ``sum_c softplus(z_c) - z_class`` with ``z`` the logit of the geometric
     mean (:func:`class_total`, :func:`class_logits_at`), so no ``[M, K, C]`` tensor is formed;
  4. box ``m`` selects its ``dynamic_k[m]`` cheapest slots (equal costs: the
     lower slot first);
  5. a slot selected by several boxes goes to the box of lowest cost over
     *all* boxes of the image (equal costs: lower box index), which may be a
     box that did not select it.

  Memory is ``O(B * M * K)``; the result carries no gradient.

  Args:
    lead: ``L`` lead-head outputs ``[B, A, H_l, W_l, 5 + C]`` (raw logits).
    targets: ``[B, M, ...]`` boxes.
    image_hw: static network input size ``(H, W)`` in pixels.
    config: head geometry and cost weights.
    coarse: auxiliary-head neighbourhood (5 cells) instead of lead (3 cells).

  Returns:
    ``Assignment`` with ``[B, K]`` fields, ``K = L * 5 * A * M``.
  """
  scores = candidate_costs(lead, targets, image_hw, config, coarse=coarse)
  positive, gt, dynamic_k = simota(scores.iou, scores.cost, scores.live, targets.valid, config)
  layout = SlotLayout(config, grid_shapes(lead, config), targets.max_boxes)
  shape = (targets.batch_size, layout.num_slots)
  return Assignment(
    level=jnp.broadcast_to(jnp.asarray(layout.level), shape),
    anchor=jnp.broadcast_to(jnp.asarray(layout.anchor), shape),
    gj=scores.gj,
    gi=scores.gi,
    gt=gt,
    candidate=scores.live,
    positive=positive,
    dynamic_k=dynamic_k,
  )


def _select_cheapest(cost: jax.Array, count: jax.Array, *, max_k: int) -> jax.Array:
  """``[B, M, K]`` mask of each row's ``count`` smallest costs, lower index first on ties.

  ``count`` (``[B, M]``) is at most ``max_k``; a row with ``count == 0`` selects
  nothing. Uses one ``top_k`` with the static bound ``max_k`` and compares
  against the ``count``-th value instead of scattering indices.
  """
  neg_values, indices = jax.lax.top_k(-cost, max_k)  # [B, M, max_k]
  last = jnp.clip(count - 1, 0, max_k - 1)[..., None]
  bound = -jnp.take_along_axis(neg_values, last, axis=-1)  # [B, M, 1]
  bound_index = jnp.take_along_axis(indices, last, axis=-1)
  slot = jnp.arange(cost.shape[-1])
  chosen = (cost < bound) | ((cost == bound) & (slot <= bound_index))
  return chosen & (count > 0)[..., None]
