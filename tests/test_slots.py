"""The slot layout: pinned to upstream's candidate order, and the loss's custom gradient.

Every slot index of the loss goes through ``SlotLayout``; these tests pin its
``[L, O, A, M]`` order to upstream's ``find_3_positive`` / ``find_5_positive``
and check the custom VJP against plain autodiff of the same forward, torch-free.
"""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from reorg_jax import testing
from reorg_jax.loss import _assign, _objective, _packed
from reorg_jax.loss._slots import NUM_OFFSETS, SlotLayout
from reorg_jax.reference import oracle

HW = (320, 320)
GRIDS = tuple((HW[0] // s, HW[1] // s) for s in (8, 16, 32, 64))


def test_slot_index_formula_and_centre_slots():
  config, _, _ = testing.random_scene(0, [1], max_boxes=7)
  layout = SlotLayout(config, GRIDS, 7)
  levels, anchors, boxes = config.num_levels, config.num_anchors, 7
  assert layout.num_slots == levels * NUM_OFFSETS * anchors * boxes
  k = np.arange(layout.num_slots)
  np.testing.assert_array_equal(
    ((layout.level * NUM_OFFSETS + layout.offset) * anchors + layout.anchor) * boxes + layout.box, k
  )
  centre = layout.centre_slot
  assert (layout.offset[centre] == 0).all()
  for field in (layout.level, layout.anchor, layout.box):
    np.testing.assert_array_equal(field[centre], field)
  for level in range(levels):
    assert (layout.level[layout.level_slice(level)] == level).all()
  np.testing.assert_array_equal(layout.stride, np.asarray(config.strides)[layout.level])


def test_cell_rows_index_the_concatenated_outputs():
  """``cell_row`` and ``level_row`` find each cell in the heads' ``[B, A, H_l, W_l, F]`` tables."""
  config, targets, outputs = testing.random_scene(1, [9, 3], max_boxes=9)
  layout = SlotLayout(config, GRIDS, targets.max_boxes)
  gj, gi, _ = _assign.find_candidates(targets, layout, coarse=True)
  lead = outputs[: config.num_levels]
  slot = jnp.broadcast_to(jnp.arange(layout.num_slots), gj.shape)
  table = jnp.concatenate([o.reshape(o.shape[0], -1, o.shape[-1]) for o in lead], axis=1)
  assert table.shape[1] == layout.num_cells
  rows = jnp.take_along_axis(table, layout.cell_row(slot, gj, gi)[..., None], axis=1)
  level, anchor = layout.level, layout.anchor
  expected = np.stack(
    [
      np.asarray(lead[level[k]])[b, anchor[k], int(gj[b, k]), int(gi[b, k])]
      for b in range(gj.shape[0])
      for k in range(layout.num_slots)
    ]
  ).reshape(rows.shape)
  np.testing.assert_array_equal(rows, expected)
  np.testing.assert_array_equal(_assign.gather_cells(lead, layout, gj, gi), expected)


@pytest.mark.parametrize('coarse', [False, True], ids=['fine', 'coarse'])
def test_live_slots_follow_upstream_candidate_order(coarse):
  """Per image and level, live slots in slot order are upstream's candidates in list order.

  Upstream lists a level's candidates offset-major, then by anchor, then by
  label row (image-major); restricted to one image, that is slot order.
  """
  config, targets, outputs = testing.random_scene(2, [8, 0, 5, 8], num_classes=4, max_boxes=8)
  layout = SlotLayout(config, GRIDS, targets.max_boxes)
  reference = oracle.reference_loss(config)
  lead = [torch.from_numpy(np.array(o)) for o in outputs[: config.num_levels]]
  rows = torch.from_numpy(targets.to_yolo())
  find = reference.find_5_positive if coarse else reference.find_3_positive
  indices, _ = find(lead, rows)
  gj, gi, live = (np.asarray(x) for x in _assign.find_candidates(targets, layout, coarse=coarse))
  compared = 0
  for level, (b, a, j, i) in enumerate(indices):
    upstream = np.stack([t.numpy() for t in (b, a, j, i)], axis=1)
    part = layout.level_slice(level)
    for image in range(targets.batch_size):
      expected = upstream[upstream[:, 0] == image][:, 1:].tolist()
      k = np.flatnonzero(live[image, part]) + part.start
      got = np.stack([layout.anchor[k], gj[image, k], gi[image, k]], axis=1).tolist()
      assert got == expected, (level, image)
      compared += len(got)
  assert compared > 100


def _plain_loss_parts(outputs, slots, targets, layout, image_hw):
  """The forward of ``_loss_parts`` without its custom VJP, for ``jax.grad``."""
  terms = _objective._capacity_switch(
    _objective._group_terms, outputs, slots, targets, layout, image_hw
  )
  sparse, _ = _objective._weighted(terms, outputs, layout)
  dense, _ = _objective._dense_objectness(outputs, layout)
  return sparse + dense


def _shared_cells(assignment) -> int:
  """Cells trained by more than one positive of one head."""
  key = np.stack([np.asarray(getattr(assignment, n)) for n in ('level', 'anchor', 'gj', 'gi')], -1)
  positive = np.asarray(assignment.positive)
  shared = 0
  for image in range(positive.shape[0]):
    cells = collections.Counter(map(tuple, key[image, positive[image]]))
    shared += sum(count > 1 for count in cells.values())
  return shared


# One loss branch to compile (testing.ONE_BRANCH); the default speed settings run in the first
# case (the gradient does not depend on them: tests/test_compact.py).
_FLAT = testing.ONE_BRANCH


@pytest.mark.parametrize(
  'seed, counts, overrides, jit',
  [
    (3, [12, 5, 0], {}, True),
    (4, [12, 12], {'label_smoothing': 0.1, 'cls_pw': 1.5, 'obj_pw': 0.7, 'gr': 0.5, **_FLAT}, True),
    # Box centres on cell corners: lead-head entries share their coarse source's cell.
    (2, [12, 9, 3, 12], {'corner_centres': True, 'num_classes': 3, **_FLAT}, True),
    (2, [12, 9, 3, 12], {'corner_centres': True, 'num_classes': 3, **_FLAT}, False),
    (5, [12, 12, 7], {'num_classes': 1, **_FLAT}, True),
  ],
  ids=['default', 'weighted', 'corner_centres', 'corner_centres-no_jit', 'one_class'],
)
def test_custom_vjp_equals_autodiff_of_the_forward(seed, counts, overrides, jit):
  """The backward pass (objectness everywhere; box, objectness and class at the entries' cells)
  equals autodiff of the forward, also where several positives train one cell."""
  config, targets, outputs = testing.random_scene(seed, counts, **overrides)
  layout = SlotLayout(config, _assign.grid_shapes(outputs[: config.num_levels], config), 12)
  slots = _packed.head_slots(targets, layout)
  cotangent = jnp.asarray(np.random.default_rng(seed).uniform(0.5, 2.0, (2, 3)), jnp.float32)

  def custom(outs):
    return jnp.sum(cotangent * _objective._loss_parts(tuple(outs), slots, targets, layout, HW))

  def plain(outs):
    return jnp.sum(cotangent * _plain_loss_parts(tuple(outs), slots, targets, layout, HW))

  wrap = jax.jit if jit else (lambda f: f)
  value, grads = wrap(jax.value_and_grad(custom))(outputs)
  plain_value, plain_grads = wrap(jax.value_and_grad(plain))(outputs)
  np.testing.assert_allclose(value, plain_value, rtol=1e-6)
  scale = max(float(jnp.max(jnp.abs(g))) for g in plain_grads)
  for got, want in zip(grads, plain_grads, strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale)
  assert sum(int(jnp.sum(g[..., :4] != 0)) for g in plain_grads) > 0
  if config.num_classes > 1:
    assert sum(int(jnp.sum(g[..., 5:] != 0)) for g in plain_grads) > 0
  if overrides.get('corner_centres'):
    # Several positives of one head train one cell (lead entries on their coarse source's).
    lead = outputs[: config.num_levels]
    assert _shared_cells(_assign.assign(lead, targets, HW, config, coarse=False)) > 0
