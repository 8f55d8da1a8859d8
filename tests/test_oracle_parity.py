"""Assignment, loss and gradients against upstream ``ComputeLossAuxOTA`` on seeded scenes.

Scenes are COCO-like (log-uniform sizes from 2 px to the full image, boxes
pushed against borders, empty images), with C = 1, 3 and 80, batches up to 8,
0..60 boxes per image and square inputs of 320..768 pixels.

Levels without any positive exercise upstream's ``'cuda:0'`` empty results;
the oracle helper redirects that device to the CPU (see ``oracle.py``).

Ties. Upstream resolves equal costs with ``torch.topk``, whose order among
equal values is unspecified on CPU (it is not index order), and equal costs
are common: two boxes that propose the same cell and anchor create two slots
with the very same prediction, hence the very same cost for every box. Where
such a tie straddles a box's dynamic-k boundary, which slot upstream takes is
arbitrary, and that can change which box a shared cell ends up trained on.
Near-ties (relative difference < 1e-5) are treated the same way, because the
two implementations sum the class cost in a different order. The tests
detect these images from the costs and exclude only them from the set
comparison, and only when they actually differ; the loss comparison of a
scene holding such an image is then skipped with the reason shown.
"""

from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import reorg_jax
from reorg_jax.loss import _assign as assigner
from reorg_jax.loss._slots import SlotLayout
from reorg_jax.reference import oracle
from reorg_jax.reference.parity import (
  matched_multiset,
  reference_multisets,
  tie_sensitive_images,
)
from reorg_jax.testing import Scene, make_scene

SCENES = [
  *(Scene(seed, 8, 640, 80, 60, empty_images=seed % 3) for seed in range(4)),
  *(Scene(seed, 4, 640, 1, 40, flat=True) for seed in range(10, 13)),
  *(Scene(seed, 2, 320, 80, 25, flat=True) for seed in range(20, 23)),
  *(Scene(seed, 3, 512, 3, 60, flat=True) for seed in range(30, 33)),
  Scene(40, 2, 768, 80, 3, flat=True),
  Scene(41, 2, 640, 80, 1, flat=True),
  Scene(42, 2, 640, 80, 0, empty_images=2, flat=True),
]


@functools.partial(jax.jit, static_argnames=('image_hw', 'config'))
def _ours(outputs, targets, image_hw, config):
  (loss, parts), grads = jax.value_and_grad(reorg_jax.aux_ota_loss, has_aux=True)(
    outputs, targets, image_hw, config
  )
  lead = outputs[: config.num_levels]
  result = {'loss': loss, 'parts': parts, 'grads': grads}
  for name, coarse in (('fine', False), ('coarse', True)):
    result[name] = reorg_jax.assign(lead, targets, image_hw, config, coarse=coarse)
    result[name + '_costs'] = reorg_jax.candidate_costs(
      lead, targets, image_hw, config, coarse=coarse
    )
  return result


@pytest.fixture(scope='module', params=SCENES, ids=str)
def scene_result(request):
  scene = request.param
  config, hw, targets, outputs = make_scene(scene)
  reference = oracle.reference_loss(config)
  p = [torch.tensor(o, requires_grad=True) for o in outputs]
  rows = torch.from_numpy(targets.to_yolo())
  imgs = torch.zeros(scene.batch, 3, *hw)
  ref = {
    'fine': reference.build_targets(p[: config.num_levels], rows, imgs),
    'coarse': reference.build_targets2(p[: config.num_levels], rows, imgs),
  }
  loss, items = reference(p, rows, imgs)
  loss.backward()
  ref['loss'] = loss.item()
  ref['items'] = items.numpy()
  ref['grads'] = [x.grad.numpy() for x in p]
  ours = _ours([jnp.asarray(o) for o in outputs], targets, hw, config)
  ties = set()
  for name in ('fine', 'coarse'):
    ties |= tie_sensitive_images(ours[name + '_costs'], ours[name].dynamic_k, targets.valid)
  return scene, targets, ours, ref, ties


@pytest.mark.parametrize('head', ['fine', 'coarse'])
def test_matched_sets_equal(scene_result, head):
  scene, targets, ours, ref, ties = scene_result
  expected = reference_multisets(ref[head], scene.batch)
  differing = []
  for image in range(scene.batch):
    got = matched_multiset(ours[head], targets, image)
    if got != expected[image]:
      differing.append(image)
  unexplained = [b for b in differing if b not in ties]
  assert not unexplained, f'{head} assignment differs from upstream in images {unexplained}'
  if differing:
    pytest.xfail(f'images {differing} differ only where costs tie; upstream order is arbitrary')


def test_loss_parts_equal(scene_result):
  scene, targets, ours, ref, ties = scene_result
  parts = ours['parts']
  got = np.asarray([parts['box'], parts['obj'], parts['cls'], parts['total']])
  if ties and not np.allclose(got, ref['items'], rtol=1e-5, atol=0):
    pytest.xfail(f'tie-dependent images {sorted(ties)} change the assignment')
  np.testing.assert_allclose(got, ref['items'], rtol=1e-5, atol=0)
  np.testing.assert_allclose(float(ours['loss']), ref['loss'], rtol=1e-5)


def test_gradients_close(scene_result):
  scene, targets, ours, ref, ties = scene_result
  worst = max(
    float(np.abs(np.asarray(g) - r).max()) for g, r in zip(ours['grads'], ref['grads'], strict=True)
  )
  scale = max(float(np.abs(r).max()) for r in ref['grads'])
  if ties and worst > 1e-5 * scale + 1e-8:
    pytest.xfail(f'tie-dependent images {sorted(ties)} change the assignment')
  for g, r in zip(ours['grads'], ref['grads'], strict=True):
    np.testing.assert_allclose(np.asarray(g), r, rtol=1e-4, atol=1e-5 * scale + 1e-8)


def test_some_levels_have_no_positive():
  """The sparse scenes really exercise upstream's empty-level path."""
  config, hw, targets, outputs = make_scene(Scene(41, 2, 640, 80, 1))
  lead = [jnp.asarray(o) for o in outputs[: config.num_levels]]
  fine = reorg_jax.assign(lead, targets, hw, config, coarse=False)
  per_level = np.bincount(
    np.asarray(fine.level)[np.asarray(fine.positive)], minlength=config.num_levels
  )
  assert (per_level == 0).any(), per_level


def test_candidates_equal_upstream_find_positive():
  """Candidate slots (before SimOTA) as upstream's find_3_positive / find_5_positive."""
  config, hw, targets, outputs = make_scene(Scene(3, 8, 640, 80, 60))
  reference = oracle.reference_loss(config)
  p = [torch.from_numpy(o) for o in outputs[: config.num_levels]]
  rows = torch.from_numpy(targets.to_yolo())
  grids = assigner.grid_shapes(outputs[: config.num_levels], config)
  layout = SlotLayout(config, grids, targets.max_boxes)
  for coarse, find in ((False, reference.find_3_positive), (True, reference.find_5_positive)):
    indices, _ = find(p, rows)
    gj, gi, live = (np.asarray(x) for x in assigner.find_candidates(targets, layout, coarse=coarse))
    level, anchor = layout.level, layout.anchor
    for lv, (b, a, j, i) in enumerate(indices):
      expected = collections.Counter(
        zip(b.tolist(), a.tolist(), j.tolist(), i.tolist(), strict=True)
      )
      bb, kk = np.nonzero(live & (level == lv))
      got = collections.Counter(
        zip(bb.tolist(), anchor[kk].tolist(), gj[bb, kk].tolist(), gi[bb, kk].tolist(), strict=True)
      )
      assert got == expected, (coarse, lv)
