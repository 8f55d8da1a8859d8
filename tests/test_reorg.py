"""ReOrg against upstream's module, and why the channel order matters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from sas_yolov7.models.common import ReOrg as ReferenceReOrg

import reorg_jax


def _nchw_to_nhwc(x: np.ndarray) -> np.ndarray:
  return np.transpose(x, (0, 2, 3, 1))


@pytest.mark.parametrize('shape', [(2, 3, 8, 6), (1, 1, 2, 2), (3, 5, 16, 32)])
@pytest.mark.parametrize('use_jit', [False, True])
def test_equals_upstream_bit_for_bit(shape, use_jit):
  x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  expected = ReferenceReOrg()(torch.from_numpy(x)).numpy()
  fn = jax.jit(reorg_jax.reorg) if use_jit else reorg_jax.reorg
  got = np.asarray(fn(jnp.asarray(_nchw_to_nhwc(x))))
  np.testing.assert_array_equal(got, _nchw_to_nhwc(expected))


def test_linen_module_is_parameter_free():
  x = jnp.arange(2 * 4 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 4, 3)
  module = reorg_jax.ReOrg()
  variables = module.init(jax.random.key(0), x)
  assert jax.tree.leaves(variables) == []
  np.testing.assert_array_equal(module.apply(variables, x), reorg_jax.reorg(x))


def test_channel_order_spelled_out():
  # One channel, 2x2 image: the four output channels are the pixels
  # (row 0, col 0), (row 1, col 0), (row 0, col 1), (row 1, col 1).
  x = jnp.asarray([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 2, 2, 1)
  np.testing.assert_array_equal(reorg_jax.reorg(x).reshape(-1), [1.0, 3.0, 2.0, 4.0])


def test_view_permute_space_to_depth_differs():
  """The usual reshape/transpose space-to-depth permutes channels differently."""
  batch, height, width, channels = 1, 4, 4, 3
  x = jnp.arange(batch * height * width * channels, dtype=jnp.float32)
  x = x.reshape(batch, height, width, channels)
  blocks = x.reshape(batch, height // 2, 2, width // 2, 2, channels)
  view_permute = blocks.transpose(0, 1, 3, 2, 4, 5).reshape(batch, height // 2, width // 2, -1)
  ours = reorg_jax.reorg(x)
  assert ours.shape == view_permute.shape
  assert not np.array_equal(ours, view_permute)
  # Same values per output pixel, in another channel order: a 1x1 conv trained on
  # one order would read shuffled inputs under the other.
  np.testing.assert_array_equal(np.sort(ours, axis=-1), np.sort(view_permute, axis=-1))


@pytest.mark.parametrize('shape', [(1, 3, 4, 2), (1, 4, 5, 2), (4, 4, 2)])
def test_bad_shapes_raise_at_trace_time(shape):
  with pytest.raises(ValueError, match='reorg'):
    jax.jit(reorg_jax.reorg).lower(jax.ShapeDtypeStruct(shape, jnp.float32))
