"""ReOrg's four sub-images and its channel order against a reshape space-to-depth.

Glossary (the package's, see the README): ``B`` batch, ``H``/``W`` image
height/width, ``I`` input channels (3 for the RGB images drawn here).

A ReOrg *slot* is one of the four strided sub-images; output channel
``s * I + i`` holds input channel ``i`` of slot ``s``. :data:`REORG_SLOTS`
lists them in channel order, and every slot number below is read from it:
:func:`reorg_slot` finds the slot of a pixel's row and column parity.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from reorg_jax.models.reorg import reorg

if TYPE_CHECKING:
  from matplotlib.axes import Axes
  from matplotlib.figure import Figure

__all__ = [
  'REORG_SLOTS',
  'channel_order_figure',
  'reorg_figure',
  'reorg_slot',
  'space_to_depth',
]

# ReOrg's four sub-images, in channel order: (name, row slice, column slice).
REORG_SLOTS = (
  ('rows 0::2, cols 0::2', slice(0, None, 2), slice(0, None, 2)),
  ('rows 1::2, cols 0::2', slice(1, None, 2), slice(0, None, 2)),
  ('rows 0::2, cols 1::2', slice(0, None, 2), slice(1, None, 2)),
  ('rows 1::2, cols 1::2', slice(1, None, 2), slice(1, None, 2)),
)
_SLOT_COLOURS = ('#4c72b0', '#dd8452', '#55a868', '#c44e52')
_RGB = 'RGB'


def reorg_slot(row_parity: int, col_parity: int) -> int:
  """The :data:`REORG_SLOTS` entry whose sub-image starts at ``(row_parity, col_parity)``."""
  starts = [(rows.start, cols.start) for _, rows, cols in REORG_SLOTS]
  return starts.index((row_parity, col_parity))


def space_to_depth(x: np.ndarray) -> np.ndarray:
  """The reshape/transpose space-to-depth, for comparison with :func:`reorg_jax.reorg`.

  ``[B, H, W, I] -> [B, H/2, W/2, 4I]`` with channel ``(2 * row parity +
  column parity) * I + i``: the same four sub-images as ReOrg, but slots 1
  and 2 (odd rows / odd columns) swapped. Weights trained on ReOrg's order
  read shuffled inputs under this one.
  """
  batch, height, width, channels = x.shape
  blocks = np.asarray(x).reshape(batch, height // 2, 2, width // 2, 2, channels)
  return blocks.transpose(0, 1, 3, 2, 4, 5).reshape(batch, height // 2, width // 2, 4 * channels)


def _pattern(ax: Axes, size: int = 4) -> None:
  """A ``size x size`` pixel grid, each pixel coloured and numbered by its ReOrg slot."""
  from matplotlib.patches import Rectangle

  for row in range(size):
    for col in range(size):
      slot = reorg_slot(row % 2, col % 2)
      ax.add_patch(Rectangle((col, row), 1, 1, facecolor=_SLOT_COLOURS[slot], edgecolor='white'))
      ax.text(col + 0.5, row + 0.5, str(slot), ha='center', va='center', color='white')
  ax.set_xlim(0, size)
  ax.set_ylim(size, 0)
  ax.set_aspect('equal')
  ax.set_xticks(np.arange(size) + 0.5, [str(i) for i in range(size)])
  ax.set_yticks(np.arange(size) + 0.5, [str(i) for i in range(size)])
  ax.set_xlabel('column')
  ax.set_ylabel('row')
  ax.set_title('slot of each input pixel')


def reorg_figure(image: np.ndarray, *, crop: tuple[int, int, int] | None = None) -> Figure:
  """ReOrg of one RGB image: its four sub-images and their channel ranges.

  Top row: the image and the four ``H/2 x W/2`` sub-images that
  :func:`reorg_jax.reorg` concatenates, in channel order. Bottom row: which
  slot every input pixel goes to, and the same crop of each sub-image at
  nearest-neighbour zoom, where the one-pixel shifts between slots show.

  Args:
    image: ``[H, W, 3]`` uint8 RGB, ``H`` and ``W`` even.
    crop: ``(top, left, side)`` of the zoomed square in input pixels (even
      numbers); default: a square of a quarter of the shorter side around the
      middle.
  """
  import matplotlib.pyplot as plt
  from matplotlib.patches import Rectangle

  height, width, _ = image.shape
  if crop is None:
    side = (min(height, width) // 8) * 2
    crop = ((height - side) // 4 * 2, (width - side) // 4 * 2, side)
  top, left, side = crop
  out = np.asarray(reorg(image[None].astype(np.float32)))[0]  # [H/2, W/2, 12]
  figure, axes = plt.subplots(2, 5, figsize=(13.5, 5.8), layout='constrained')
  axes[0, 0].imshow(image)
  axes[0, 0].add_patch(
    Rectangle((left - 0.5, top - 0.5), side, side, fill=False, edgecolor='black', linewidth=1.5)
  )
  axes[0, 0].set_title(f'input [{height}, {width}, 3]')
  _pattern(axes[1, 0])
  for slot, (name, _, _) in enumerate(REORG_SLOTS):
    sub = out[..., 3 * slot : 3 * slot + 3].astype(np.uint8)
    colour = _SLOT_COLOURS[slot]
    axes[0, slot + 1].imshow(sub)
    axes[0, slot + 1].set_title(
      f'slot {slot}: x[{name}]\nchannels {3 * slot}-{3 * slot + 2} (R, G, B)', color=colour
    )
    zoom = sub[top // 2 : (top + side) // 2, left // 2 : (left + side) // 2]
    axes[1, slot + 1].imshow(zoom, interpolation='nearest')
    axes[1, slot + 1].set_title(f'slot {slot}, crop', color=colour)
  for ax in axes.flat[1:]:
    if ax is not axes[1, 0]:
      ax.set_xticks([])
      ax.set_yticks([])
  axes[0, 0].set_xticks([])
  axes[0, 0].set_yticks([])
  figure.suptitle(
    f'ReOrg: [1, {height}, {width}, 3] -> [1, {height // 2}, {width // 2}, 12]; '
    'output channel 3 * slot + c holds colour c of sub-image slot'
  )
  return figure


def _channels(order: str) -> list[tuple[int, str]]:
  """``(ReOrg slot, label)`` of each of the 12 output channels of an RGB input in ``order``.

  ``order`` is ``'reorg'`` (channel ``3 * slot + colour``) or ``'s2d'``
  (:func:`space_to_depth`, channel ``3 * (2 * row parity + column parity) +
  colour``). Labels read ``channel: r<row parity> c<column parity> <colour>``.
  """
  channels = []
  for channel in range(12):
    group, colour = divmod(channel, 3)
    if order == 'reorg':
      slot = group
      _, rows, cols = REORG_SLOTS[slot]
      row_parity, col_parity = rows.start, cols.start
    else:
      row_parity, col_parity = divmod(group, 2)
      slot = reorg_slot(row_parity, col_parity)
    channels.append((slot, f'{channel}: r{row_parity} c{col_parity} {_RGB[colour]}'))
  return channels


def channel_order_figure(image: np.ndarray, *, crop: tuple[int, int, int] | None = None) -> Figure:
  """ReOrg's channel order against the reshape/transpose space-to-depth.

  Three rows of 12 tiles (one per output channel, the same crop each):
  :func:`reorg_jax.reorg`, :func:`space_to_depth`, and the absolute
  difference. Tile labels read ``channel: r<row parity> c<column parity>
  <colour>``, coloured by the ReOrg slot the tile holds. The outputs hold the
  same values, but channels 3-5 and 6-8 trade places, so the difference is
  an edge image there and zero elsewhere.

  Args:
    image: ``[H, W, 3]`` uint8 RGB, ``H`` and ``W`` even.
    crop: ``(top, left, side)`` in input pixels (even numbers); default: the
      middle half of the shorter side.
  """
  import matplotlib.pyplot as plt

  height, width, _ = image.shape
  if crop is None:
    side = (min(height, width) // 4) * 2
    crop = ((height - side) // 4 * 2, (width - side) // 4 * 2, side)
  top, left, side = crop
  window = image[top : top + side, left : left + side][None].astype(np.float32)
  ours = np.asarray(reorg(window))[0]
  other = space_to_depth(window)[0]
  difference = np.abs(ours - other)
  rows = (
    ('reorg_jax.reorg (upstream order)', ours, _channels('reorg'), 'gray'),
    ('reshape/transpose space-to-depth', other, _channels('s2d'), 'gray'),
    ('|difference|', difference, None, 'magma'),
  )
  figure, axes = plt.subplots(3, 12, figsize=(15, 4.6), layout='constrained')
  for row, (name, values, channels, cmap) in enumerate(rows):
    for channel in range(12):
      ax = axes[row, channel]
      limit = 255 if cmap == 'gray' else max(float(difference.max()), 1.0)
      ax.imshow(values[..., channel], cmap=cmap, vmin=0, vmax=limit, interpolation='nearest')
      ax.set_xticks([])
      ax.set_yticks([])
      if channels is not None:
        slot, label = channels[channel]
        ax.set_title(label, fontsize=7.5, color=_SLOT_COLOURS[slot])
      else:
        ax.set_title(f'max {values[..., channel].max():.0f}', fontsize=7.5)
    axes[row, 0].set_ylabel(name, fontsize=8, rotation=0, ha='right', va='center')
  figure.suptitle(
    'Same values, different channel order: slots 1 (r1 c0) and 2 (r0 c1) are swapped, so a '
    'first conv trained on one order reads shuffled inputs under the other'
  )
  return figure
