"""Properties of the vectorised assigner: a brute-force reference, padding, tracing, transforms."""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reorg_jax
from reorg_jax import testing
from reorg_jax.loss._slots import SlotLayout

HW = (320, 320)
# One loss branch to compile instead of twelve (testing.ONE_BRANCH); the default ladder runs
# in the tracing test here.
FLAT = testing.ONE_BRANCH

# One jitted loss for the property tests: it compiles once per scene shape and configuration
# (``test_jit_equals_eager`` compares it with the eager loss).
loss_fn = jax.jit(reorg_jax.aux_ota_loss, static_argnums=(2, 3))


def scene(seed, counts, **kwargs):
  return testing.random_scene(seed, counts, **FLAT, **kwargs)


def brute_force_simota(cost, iou, live, valid, top=20):
  """Per image and per box, with Python loops and stable sorts: the rules of ``assign``."""
  batch, boxes, slots = cost.shape
  positive = np.zeros((batch, slots), bool)
  gt = np.zeros((batch, slots), np.int64)
  own = np.zeros((batch, boxes), np.int64)  # positives a box selected itself
  won = np.zeros((batch, boxes), np.int64)  # conflicts a box won
  for b in range(batch):
    matching = np.zeros((boxes, slots), bool)
    dynamic_k = np.zeros(boxes, np.int64)
    for m in np.flatnonzero(valid[b]):
      dynamic_k[m] = max(1, int(np.sort(iou[b, m])[::-1][:top].astype(np.float32).sum()))
      order = np.argsort(cost[b, m], kind='stable')
      chosen = order[: dynamic_k[m]]
      matching[m, chosen[live[b, chosen]]] = True
    selected = matching.copy()
    for k in np.flatnonzero(matching.sum(0) > 1):
      matching[:, k] = False
      matching[np.argmin(cost[b, :, k]), k] = True
    positive[b] = matching.any(0)
    gt[b] = matching.argmax(0)
    own[b] = (matching & selected).sum(1)
    won[b] = (matching & ~selected).sum(1)
  return positive, gt, own, won


@pytest.mark.parametrize('coarse', [False, True])
@pytest.mark.parametrize('seed', [0, 1, 2])
def test_equals_brute_force_on_same_costs(seed, coarse):
  config, targets, outputs = scene(seed, [12, 7, 0, 1])
  lead = outputs[:4]
  costs = jax.tree.map(
    np.asarray, reorg_jax.candidate_costs(lead, targets, HW, config, coarse=coarse)
  )
  got = reorg_jax.assign(lead, targets, HW, config, coarse=coarse)
  positive, gt, own, won = brute_force_simota(
    costs.cost, costs.iou, costs.live, np.asarray(targets.valid)
  )
  np.testing.assert_array_equal(got.positive, positive)
  np.testing.assert_array_equal(np.where(positive, got.gt, -1), np.where(positive, gt, -1))
  # Each box keeps at most dynamic_k of the slots it selected itself; beyond that it can
  # only hold slots it won in a conflict (upstream hands a contested slot to the cheapest
  # box of the image, which need not be among the boxes that selected it).
  assert (own <= np.asarray(got.dynamic_k)).all()
  counts = np.stack(
    [np.bincount(np.asarray(got.gt)[b][positive[b]], minlength=12) for b in range(4)]
  )
  np.testing.assert_array_equal(counts, own + won)


def test_padding_is_never_matched_and_never_read():
  config, targets, outputs = scene(3, [5, 12, 0, 3])
  garbage = targets.replace(
    boxes=jnp.where(targets.valid[..., None], targets.boxes, 0.37),
    classes=jnp.where(targets.valid, targets.classes, 4),
  )
  for coarse in (False, True):
    a = reorg_jax.assign(outputs[:4], targets, HW, config, coarse=coarse)
    b = reorg_jax.assign(outputs[:4], garbage, HW, config, coarse=coarse)
    chex.assert_trees_all_equal(a, b)
    positive = np.asarray(a.positive)
    assert positive.any()
    assert np.asarray(targets.valid)[np.nonzero(positive)[0], np.asarray(a.gt)[positive]].all()
    assert not (positive & ~np.asarray(a.candidate)).any()
    assert not positive[2].any(), 'an empty image has no positive'
    np.testing.assert_array_equal(np.asarray(a.dynamic_k)[~np.asarray(targets.valid)], 0)
  loss_a = loss_fn(outputs, targets, HW, config)
  loss_b = loss_fn(outputs, garbage, HW, config)
  chex.assert_trees_all_equal(loss_a, loss_b)


def test_one_trace_across_box_counts():
  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(outputs, targets):
    return reorg_jax.aux_ota_loss(outputs, targets, HW, reorg_jax.LossConfig.p6(5))

  for seed, counts in enumerate([[0, 0], [1, 12], [7, 3], [12, 12]]):
    _, targets, outputs = scene(seed, counts)
    loss, _ = step(outputs, targets)
    assert np.isfinite(loss)


@pytest.mark.parametrize('coarse', [False, True])
def test_jit_equals_eager(coarse):
  config, targets, outputs = scene(4, [9, 2, 12])
  eager = reorg_jax.assign(outputs[:4], targets, HW, config, coarse=coarse)
  jitted = jax.jit(reorg_jax.assign, static_argnames=('image_hw', 'config', 'coarse'))(
    outputs[:4], targets, HW, config, coarse=coarse
  )
  chex.assert_trees_all_equal(eager, jitted)
  loss_eager = reorg_jax.aux_ota_loss(outputs, targets, HW, config)
  loss_jit = loss_fn(outputs, targets, HW, config)
  chex.assert_trees_all_close(loss_eager, loss_jit, rtol=1e-6)


def test_vmap_over_an_outer_axis():
  config, t1, o1 = scene(5, [4, 9])
  _, t2, o2 = scene(6, [12, 0])
  stacked_t = jax.tree.map(lambda a, b: jnp.stack([a, b]), t1, t2)
  stacked_o = [jnp.stack([a, b]) for a, b in zip(o1[:4], o2[:4], strict=True)]
  mapped = jax.vmap(lambda o, t: reorg_jax.assign(o, t, HW, config, coarse=True))(
    stacked_o, stacked_t
  )
  for i, (t, o) in enumerate(((t1, o1), (t2, o2))):
    single = reorg_jax.assign(o[:4], t, HW, config, coarse=True)
    chex.assert_trees_all_equal(jax.tree.map(lambda x, i=i: x[i], mapped), single)


def test_assignment_carries_no_gradient_and_aux_enters_the_loss():
  config, targets, outputs = scene(7, [6, 10])

  def iou_sum(lead):
    return jnp.sum(reorg_jax.candidate_costs(lead, targets, HW, config, coarse=False).iou)

  for g in jax.grad(iou_sum)(outputs[:4]):
    assert not np.asarray(g).any()

  grads = jax.jit(jax.grad(lambda o: reorg_jax.aux_ota_loss(o, targets, HW, config)[0]))(outputs)
  assert all(np.isfinite(np.asarray(g)).all() for g in grads)
  assert all(np.abs(np.asarray(g)).sum() > 0 for g in grads[4:]), 'aux head must get gradient'

  # Lead-guided: the aux head's own outputs never change the assignment ...
  shifted = outputs[:4] + [o + 3.0 for o in outputs[4:]]
  _, parts = loss_fn(outputs, targets, HW, config)
  _, parts_shifted = loss_fn(shifted, targets, HW, config)
  assert float(parts['total']) != float(parts_shifted['total'])
  # ... and with aux_weight = 0 the aux head contributes nothing.
  lead_only = dataclasses.replace(config, aux_weight=0.0)
  a, _ = loss_fn(outputs, targets, HW, lead_only)
  b, _ = loss_fn(shifted, targets, HW, lead_only)
  np.testing.assert_allclose(a, b, rtol=1e-6)


def test_no_boxes_by_slots_by_classes_tensor():
  """The class cost is formed without a [B, M, K, C] intermediate.

  No value in the traced program is larger than the biggest input or
  ``B * M * K``, while ``B * M * K * C`` would be 7 times that.
  """
  num_classes, max_boxes, batch = 7, 30, 2
  config, targets, outputs = scene(8, [3, 30], num_classes=num_classes, max_boxes=max_boxes)
  slots = config.num_levels * 5 * config.num_anchors * max_boxes
  jaxpr = jax.make_jaxpr(lambda o, t: reorg_jax.assign(o, t, HW, config, coarse=True))(
    outputs[:4], targets
  )
  limit = max(batch * max_boxes * slots, *(o.size for o in outputs))
  assert limit < batch * max_boxes * slots * num_classes
  shapes = [v.aval.shape for eqn in jaxpr.eqns for v in eqn.outvars]
  biggest = max(shapes, key=lambda s: int(np.prod(s)))
  assert int(np.prod(biggest)) <= limit, (biggest, limit)


def transpose_scene(targets, outputs):
  """Mirror a scene over the main diagonal: x <-> y, W <-> H, in targets and head outputs."""
  swap = jnp.asarray([1, 0, 3, 2])
  targets = targets.replace(boxes=targets.boxes[..., swap])
  channels = jnp.concatenate([swap, jnp.arange(4, outputs[0].shape[-1])])
  outputs = [jnp.swapaxes(o, 2, 3)[..., channels] for o in outputs]
  return targets, outputs


def positives(a, *, transposed=False):
  """Set of ``(image, level, anchor, row, column, box)`` of the positives of ``a``."""
  rows, cols = (a.gi, a.gj) if transposed else (a.gj, a.gi)
  return {
    (
      int(b),
      int(a.level[b, k]),
      int(a.anchor[b, k]),
      int(rows[b, k]),
      int(cols[b, k]),
      int(a.gt[b, k]),
    )
    for b, k in zip(*np.nonzero(a.positive), strict=True)
  }


def test_non_square_images_scale_x_by_width():
  """Mirroring a non-square scene mirrors the assignment.

  Upstream scales both axes by the image height for the SimOTA costs, which
  breaks this symmetry; scaling x by W and y by H keeps it.
  """
  hw = (256, 384)
  config, targets, outputs = scene(9, [12, 8], image_hw=hw)
  mirrored = dataclasses.replace(
    config, anchors=tuple(tuple((h, w) for w, h in row) for row in config.anchors)
  )
  t_targets, t_outputs = transpose_scene(targets, outputs)
  for coarse in (False, True):
    a = reorg_jax.assign(outputs[:4], targets, hw, config, coarse=coarse)
    b = reorg_jax.assign(t_outputs[:4], t_targets, hw[::-1], mirrored, coarse=coarse)
    assert a.positive.any()
    assert positives(a) == positives(b, transposed=True)
  loss_a, _ = loss_fn(outputs, targets, hw, config)
  loss_b, _ = loss_fn(t_outputs, t_targets, hw[::-1], mirrored)
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5)


def test_shape_errors_are_clear():
  config, targets, outputs = scene(10, [2, 2])
  with pytest.raises(ValueError, match='does not cover an image of 640x640'):
    reorg_jax.assign(outputs[:4], targets, (640, 640), config, coarse=False)
  with pytest.raises(ValueError, match='expected 4 level outputs, got 3'):
    reorg_jax.assign(outputs[:3], targets, HW, config, coarse=False)
  with pytest.raises(ValueError, match=r'5\+C=11'):
    reorg_jax.assign(outputs[:4], targets, HW, reorg_jax.LossConfig.p6(6), coarse=False)
  with pytest.raises(ValueError, match='4 lead then 4 auxiliary'):
    reorg_jax.aux_ota_loss(outputs[:4], targets, HW, config)


def test_config_validation():
  with pytest.raises(ValueError, match='num_classes'):
    reorg_jax.LossConfig.p6(0)
  with pytest.raises(ValueError, match='one entry per level'):
    reorg_jax.LossConfig.p6(3, balance=(4.0, 1.0))
  with pytest.raises(ValueError, match='same, non-zero number of anchors'):
    reorg_jax.LossConfig.p6(3, anchors=(((1, 2),), ((1, 2), (3, 4)), ((1, 2),), ((1, 2),)))
  config = reorg_jax.LossConfig.p6(80)
  assert hash(config) == hash(reorg_jax.LossConfig.p6(80))
  assert (config.num_levels, config.num_anchors) == (4, 3)
  assert SlotLayout(config, ((80, 80), (40, 40), (20, 20), (10, 10)), 7).num_slots == 4 * 5 * 3 * 7


def test_single_class_has_no_class_loss():
  config, targets, outputs = scene(11, [5, 5], num_classes=1)
  _, parts = loss_fn(outputs, targets, HW, config)
  assert float(parts['cls']) == 0.0 and float(parts['box']) > 0


def test_saturated_logits_keep_costs_finite():
  config, targets, outputs = scene(12, [4, 4])
  lead = [o.at[..., 4:].set(60.0) for o in outputs[:4]]
  costs = reorg_jax.candidate_costs(lead, targets, HW, config, coarse=False)
  pair = np.asarray(targets.valid)[:, :, None] & np.asarray(costs.live)[:, None, :]
  assert np.isfinite(np.asarray(costs.cost)[pair]).all()
