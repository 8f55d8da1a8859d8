"""The loss's assignment statistics: positives per image of each head.

:func:`reorg_jax.aux_ota_loss` reports ``lead_positives`` and
``aux_positives``, the SimOTA positives it trains on, counted from its own
packed assignment. They must be the positives of the dense reference
assignment (:func:`reorg_jax.assign`, ``coarse=False`` for the lead head,
``coarse=True`` for the auxiliary head), per image of the batch, on the
forward path and on the gradient path (which computes the terms in other
functions), jitted or not. The step-level metrics (with ``boxes_per_image``)
are checked in ``tests/test_freeze.py``.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

import reorg_jax
from reorg_jax import testing

HW = (320, 320)
_FLAT = testing.ONE_BRANCH  # one loss branch to compile instead of twelve


def _expected(outputs, targets, config) -> dict[str, int]:
  """Positives of the batch (not per image) of each head's reference assignment."""
  lead = outputs[: config.num_levels]
  return {
    key: int(np.asarray(reorg_jax.assign(lead, targets, HW, config, coarse=coarse).positive).sum())
    for key, coarse in (('lead_positives', False), ('aux_positives', True))
  }


def _check(parts, expected: dict[str, int], batch: int) -> None:
  """Per image: the count over ``B`` in float32 (to its rounding), and the count itself exactly."""
  for key, count in expected.items():
    assert parts[key].shape == () and parts[key].dtype == np.float32
    np.testing.assert_allclose(parts[key], count / batch, rtol=1e-6, err_msg=key)
    assert round(float(parts[key]) * batch) == count, key


@pytest.mark.parametrize(
  'seed, counts, overrides, jit',
  [
    # Two image groups and a capacity ladder of two rungs (the default has more rungs, each
    # another branch to compile; the counts come from the same code in every branch).
    (3, [12, 5, 0], {'batch_groups': 2, 'capacity_fractions': (0.25,)}, True),
    (2, [12, 9, 3, 12], {'corner_centres': True, 'num_classes': 3, **_FLAT}, True),
    (5, [7, 12, 1], {'num_classes': 1, **_FLAT}, False),
  ],
  ids=['groups_and_ladder', 'corner_centres', 'one_class-no_jit'],
)
def test_positives_per_image_equal_the_reference_assignment(seed, counts, overrides, jit):
  config, targets, outputs = testing.random_scene(seed, counts, **overrides)
  expected = _expected(outputs, targets, config)
  assert expected['lead_positives'] > 0 and expected['aux_positives'] > 0

  def loss(outs):
    return reorg_jax.aux_ota_loss(outs, targets, HW, config)

  wrap = jax.jit if jit else (lambda f: f)
  (_, parts), grads = wrap(jax.value_and_grad(loss, has_aux=True))(outputs)
  _check(parts, expected, targets.batch_size)
  assert all(np.isfinite(np.asarray(g)).all() for g in grads)
  if overrides.get('corner_centres'):  # the forward path (no gradient) counts the same
    _, forward = jax.jit(loss)(outputs)
    _check(forward, expected, targets.batch_size)


def test_positives_carry_no_gradient():
  config, targets, outputs = testing.random_scene(6, [6, 3], num_classes=2, **_FLAT)

  def positives(outs):
    _, parts = reorg_jax.aux_ota_loss(outs, targets, HW, config)
    return parts['lead_positives'] + parts['aux_positives']

  grads = jax.grad(positives)(outputs)
  assert not any(np.asarray(g).any() for g in grads)
