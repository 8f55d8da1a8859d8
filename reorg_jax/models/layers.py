"""Building blocks of the YOLOv7 P6 family, as Flax Linen modules in NHWC.

Glossary: ``B`` batch, ``H``/``W`` feature height/width, ``I`` input channels,
``O`` output channels (``features``), ``k`` kernel size, ``s`` stride.

Every module here is a pure Linen module (``init``/``apply``). Modules with
batch normalisation take a keyword-only ``train`` flag: ``True`` normalises with
the statistics of the current batch and updates the ``batch_stats`` collection
(pass ``mutable=['batch_stats']``), ``False`` normalises with the stored running
averages. Parameter-free modules take only their input.

Numerics follow the PyTorch original, so imported weights give the same
outputs:

* convolutions pad ``k // 2`` on every side (explicit padding, not ``'SAME'``,
  which pads asymmetrically for strided convolutions);
* batch normalisation uses ``epsilon=1e-3`` and a running-average decay of
  ``0.97`` (PyTorch's ``momentum=0.03``), and, like PyTorch, stores the
  *unbiased* batch variance in the running average while normalising with the
  biased one;
* weights start from PyTorch's default convolution initialisation,
  ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``;
* max-pooling pads with ``-inf`` and floors odd sizes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from reorg_jax.models.convolution import conv_nhwc
from reorg_jax.models.pooling import max_pool_same
from reorg_jax.models.reorg import ReOrg

__all__ = [
  'BatchNorm',
  'Concat',
  'Conv',
  'DownC',
  'ImplicitA',
  'ImplicitM',
  'MaxPool',
  'ReOrg',
  'SPPCSPC',
  'Shortcut',
  'Upsample',
  'torch_default_init',
]

# PyTorch's default for conv kernels (kaiming_uniform with a=sqrt(5)) is
# U(-b, b) with b = 1/sqrt(fan_in): a uniform variance scaling of 1/3.
torch_default_init = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')


def _symmetric_padding(amount: int) -> tuple[tuple[int, int], tuple[int, int]]:
  return ((amount, amount), (amount, amount))


class BatchNorm(nn.Module):
  """Batch normalisation over all axes but the last, with PyTorch's statistics.

  ``[B, H, W, I] -> [B, H, W, I]``. Variables have Flax's usual names:
  ``params/scale``, ``params/bias``, ``batch_stats/mean``, ``batch_stats/var``.

  Attributes:
    momentum: decay of the running averages, Flax convention
      (``running = momentum * running + (1 - momentum) * batch``); PyTorch's
      ``momentum=0.03`` is ``0.97`` here.
    epsilon: added to the variance before the square root.
    axis_name: optional mapped axis over which batch statistics are averaged
      (data-parallel training); the unbiased correction then counts every
      device's elements.
  """

  momentum: float = 0.97
  epsilon: float = 1e-3
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    channels = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (channels,))
    bias = self.param('bias', nn.initializers.zeros, (channels,))
    running_mean = self.variable('batch_stats', 'mean', jnp.zeros, (channels,), jnp.float32)
    running_var = self.variable('batch_stats', 'var', jnp.ones, (channels,), jnp.float32)
    if not train:
      mean, var = running_mean.value, running_var.value
    else:
      axes = tuple(range(x.ndim - 1))
      count = math.prod(x.shape[:-1])
      if count < 2 and not self.is_initializing():
        raise ValueError(
          f'BatchNorm in training mode needs more than one value per channel, got input '
          f'shape {x.shape}'
        )
      distributed = self.axis_name is not None and not self.is_initializing()
      mean = jnp.mean(x, axis=axes)
      if distributed:
        mean = jax.lax.pmean(mean, self.axis_name)
      var = jnp.mean(jnp.square(x - mean), axis=axes)
      if distributed:
        var = jax.lax.pmean(var, self.axis_name)
        count = count * jax.lax.psum(1, self.axis_name)
      if not self.is_initializing():
        unbiased = var * (count / (count - 1))
        decay = self.momentum
        running_mean.value = decay * running_mean.value + (1 - decay) * mean
        running_var.value = decay * running_var.value + (1 - decay) * unbiased
    return (x - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias


class Conv(nn.Module):
  """Convolution without bias, batch normalisation, then SiLU.

  ``[B, H, W, I] -> [B, ceil(H/s), ceil(W/s), O]`` for odd ``k`` with the
  default padding.

  Attributes:
    features: output channels ``O``.
    kernel_size: square kernel size ``k``.
    strides: stride ``s`` in both directions.
    padding: zero padding on every side; ``None`` pads ``k // 2``.
    groups: feature groups (``I`` and ``O`` must be divisible by it).
    activation: apply SiLU after normalisation.
  """

  features: int
  kernel_size: int = 1
  strides: int = 1
  padding: int | None = None
  groups: int = 1
  activation: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    pad = self.kernel_size // 2 if self.padding is None else self.padding
    x = nn.Conv(
      self.features,
      (self.kernel_size, self.kernel_size),
      strides=(self.strides, self.strides),
      padding=_symmetric_padding(pad),
      feature_group_count=self.groups,
      use_bias=False,
      kernel_init=torch_default_init,
      conv_general_dilated=conv_nhwc,
      name='conv',
    )(x)
    x = BatchNorm(name='bn')(x, train=train)
    return nn.silu(x) if self.activation else x


def _implicit(module: nn.Module, *, channels: int, mean: float, std: float) -> jax.Array:
  """The ``[I]`` parameter ``implicit`` of an implicit layer, drawn from ``normal(mean, std)``."""
  init = nn.initializers.normal(std)
  return module.param('implicit', lambda key, shape: mean + init(key, shape), (channels,))


class ImplicitA(nn.Module):
  """Learned per-channel offset: ``[B, H, W, I] -> x + implicit``.

  ``implicit`` (``[I]``) starts from ``normal(mean, std)``.
  """

  mean: float = 0.0
  std: float = 0.02

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return x + _implicit(self, channels=x.shape[-1], mean=self.mean, std=self.std)


class ImplicitM(nn.Module):
  """Learned per-channel scale: ``[B, H, W, I] -> x * implicit``.

  ``implicit`` (``[I]``) starts from ``normal(mean, std)``.
  """

  mean: float = 1.0
  std: float = 0.02

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return x * _implicit(self, channels=x.shape[-1], mean=self.mean, std=self.std)


class MaxPool(nn.Module):
  """Square max-pooling, ``-inf`` padding: ``[B, H, W, I] -> [B, H', W', I]``.

  ``H' = floor((H + 2 * padding - window) / strides) + 1``, likewise ``W'``.
  Stride 1 with padding ``window // 2`` (the SPP pools) runs through
  :func:`reorg_jax.models.pooling.max_pool_same` (the same values; a faster
  gradient with torch's ties).
  """

  window: int
  strides: int
  padding: int

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.strides == 1 and self.window % 2 == 1 and self.padding == self.window // 2:
      return max_pool_same(x, window=self.window)
    return nn.max_pool(
      x,
      (self.window, self.window),
      strides=(self.strides, self.strides),
      padding=_symmetric_padding(self.padding),
    )


class Upsample(nn.Module):
  """Nearest-neighbour upsampling by an integer factor: ``[B, H, W, I] -> [B, sH, sW, I]``."""

  scale: int

  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.repeat(x, self.scale, axis=1)  # [B, sH, W, I]
    return jnp.repeat(x, self.scale, axis=2)  # [B, sH, sW, I]


class Concat(nn.Module):
  """Channel concatenation: ``[[B, H, W, I_j]] -> [B, H, W, sum_j I_j]``."""

  def __call__(self, xs: Sequence[jax.Array]) -> jax.Array:
    return jnp.concatenate(list(xs), axis=-1)


class Shortcut(nn.Module):
  """Sum of two equally shaped tensors: ``([B, H, W, I], [B, H, W, I]) -> [B, H, W, I]``."""

  def __call__(self, xs: Sequence[jax.Array]) -> jax.Array:
    if len(xs) != 2:
      raise ValueError(f'Shortcut adds exactly two inputs, got {len(xs)}')
    first, second = xs
    if first.shape != second.shape:
      raise ValueError(f'Shortcut inputs differ in shape: {first.shape} and {second.shape}')
    return first + second


class DownC(nn.Module):
  """Downsampling by ``s`` along two paths, concatenated.

  ``[B, H, W, I] -> [B, H/s, W/s, O]``: a ``1x1`` conv keeping ``I`` channels
  then a ``3x3`` stride-``s`` conv to ``O/2`` (``cv1``, ``cv2``), next to an
  ``s x s`` max-pool followed by a ``1x1`` conv to ``O/2`` (``cv3``).

  Attributes:
    features: output channels ``O`` (even).
    strides: downsampling factor ``s``, also the pooling window.
  """

  features: int
  strides: int = 2

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    half = self.features // 2
    conv_path = Conv(x.shape[-1], 1, 1, name='cv1')(x, train=train)
    conv_path = Conv(half, 3, self.strides, name='cv2')(conv_path, train=train)
    pool_path = MaxPool(self.strides, self.strides, 0)(x)
    pool_path = Conv(half, 1, 1, name='cv3')(pool_path, train=train)
    return jnp.concatenate([conv_path, pool_path], axis=-1)


class SPPCSPC(nn.Module):
  """Spatial pyramid pooling in a cross-stage-partial block: ``[B, H, W, I] -> [B, H, W, O]``.

  With ``hidden = int(2 * O * expansion)`` channels: one path runs
  ``cv1 (1x1) -> cv3 (3x3) -> cv4 (1x1)``, concatenates that with its stride-1
  max-pools of every size in ``pool_sizes``
  (``[B, H, W, (1 + len(pool_sizes)) * hidden]``), then
  ``cv5 (1x1) -> cv6 (3x3)``; the other path is ``cv2 (1x1)``; ``cv7 (1x1)``
  fuses both.

  Attributes:
    features: output channels ``O``.
    expansion: hidden width relative to ``2 * O``.
    pool_sizes: odd max-pool windows of the pyramid.
  """

  features: int
  expansion: float = 0.5
  pool_sizes: tuple[int, ...] = (5, 9, 13)

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    hidden = int(2 * self.features * self.expansion)
    pyramid = Conv(hidden, 1, 1, name='cv1')(x, train=train)
    pyramid = Conv(hidden, 3, 1, name='cv3')(pyramid, train=train)
    pyramid = Conv(hidden, 1, 1, name='cv4')(pyramid, train=train)
    pooled = [MaxPool(size, 1, size // 2)(pyramid) for size in self.pool_sizes]
    # [B, H, W, (1 + len(pool_sizes)) * hidden]
    pyramid = jnp.concatenate([pyramid, *pooled], axis=-1)
    pyramid = Conv(hidden, 1, 1, name='cv5')(pyramid, train=train)
    pyramid = Conv(hidden, 3, 1, name='cv6')(pyramid, train=train)
    bypass = Conv(hidden, 1, 1, name='cv2')(x, train=train)
    fused = jnp.concatenate([pyramid, bypass], axis=-1)  # [B, H, W, 2 * hidden]
    return Conv(self.features, 1, 1, name='cv7')(fused, train=train)
