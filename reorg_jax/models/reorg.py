"""ReOrg: YOLOv7's space-to-depth stem, in NHWC.

Glossary: ``B`` batch, ``H``/``W`` image height/width, ``I`` input channels.

Upstream concatenates four strided sub-images along channels, in this order:

====  ===========  ===========
slot  rows         columns
====  ===========  ===========
0     even (0::2)  even (0::2)
1     odd  (1::2)  even (0::2)
2     even (0::2)  odd  (1::2)
3     odd  (1::2)  odd  (1::2)
====  ===========  ===========

so output channel ``s * I + i`` holds input channel ``i`` of slot ``s``. The
first convolution after the stem is trained against exactly this order. A
reshape/transpose space-to-depth in NHWC (``[B, H/2, 2, W/2, 2, I] ->
[B, H/2, W/2, 2*2*I]``) orders slots by (row parity, column parity), which
swaps slots 1 and 2; the NCHW view/permute of ``pixel_unshuffle`` orders
channels as ``c * 4 + 2 * row parity + column parity``, interleaving them too. Either way imported
weights would silently see shuffled inputs.
"""

from __future__ import annotations

import flax.linen as nn
import jax

__all__ = ['ReOrg', 'reorg']


def reorg(x: jax.Array) -> jax.Array:
  """Space-to-depth in upstream's channel order.

  Args:
    x: ``[B, H, W, I]`` with even ``H`` and ``W``.

  Returns:
    ``[B, H/2, W/2, 4I]``: concatenation of ``x[:, 0::2, 0::2]``,
    ``x[:, 1::2, 0::2]``, ``x[:, 0::2, 1::2]``, ``x[:, 1::2, 1::2]``.

  Raises:
    ValueError: at trace time, when ``x`` is not rank 4 or ``H``/``W`` is odd.
  """
  if x.ndim != 4:
    raise ValueError(f'reorg expects a rank-4 NHWC array [B, H, W, C], got shape {x.shape}')
  _, height, width, _ = x.shape
  if height % 2 or width % 2:
    raise ValueError(
      f'reorg needs even height and width, got H={height}, W={width} (input shape {x.shape})'
    )
  return jax.numpy.concatenate(
    [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], axis=-1
  )


class ReOrg(nn.Module):
  """Parameter-free Linen wrapper of :func:`reorg` (``[B, H, W, I] -> [B, H/2, W/2, 4I]``)."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return reorg(x)
