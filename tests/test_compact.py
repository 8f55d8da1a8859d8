"""Packed candidate lists: the loss's assignment equals ``assign`` at every capacity."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reorg_jax
from reorg_jax import testing
from reorg_jax.loss import _assign as assigner
from reorg_jax.loss import _packed as compact
from reorg_jax.loss._slots import SlotLayout

HW = (320, 320)


def scene(seed, counts, *, on_corners=False, **kwargs):
  return testing.random_scene(seed, counts, corner_centres=on_corners, **kwargs)


def packed_assignments(lead, targets, image_hw, config, capacity):
  layout = SlotLayout(config, assigner.grid_shapes(lead, config), targets.max_boxes)
  slots = compact.head_slots(targets, layout)
  slot, filled = compact.pack(slots.live, capacity)
  preds = compact.rows_at(lead, slot, slots, layout)
  return slots, compact.assign_packed(preds, slot, filled, slots, targets, image_hw, layout)


CASES = {
  'mixed': dict(seed=0, counts=[12, 7, 0, 1]),
  'crowded': dict(seed=1, counts=[12, 12, 12, 12]),
  'cell_corners': dict(seed=2, counts=[12, 9, 3, 12], on_corners=True),
  'non_square': dict(seed=3, counts=[5, 12, 8], image_hw=(256, 384)),
}


@pytest.mark.parametrize('case', CASES)
def test_packed_assignment_equals_assign_at_every_capacity(case):
  kwargs = dict(CASES[case])
  image_hw = kwargs.get('image_hw', HW)
  config, targets, outputs = scene(**kwargs)
  lead = outputs[:4]
  layout = SlotLayout(config, assigner.grid_shapes(lead, config), targets.max_boxes)
  num_slots = layout.num_slots
  needed = int(jnp.max(jnp.sum(compact.head_slots(targets, layout).live, axis=1)))
  want = {
    coarse: reorg_jax.assign(lead, targets, image_hw, config, coarse=coarse)
    for coarse in (False, True)
  }
  ladder = compact.capacities(num_slots, config)
  tested = [c for c in ladder if c >= needed]
  assert len(tested) >= 2
  for capacity in tested:
    _, (fine, coarse) = packed_assignments(lead, targets, image_hw, config, capacity)
    for packed, expected in ((fine, want[False]), (coarse, want[True])):
      positive, gt = packed.scatter(num_slots)
      np.testing.assert_array_equal(positive, expected.positive)
      np.testing.assert_array_equal(
        jnp.where(positive, gt, -1), jnp.where(positive, expected.gt, -1)
      )
      np.testing.assert_array_equal(packed.dynamic_k, expected.dynamic_k)


@pytest.mark.parametrize('on_corners', [False, True])
def test_fine_slots_sit_on_live_coarse_cells(on_corners):
  config, targets, outputs = scene(4, [12, 12, 5, 0], on_corners=on_corners)
  layout = SlotLayout(config, assigner.grid_shapes(outputs[:4], config), targets.max_boxes)
  slots = compact.head_slots(targets, layout)
  fine_gj, fine_gi, fine_live = assigner.find_candidates(targets, layout, coarse=False)
  fine_live = np.asarray(fine_live)
  source = np.asarray(slots.fine_source)
  rows = np.arange(source.shape[0])[:, None]
  assert (np.asarray(slots.live)[rows, source][fine_live]).all()
  np.testing.assert_array_equal(np.asarray(slots.gj)[rows, source][fine_live], fine_gj[fine_live])
  np.testing.assert_array_equal(np.asarray(slots.gi)[rows, source][fine_live], fine_gi[fine_live])
  # Fine candidates are coarse candidates of the same slot, so the coarse count bounds both.
  assert not (fine_live & ~np.asarray(slots.live)).any()
  moved = fine_live & (source != np.arange(source.shape[1]))
  assert moved.any() == on_corners


def test_pack_keeps_slot_order_and_capacity_index_picks_smallest_fit():
  live = jnp.asarray([[0, 1, 1, 0, 1, 0, 0, 1], [1, 0, 0, 0, 0, 0, 0, 0]], bool)
  slot, filled = compact.pack(live, 5)
  np.testing.assert_array_equal(slot[0, :4], [1, 2, 4, 7])
  np.testing.assert_array_equal(filled, [[1, 1, 1, 1, 0], [1, 0, 0, 0, 0]])
  assert int(slot[1, 0]) == 0
  assert int(compact.capacity_index(live, (2, 4, 8))) == 1
  assert int(compact.capacity_index(live, (4, 8))) == 0
  assert int(compact.capacity_index(jnp.ones((2, 8), bool), (2, 4, 8))) == 2


def test_capacity_ladder():
  config = reorg_jax.LossConfig.p6(80)
  ladder = compact.capacities(1800, config)
  assert ladder == tuple(sorted(set(ladder)))
  assert ladder[-1] == 1800
  assert all(c % 8 == 0 for c in ladder)
  assert compact.capacities(60, dataclasses.replace(config, capacity_fractions=())) == (60,)
  with pytest.raises(ValueError, match='capacity_fractions'):
    dataclasses.replace(config, capacity_fractions=(0.5, 1.0))
  with pytest.raises(ValueError, match='batch_groups'):
    dataclasses.replace(config, batch_groups=0)


# One jitted function for every setting, so the default configuration compiles once.
_value_and_grad = jax.jit(
  jax.value_and_grad(reorg_jax.aux_ota_loss, has_aux=True), static_argnums=(2, 3)
)


@pytest.fixture(scope='module')
def speed_scene():
  """The scene of the speed-settings test and its loss, parts and gradients at the defaults."""
  config, targets, outputs = scene(5, [12, 3, 0, 9], num_classes=3)
  return config, targets, outputs, _value_and_grad(outputs, targets, HW, config)


@pytest.mark.parametrize(
  'setting',
  [
    {'capacity_fractions': ()},
    {'capacity_fractions': (0.999,)},
    {'batch_groups': 1},
    # Uneven groups of 1, 1 and 2 images. Three rungs (48, 136, 720 slots) instead of six
    # keep the branches to compile few; the images hold 105, 60, 0 and 60 live slots, so
    # every group runs a packed branch, and below the empty image runs the 48 one alone.
    {'batch_groups': 3, 'capacity_fractions': (0.0625, 0.1875)},
    # More groups than images: one image each.
    {'batch_groups': 7, 'capacity_fractions': (0.0625, 0.1875)},
  ],
)
def test_loss_and_gradient_do_not_depend_on_speed_settings(speed_scene, setting):
  config, targets, outputs, ((loss, parts), grads) = speed_scene
  (other_loss, other_parts), other_grads = _value_and_grad(
    outputs, targets, HW, dataclasses.replace(config, **setting)
  )
  np.testing.assert_allclose(other_loss, loss, rtol=1e-6)
  for key in parts:
    np.testing.assert_allclose(other_parts[key], parts[key], rtol=1e-6, atol=1e-9)
  for g, h in zip(grads, other_grads, strict=True):
    np.testing.assert_allclose(h, g, rtol=1e-5, atol=1e-9)
