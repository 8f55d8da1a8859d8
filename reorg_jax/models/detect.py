"""The detection heads: IAuxDetect (lead and auxiliary) and IDetect (lead only), decoding, fusing.

Glossary: ``B`` batch, ``L`` levels, ``A`` anchors per level, ``C`` classes,
``F = 5 + C`` features of a head row (``x, y, w, h, objectness, C class
logits``), ``H_l``/``W_l`` grid of level ``l``, ``I_l`` input channels of
level ``l``, ``R = A * sum_l H_l * W_l`` decoded rows (boxes) per image.

:class:`IAuxDetect`, the training head, receives ``2L`` feature maps: ``L``
for the lead head then ``L`` for the auxiliary head, level ``l`` of both at
the same resolution. Per level, the lead head is ``ImplicitA -> 1x1 conv ->
ImplicitM`` (variables ``ia_l``, ``m_l``, ``im_l``), the auxiliary head a
plain ``1x1`` conv (``m2_l``). Both map to ``A * F`` channels, read as ``A``
groups of ``F`` (anchor-major, like the original), and are returned as
``[B, A, H_l, W_l, F]`` raw logits.

:class:`IDetect`, the deploy head, is the lead head alone over ``L`` feature
maps: with ``implicit=True`` as above (the original's ``IDetect``), with
``implicit=False`` the plain ``1x1`` convs (the original's ``Detect``, what
the lead head becomes once :func:`fuse_implicit` folded its implicit layers
into the convs). Its decoded outputs are those of the :class:`IAuxDetect` it
came from.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from reorg_jax.models.convolution import conv_nhwc
from reorg_jax.models.layers import ImplicitA, ImplicitM, torch_default_init

__all__ = ['IAuxDetect', 'IDetect', 'decode', 'decode_cxcywh', 'fuse_implicit', 'head_bias_prior']

Anchors = tuple[tuple[tuple[float, float], ...], ...]


def head_bias_prior(*, stride: float, num_anchors: int, num_classes: int) -> jax.Array:
  """Initial bias offsets of a detection conv: ``[A * F]``.

  Objectness starts at ``log(8 / (640 / stride)^2)`` (about eight objects in a
  640x640 image) and every class logit at ``log(0.6 / (C - 0.99))``; box terms
  at zero.
  """
  objectness = math.log(8 / (640 / stride) ** 2)
  classes = math.log(0.6 / (num_classes - 0.99))
  per_anchor = jnp.concatenate(
    [jnp.zeros(4), jnp.full(1, objectness), jnp.full(num_classes, classes)]
  )  # [F]
  return jnp.tile(per_anchor, num_anchors)  # [A * F]


def _prior_bias_init(*, fan_in: int, prior: jax.Array) -> nn.initializers.Initializer:
  bound = 1 / math.sqrt(fan_in)

  def init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound) + prior.astype(dtype)

  return init


def _split_anchors(x: jax.Array, num_anchors: int) -> jax.Array:
  """``[B, H_l, W_l, A * F] -> [B, A, H_l, W_l, F]``."""
  batch, height, width, channels = x.shape
  x = x.reshape(batch, height, width, num_anchors, channels // num_anchors)  # [B, H_l, W_l, A, F]
  return x.transpose(0, 3, 1, 2, 4)  # [B, A, H_l, W_l, F]


def _head_conv(
  x: jax.Array, *, stride: float, num_anchors: int, num_classes: int, name: str
) -> jax.Array:
  """A head's ``1x1`` conv (created in the calling module): ``[B, H_l, W_l, I_l] -> [B, H_l, W_l, A * F]``."""
  prior = head_bias_prior(stride=stride, num_anchors=num_anchors, num_classes=num_classes)
  conv = nn.Conv(
    num_anchors * (5 + num_classes),
    (1, 1),
    kernel_init=torch_default_init,
    bias_init=_prior_bias_init(fan_in=x.shape[-1], prior=prior),
    conv_general_dilated=conv_nhwc,
    name=name,
  )
  return conv(x)


def _lead_level(
  x: jax.Array, *, level: int, implicit: bool, stride: float, num_anchors: int, num_classes: int
) -> jax.Array:
  """One level of the lead head: ``[B, H_l, W_l, I_l] -> [B, A, H_l, W_l, F]`` raw logits.

  ``[ImplicitA ->] 1x1 conv [-> ImplicitM]`` with variables ``[ia_l,] m_l[, im_l]``.
  """
  if implicit:
    x = ImplicitA(name=f'ia_{level}')(x)
  x = _head_conv(
    x, stride=stride, num_anchors=num_anchors, num_classes=num_classes, name=f'm_{level}'
  )  # [B, H_l, W_l, A * F]
  if implicit:
    x = ImplicitM(name=f'im_{level}')(x)
  return _split_anchors(x, num_anchors)


def decode_cxcywh(
  sigmoids: jax.Array,
  *,
  anchor_wh: jax.Array,
  cell_xy: jax.Array | None = None,
  stride: jax.Array | float | None = None,
) -> jax.Array:
  """The head's box parameterisation: ``[..., 4]`` sigmoids to ``[..., 4]`` ``cxcywh`` boxes.

  ``xy = 2 s_xy - 0.5 (+ cell_xy)`` and ``wh = (2 s_wh)^2 * anchor_wh``, both
  then times ``stride``. The one decode of the package: inference, the
  assignment and the box loss all call it.

  Args:
    sigmoids: ``[..., 4]`` sigmoids of the raw ``x, y, w, h`` logits.
    anchor_wh: ``[..., 2]`` (broadcastable) anchor sizes in grid cells.
    cell_xy: ``[..., 2]`` (broadcastable) cell column and row; without it the
      centre is relative to the cell's corner.
    stride: pixels per cell (broadcastable); without it the boxes are in grid
      cells. Multiplying the anchor in cells by a power-of-two stride is exact,
      so with upstream's strides the result equals upstream's
      ``(2 s)^2 * anchor_pixels`` bit for bit.
  """
  xy = sigmoids[..., 0:2] * 2.0 - 0.5
  if cell_xy is not None:
    xy = xy + cell_xy
  wh = (sigmoids[..., 2:4] * 2.0) ** 2 * anchor_wh
  if stride is not None:
    xy, wh = xy * stride, wh * stride
  return jnp.concatenate([xy, wh], axis=-1)


def decode(
  outputs: Sequence[jax.Array], *, anchors: Anchors, strides: Sequence[float]
) -> jax.Array:
  """Turns raw lead outputs into pixel boxes and probabilities.

  Args:
    outputs: ``L`` raw head outputs, each ``[B, A, H_l, W_l, F]``.
    anchors: per level, ``A`` anchor ``(width, height)`` pairs in pixels.
    strides: per level, pixels per grid cell.

  Returns:
    ``[B, R, F]``: box centre ``x, y`` and size ``w, h`` in input pixels, then
    objectness and class probabilities (sigmoids), levels in order and, within
    a level, ordered by anchor, row, column.
  """
  if not len(outputs) == len(anchors) == len(strides):
    raise ValueError(
      f'decode needs one anchor set and stride per output, got {len(outputs)} outputs, '
      f'{len(anchors)} anchor sets and {len(strides)} strides'
    )
  decoded = []
  for out, level_anchors, stride in zip(outputs, anchors, strides, strict=True):
    batch, num_anchors, height, width, features = out.shape
    if len(level_anchors) != num_anchors:
      raise ValueError(f'output has {num_anchors} anchors, anchor set has {len(level_anchors)}')
    y = jax.nn.sigmoid(out)
    cols, rows = jnp.meshgrid(jnp.arange(width), jnp.arange(height))  # [H, W] each
    grid = jnp.stack([cols, rows], axis=-1).astype(y.dtype)  # [H, W, 2]
    anchor_wh = jnp.asarray(level_anchors, y.dtype)[:, None, None, :] / stride  # [A, 1, 1, 2]
    boxes = decode_cxcywh(y[..., :4], anchor_wh=anchor_wh, cell_xy=grid, stride=stride)
    y = jnp.concatenate([boxes, y[..., 4:]], axis=-1)  # [B, A, H_l, W_l, F]
    decoded.append(y.reshape(batch, num_anchors * height * width, features))  # [B, A*H*W, F]
  return jnp.concatenate(decoded, axis=1)  # [B, R, F]


class IAuxDetect(nn.Module):
  """Lead and auxiliary detection head over ``L`` levels.

  Call with ``2L`` feature maps (lead levels, then auxiliary levels), each
  ``[B, H_l, W_l, I_l]``.

  * ``train=True``: a tuple of ``2L`` raw outputs, ``L`` lead then ``L``
    auxiliary, each ``[B, A, H_l, W_l, F]``.
  * ``train=False``: the auxiliary convs are not run (they are still created by
    ``init``); returns the decoded lead outputs ``[B, R, F]`` (see
    :func:`decode`).

  Attributes:
    num_classes: ``C``.
    anchors: per level, ``A`` anchor ``(width, height)`` pairs in pixels.
    strides: per level, pixels per grid cell.
    fused: the implicit layers have been folded into the lead convs by
      :func:`fuse_implicit`, so ``ia_l`` and ``im_l`` do not exist.
  """

  num_classes: int
  anchors: Anchors
  strides: tuple[int, ...]
  fused: bool = False

  @property
  def num_levels(self) -> int:
    return len(self.anchors)

  @property
  def num_anchors(self) -> int:
    return len(self.anchors[0])

  def _conv(self, x: jax.Array, *, level: int, name: str) -> jax.Array:
    return _head_conv(
      x,
      stride=self.strides[level],
      num_anchors=self.num_anchors,
      num_classes=self.num_classes,
      name=name,
    )  # [B, H_l, W_l, A * F]

  @nn.compact
  def __call__(
    self, features: Sequence[jax.Array], *, train: bool
  ) -> tuple[jax.Array, ...] | jax.Array:
    levels = self.num_levels
    if len(self.strides) != levels:
      raise ValueError(f'{levels} anchor sets but {len(self.strides)} strides')
    if len(features) != 2 * levels:
      raise ValueError(
        f'IAuxDetect with {levels} levels takes {2 * levels} feature maps '
        f'({levels} lead, {levels} auxiliary), got {len(features)}'
      )
    lead = [
      _lead_level(
        features[level],
        level=level,
        implicit=not self.fused,
        stride=self.strides[level],
        num_anchors=self.num_anchors,
        num_classes=self.num_classes,
      )
      for level in range(levels)
    ]  # L x [B, A, H_l, W_l, F]
    if not (train or self.is_initializing()):
      return decode(lead, anchors=self.anchors, strides=self.strides)  # [B, R, F]
    aux = []
    for level in range(levels):
      lead_shape, aux_shape = features[level].shape[:3], features[levels + level].shape[:3]
      if lead_shape != aux_shape:
        raise ValueError(
          f'level {level}: lead features are {lead_shape} (B, H, W) but auxiliary features '
          f'are {aux_shape}'
        )
      x = self._conv(features[levels + level], level=level, name=f'm2_{level}')
      aux.append(_split_anchors(x, self.num_anchors))  # [B, A, H_l, W_l, F]
    if not train:
      return decode(lead, anchors=self.anchors, strides=self.strides)  # [B, R, F]
    return (*lead, *aux)


class IDetect(nn.Module):
  """The lead detection head alone over ``L`` levels: the deploy head.

  Call with ``L`` feature maps, each ``[B, H_l, W_l, I_l]``.

  * ``train=True``: a tuple of ``L`` raw outputs, each ``[B, A, H_l, W_l, F]``.
  * ``train=False``: the decoded outputs ``[B, R, F]`` (see :func:`decode`).

  A model ending in this head does not train here (the loss needs the
  auxiliary outputs); it is what :func:`reorg_jax.models.deploy.deploy` makes
  of a trained :class:`IAuxDetect` model, and what upstream's deploy files
  hold.

  Attributes:
    num_classes: ``C``.
    anchors: per level, ``A`` anchor ``(width, height)`` pairs in pixels.
    strides: per level, pixels per grid cell.
    implicit: each level is ``ImplicitA -> 1x1 conv -> ImplicitM`` (variables
      ``ia_l``, ``m_l``, ``im_l``; the original's ``IDetect``); without, the
      ``1x1`` conv ``m_l`` alone (the original's ``Detect``).
  """

  num_classes: int
  anchors: Anchors
  strides: tuple[int, ...]
  implicit: bool = False

  @property
  def num_levels(self) -> int:
    return len(self.anchors)

  @property
  def num_anchors(self) -> int:
    return len(self.anchors[0])

  @nn.compact
  def __call__(
    self, features: Sequence[jax.Array], *, train: bool
  ) -> tuple[jax.Array, ...] | jax.Array:
    levels = self.num_levels
    if len(self.strides) != levels:
      raise ValueError(f'{levels} anchor sets but {len(self.strides)} strides')
    if len(features) != levels:
      raise ValueError(
        f'IDetect with {levels} levels takes {levels} feature maps, got {len(features)}'
      )
    lead = tuple(
      _lead_level(
        features[level],
        level=level,
        implicit=self.implicit,
        stride=self.strides[level],
        num_anchors=self.num_anchors,
        num_classes=self.num_classes,
      )
      for level in range(levels)
    )  # L x [B, A, H_l, W_l, F]
    if train:
      return lead
    return decode(lead, anchors=self.anchors, strides=self.strides)  # [B, R, F]


def fuse_implicit(head_params: dict, *, num_levels: int) -> dict:
  """Folds each level's ``ImplicitA``/``ImplicitM`` into its lead ``1x1`` conv.

  ``im * (W (x + ia) + b) = (im * W) x + im * (W ia + b)``, so a head with
  ``fused=True`` and the returned parameters computes the same outputs.

  Args:
    head_params: ``IAuxDetect`` parameters with ``ia_l``, ``m_l``, ``im_l``,
      ``m2_l`` for every level ``l`` (conv ``kernel`` ``[1, 1, I_l, A * F]``).
    num_levels: ``L``.

  Returns:
    Parameters without ``ia_l``/``im_l``; ``m2_l`` unchanged.
  """
  expected = {
    f'{prefix}_{level}' for prefix in ('ia', 'm', 'im', 'm2') for level in range(num_levels)
  }
  if set(head_params) != expected:
    raise ValueError(f'fuse_implicit expects exactly {sorted(expected)}, got {sorted(head_params)}')
  fused = {}
  for level in range(num_levels):
    conv = head_params[f'm_{level}']
    offset = head_params[f'ia_{level}']['implicit']  # [I_l]
    scale = head_params[f'im_{level}']['implicit']  # [A * F]
    kernel = conv['kernel']  # [1, 1, I_l, A * F]
    bias = conv['bias'] + offset @ kernel[0, 0]  # [A * F]
    fused[f'm_{level}'] = {'kernel': kernel * scale, 'bias': bias * scale}
    fused[f'm2_{level}'] = head_params[f'm2_{level}']
  return fused
