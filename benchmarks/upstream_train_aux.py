"""Upstream's ``train_aux.py`` loop: now :mod:`reorg_jax.reference.train_aux`, re-exported.

The benchmarks import it by this name; ``reorg-jax verify`` shares the one
implementation in the package.
"""

from reorg_jax.reference.train_aux import (
  UPSTREAM_AUX_WEIGHT,
  UpstreamRun,
  evaluate,
  hyperparameters,
  parameter_groups,
  restore,
  snapshot,
  train,
)

__all__ = [
  'UPSTREAM_AUX_WEIGHT',
  'UpstreamRun',
  'evaluate',
  'hyperparameters',
  'parameter_groups',
  'restore',
  'snapshot',
  'train',
]
