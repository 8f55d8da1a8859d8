"""Gradients of the loss: ours (``jax.grad``) against upstream's (torch autograd).

Glossary (the package's, see the README): ``L`` levels; the ``2L`` head
outputs are the lead levels, then the auxiliary levels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
  from matplotlib.figure import Figure

__all__ = ['gradient_figure']


def gradient_figure(
  ours: Sequence[np.ndarray], reference: Sequence[np.ndarray], *, num_levels: int
) -> Figure:
  """Gradient of the loss with respect to the ``2L`` head outputs: ours against upstream's.

  Left: histogram of ``log10 |ours - reference|`` per head (entries where
  both are exactly equal are counted at the left edge). Right: ours against
  reference for the entries of largest magnitude.

  Args:
    ours: ``2L`` gradients (lead levels, then auxiliary levels).
    reference: the same from torch autograd.
    num_levels: ``L``.
  """
  import matplotlib.pyplot as plt

  figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4), layout='constrained')
  floor = -16.0
  for name, part in (('lead', slice(0, num_levels)), ('aux', slice(num_levels, None))):
    a = np.concatenate([np.ravel(x) for x in ours[part]]).astype(np.float64)
    b = np.concatenate([np.ravel(x) for x in reference[part]]).astype(np.float64)
    diff = np.abs(a - b)
    logs = np.log10(np.maximum(diff, 10.0**floor))
    left.hist(logs, bins=60, range=(floor, 0), alpha=0.6, label=f'{name} ({a.size} entries)')
    top = np.argsort(-np.abs(b))[:2000]
    right.scatter(b[top], a[top], s=4, alpha=0.6, label=name)
  left.set_yscale('log')
  left.set_xlabel(f'log10 |ours - upstream| per entry (bar at {floor:.0f}: equal)')
  left.set_ylabel('entries')
  left.legend()
  left.set_title('absolute gradient differences')
  lo, hi = right.get_xlim()
  right.plot([lo, hi], [lo, hi], color='black', linewidth=0.6)
  right.set_xlabel('upstream (torch autograd)')
  right.set_ylabel('ours (jax.grad)')
  right.set_title('2000 largest entries per head')
  right.legend()
  return figure
