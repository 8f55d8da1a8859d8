"""Stride-1 max pooling (the SPP pyramid's) with a gradient XLA:CPU runs fast, and torch's ties.

Glossary: ``B`` batch, ``H``/``W`` height/width, ``I`` channels, ``k`` window
(odd), ``r = k // 2`` padding.

``nn.max_pool``'s gradient is XLA's ``select-and-scatter`` of the pooling
window, which XLA:CPU runs as a ``reduce-window`` over (value, gradient)
pairs: in our YOLOv7-W6 step at 640 px, the three pools of ``SPPCSPC``
(``k`` = 5, 9, 13, on a 10 x 10 x 512 map) took 62 ms of backward pass, where
upstream's whole max-pooling took 10 ms (``benchmarks/step_profile.py``, 2-core
AMD EPYC). Here a ``k x k`` pool is two one-dimensional ones, over columns
then over rows, each a running maximum of ``k`` shifted slices forward and,
backward, ``k`` masked shifted additions (a ``jax.custom_vjp``).

The gradient goes where torch's ``max_pool2d`` sends it: to the first
maximum of each window in row-major order (torch takes a value only when it
is strictly greater than the maximum so far). The column pass sends each
row's gradient to its first maximum column; the row pass to the first row
holding the window's maximum: together, the first maximum in row-major
order. Windows holding equal values therefore get the gradient torch gives
them (``tests/test_pooling.py`` checks against
``torch.nn.functional.max_pool2d`` on such ties, and against ``nn.max_pool``
without ties).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ['max_pool_same']


def _shifted(padded: jax.Array, *, axis: int, start: int, size: int) -> jax.Array:
  return lax.slice_in_dim(padded, start, start + size, axis=axis)


def _pad_axis(x: jax.Array, value: float, *, axis: int, low: int, high: int) -> jax.Array:
  config = [(0, 0, 0)] * x.ndim
  config[axis] = (low, high, 0)
  return lax.pad(x, jnp.asarray(value, x.dtype), config)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _window_max(x: jax.Array, axis: int, window: int) -> jax.Array:
  """The maximum of each ``window`` consecutive values along ``axis`` (``-inf`` padded, same size)."""
  return _window_max_forward(x, axis, window)[0]


def _window_max_forward(x, axis, window):
  radius, size = window // 2, x.shape[axis]
  padded = _pad_axis(x, -jnp.inf, axis=axis, low=radius, high=radius)
  result = _shifted(padded, axis=axis, start=0, size=size)
  for offset in range(1, window):
    result = jnp.maximum(result, _shifted(padded, axis=axis, start=offset, size=size))
  return result, (padded, result)


def _window_max_backward(axis, window, residuals, gradient):
  padded, result = residuals
  radius, size = window // 2, result.shape[axis]
  claimed = jnp.zeros(result.shape, bool)
  total = None
  for offset in range(window):  # in order: the first maximum of a window takes its gradient
    hit = (_shifted(padded, axis=axis, start=offset, size=size) == result) & ~claimed
    claimed = claimed | hit
    part = jnp.where(hit, gradient, jnp.zeros((), gradient.dtype))
    placed = _pad_axis(part, 0, axis=axis, low=offset, high=window - 1 - offset)
    total = placed if total is None else total + placed
  return (_shifted(total, axis=axis, start=radius, size=size),)


_window_max.defvjp(_window_max_forward, _window_max_backward)


def max_pool_same(x: jax.Array, *, window: int) -> jax.Array:
  """``k x k`` max pooling, stride 1, ``-inf`` padding ``k // 2``: ``[B, H, W, I] -> [B, H, W, I]``.

  The values of ``nn.max_pool(x, (k, k), padding=((r, r), (r, r)))``; the
  gradient torch's (module docstring).

  Raises:
    ValueError: ``window`` is not a positive odd number.
  """
  if window < 1 or window % 2 == 0:
    raise ValueError(f'max_pool_same needs an odd window, got {window}')
  return _window_max(_window_max(x, 2, window), 1, window)
