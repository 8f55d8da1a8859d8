"""Stride-1 max pooling: ``nn.max_pool``'s values, torch's gradient, ties included."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from reorg_jax.models.pooling import max_pool_same


def _torch_pool_gradient(x: np.ndarray, cotangent: np.ndarray, window: int) -> np.ndarray:
  """torch's ``max_pool2d`` gradient of ``[B, H, W, I]`` arrays (NHWC in and out)."""
  tx = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
  out = torch.nn.functional.max_pool2d(tx, window, stride=1, padding=window // 2)
  out.backward(torch.tensor(cotangent.transpose(0, 3, 1, 2)))
  return tx.grad.numpy().transpose(0, 2, 3, 1)


def _pool_and_gradient(pool, x, cotangent):
  out, vjp = jax.vjp(pool, x)
  return out, vjp(cotangent)[0]


@pytest.mark.parametrize('window', [1, 3, 5, 9, 13])
@pytest.mark.parametrize('jitted', [False, True], ids=['eager', 'jit'])
def test_values_and_gradient_without_ties_match_max_pool(window, jitted):
  rng = np.random.default_rng(window)
  x = jnp.asarray(rng.standard_normal((2, 7, 10, 3)), jnp.float32)  # wider than tall
  cotangent = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
  r = window // 2

  def ours(x):
    return max_pool_same(x, window=window)

  def flax_pool(x):
    return nn.max_pool(x, (window, window), strides=(1, 1), padding=((r, r), (r, r)))

  run = jax.jit(_pool_and_gradient, static_argnums=0) if jitted else _pool_and_gradient
  out, grad = run(ours, x, cotangent)
  want_out, want_grad = _pool_and_gradient(flax_pool, x, cotangent)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(want_out))
  np.testing.assert_allclose(np.asarray(grad), np.asarray(want_grad), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(
    np.asarray(grad), _torch_pool_gradient(np.asarray(x), np.asarray(cotangent), window), atol=1e-5
  )


@pytest.mark.parametrize('window', [3, 5, 13])
def test_ties_take_the_gradient_where_torch_sends_it(window):
  """Few distinct values: most windows hold their maximum more than once."""
  rng = np.random.default_rng(100 + window)
  x = rng.integers(0, 3, size=(2, 9, 8, 4)).astype(np.float64)
  x[0, :, :, 0] = 1.0  # one channel constant: every window ties everywhere
  cotangent = rng.standard_normal(x.shape)
  with jax.enable_x64(True):
    out, grad = _pool_and_gradient(
      lambda v: max_pool_same(v, window=window), jnp.asarray(x), jnp.asarray(cotangent)
    )
  want = _torch_pool_gradient(x, cotangent, window)
  np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-12, atol=1e-12)
  tx = torch.tensor(x.transpose(0, 3, 1, 2))
  torch_out = torch.nn.functional.max_pool2d(tx, window, stride=1, padding=window // 2)
  np.testing.assert_array_equal(np.asarray(out), torch_out.numpy().transpose(0, 2, 3, 1))


def test_even_window_is_refused():
  with pytest.raises(ValueError, match='odd window, got 4'):
    max_pool_same(jnp.zeros((1, 4, 4, 1)), window=4)
