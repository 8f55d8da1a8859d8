"""Training: upstream's recipe (optimiser groups, schedules, EMA), the pure
train step, data-parallel placement and orbax checkpoints.

Modules: :mod:`~reorg_jax.training.optim` (the recipe's hyper-parameters,
warm-up and one-cycle schedule, loss gains), :mod:`~reorg_jax.training.sgd`
(parameter groups, Nesterov SGD, gradient accumulation),
:mod:`~reorg_jax.training.ema` (weight EMA), :mod:`~reorg_jax.training.step`
(``TrainState``, ``train_step``, sharding), :mod:`~reorg_jax.training.checkpoint`
(checkpoints that survive kill -9), :mod:`~reorg_jax.training.integrity`
(digests, typed keys, checkpoint errors).
"""

from reorg_jax.training.checkpoint import Checkpoints
from reorg_jax.training.integrity import CheckpointError
from reorg_jax.training.optim import RecipeConfig
from reorg_jax.training.sgd import recipe_optimizer
from reorg_jax.training.step import TrainState, create_train_state, jit_train_step, train_step

__all__ = [
  'CheckpointError',
  'Checkpoints',
  'RecipeConfig',
  'TrainState',
  'create_train_state',
  'jit_train_step',
  'recipe_optimizer',
  'train_step',
]
