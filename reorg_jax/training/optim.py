"""The optimisation recipe of upstream's ``train_aux.py`` with ``hyp.scratch.p6``.

A trainer uses these pieces in this order:

* :class:`RecipeConfig` holds the hyper-parameters (defaults: ``hyp.scratch.p6``);
  :class:`Schedule` adds a run's geometry (epochs, batch size, batches per
  epoch) and derives what upstream derives from it: warm-up length, nominal
  gradient accumulation and the scaled weight decay.
* ``NO_DECAY``, ``DECAY`` and ``BIAS`` number upstream's three parameter
  groups (pg0: normalisation scales, implicit vectors; pg1: conv/dense
  kernels; pg2: all biases); :func:`reorg_jax.training.sgd.param_labels` sorts
  a Flax ``params`` pytree into them.
* :func:`hyperparams` gives, for global iteration ``ni``, the learning rate of
  each group, the momentum and the accumulation count, computed on the host
  in NumPy with upstream's own float64 arithmetic (warm-up by ``np.interp``,
  then the one-cycle cosine of :meth:`Schedule.lr_factor`); they drive
  :func:`reorg_jax.training.sgd.recipe_optimizer` (gradient accumulation and
  Nesterov SGD).
* :func:`scaled_loss_gains` applies the trainer's per-layer, per-class and
  per-image-size scaling of the loss gains.

The model EMA lives in :mod:`reorg_jax.training.ema`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import numpy as np

from reorg_jax.loss import LossConfig

__all__ = [
  'BIAS',
  'DECAY',
  'GROUP_NAMES',
  'NO_DECAY',
  'P6_RECIPE',
  'HyperParams',
  'RecipeConfig',
  'Schedule',
  'hyperparams',
  'scaled_loss_gains',
]

# Upstream's optimizer parameter groups, in param-group order.
NO_DECAY = 0  # pg0: BatchNorm weights (Flax 'scale') and implicit vectors; no decay.
DECAY = 1  # pg1: conv and linear weights (Flax 'kernel'); weight decay.
BIAS = 2  # pg2: every bias (conv, dense, BatchNorm); no decay, own warm-up.
GROUP_NAMES: tuple[str, ...] = ('no_decay', 'decay', 'bias')


@dataclasses.dataclass(frozen=True)
class RecipeConfig:
  """Optimisation hyper-parameters; defaults are upstream's ``hyp.scratch.p6``.

  Attributes:
    lr0: peak learning rate.
    lrf: final learning rate as a fraction of ``lr0`` (one-cycle cosine).
    momentum: SGD (Nesterov) momentum after warm-up.
    weight_decay: decay of the ``DECAY`` group at the nominal batch size;
      :attr:`Schedule.weight_decay` rescales it to the run's batch size.
    warmup_epochs: warm-up length in epochs (fractions allowed).
    warmup_momentum: momentum at iteration 0, rising linearly to ``momentum``.
    warmup_bias_lr: ``BIAS`` group learning rate at iteration 0, falling
      linearly to the scheduled rate (the other groups rise from 0).
    nominal_batch_size: ``nbs``; gradients are accumulated up to about this
      many images per optimizer step.
    min_warmup_steps: warm-up lasts at least this many iterations.
    step_since_last: when the optimizer steps. ``False`` (upstream's
      ``train_aux.py``): at iteration ``ni`` when ``ni % accumulate == 0``;
      ``True``: when ``ni - last_step >= accumulate`` (the rule of later
      YOLOv5 trainers). They differ only while ``accumulate`` changes during
      warm-up.
    ema_decay: the EMA decay approaches this value...
    ema_ramp: ...with this time constant in optimizer steps.
  """

  lr0: float = 0.01
  lrf: float = 0.2
  momentum: float = 0.937
  weight_decay: float = 0.0005
  warmup_epochs: float = 3.0
  warmup_momentum: float = 0.8
  warmup_bias_lr: float = 0.1
  nominal_batch_size: int = 64
  min_warmup_steps: int = 1000
  step_since_last: bool = False
  ema_decay: float = 0.9999
  ema_ramp: float = 2000.0

  def __post_init__(self):
    if not self.lr0 > 0:
      raise ValueError(f'lr0 must be > 0, got {self.lr0}')
    if not 0.0 <= self.lrf <= 1.0:
      raise ValueError(f'lrf is a fraction of lr0 and must lie in [0, 1], got {self.lrf}')
    for name in ('momentum', 'warmup_momentum'):
      if not 0.0 <= getattr(self, name) < 1.0:
        raise ValueError(f'{name} must lie in [0, 1), got {getattr(self, name)}')
    for name in ('weight_decay', 'warmup_bias_lr'):
      if not getattr(self, name) >= 0:
        raise ValueError(f'{name} must be >= 0, got {getattr(self, name)}')
    if self.nominal_batch_size < 1:
      raise ValueError(f'nominal_batch_size must be >= 1, got {self.nominal_batch_size}')
    if self.min_warmup_steps < 1:
      raise ValueError(f'min_warmup_steps must be >= 1, got {self.min_warmup_steps}')
    if not self.warmup_epochs >= 0:
      raise ValueError(f'warmup_epochs must be >= 0, got {self.warmup_epochs}')
    if not 0.0 <= self.ema_decay < 1.0 or self.ema_ramp <= 0:
      raise ValueError(
        f'need 0 <= ema_decay < 1 and ema_ramp > 0, got {self.ema_decay} and {self.ema_ramp}'
      )


P6_RECIPE = RecipeConfig()


@dataclasses.dataclass(frozen=True)
class Schedule:
  """A run's geometry and the quantities upstream derives from it.

  Hashable, so it can be closed over or passed to ``jax.jit`` as static.

  Attributes:
    epochs: number of training epochs.
    batch_size: images per iteration over all devices (upstream's
      ``total_batch_size``).
    steps_per_epoch: iterations (micro-batches) per epoch, upstream's ``nb``.
    recipe: the hyper-parameters.
  """

  epochs: int
  batch_size: int
  steps_per_epoch: int
  recipe: RecipeConfig = P6_RECIPE

  def __post_init__(self):
    for name in ('epochs', 'batch_size', 'steps_per_epoch'):
      if getattr(self, name) < 1:
        raise ValueError(f'{name} must be >= 1, got {getattr(self, name)}')

  @property
  def total_steps(self) -> int:
    """Iterations in the whole run."""
    return self.epochs * self.steps_per_epoch

  @property
  def accumulate(self) -> int:
    """Micro-batches per optimizer step after warm-up: ``max(round(nbs / batch_size), 1)``."""
    return max(round(self.recipe.nominal_batch_size / self.batch_size), 1)

  @property
  def weight_decay(self) -> float:
    """``weight_decay * batch_size * accumulate / nbs`` (decay per image stays nominal)."""
    r = self.recipe
    return r.weight_decay * self.batch_size * self.accumulate / r.nominal_batch_size

  @property
  def weight_decays(self) -> tuple[float, ...]:
    """Per group, in group order: only ``DECAY`` decays."""
    return tuple(self.weight_decay if group == DECAY else 0.0 for group in range(len(GROUP_NAMES)))

  @property
  def warmup_steps(self) -> int:
    """``nw = max(round(warmup_epochs * steps_per_epoch), min_warmup_steps)``."""
    r = self.recipe
    return max(round(r.warmup_epochs * self.steps_per_epoch), r.min_warmup_steps)

  def lr_factor(self, epoch: int | np.ndarray) -> np.ndarray:
    """One-cycle cosine from 1 at epoch 0 towards ``lrf`` at ``epochs``.

    ``((1 - cos(epoch * pi / epochs)) / 2) * (lrf - 1) + 1``; the learning
    rate of epoch ``e`` is ``lr0 * lr_factor(e)``.
    """
    ramp = (1.0 - np.cos(np.asarray(epoch, np.float64) * math.pi / self.epochs)) / 2.0
    return ramp * (self.recipe.lrf - 1.0) + 1.0


class HyperParams(NamedTuple):
  """Hyper-parameters of one iteration; host NumPy values with fixed dtypes.

  Fixed dtypes keep the abstract signature of a jitted step constant, so
  passing a fresh :class:`HyperParams` each iteration never recompiles.

  Attributes:
    step: ``[]`` int32, the global iteration ``ni`` (0-based, micro-batches).
    lrs: ``[3]`` float64, learning rate per group (``NO_DECAY, DECAY, BIAS``).
    momentum: ``[]`` float64, momentum of every group.
    accumulate: ``[]`` int32, micro-batches per optimizer step.
  """

  step: np.ndarray
  lrs: np.ndarray
  momentum: np.ndarray
  accumulate: np.ndarray


def hyperparams(step: int, *, schedule: Schedule) -> HyperParams:
  """Learning rates, momentum and accumulation count of global iteration ``step``.

  Upstream's arithmetic, in float64: with ``epoch = step // steps_per_epoch``,
  ``target = lr0 * lr_factor(epoch)`` and ``nw = schedule.warmup_steps``,

  * while ``step <= nw``: ``xp = [0, nw]``;
    ``accumulate = max(1, round(interp(step, xp, [1, nbs / batch_size])))``
    (round half to even); ``lr_j = interp(step, xp, [warmup_bias_lr if
    j == BIAS else 0, target])``; ``momentum = interp(step, xp,
    [warmup_momentum, momentum])``;
  * afterwards: every ``lr_j = target``, ``momentum`` and
    ``schedule.accumulate``.

  At ``step == nw`` both branches agree.

  Raises:
    ValueError: ``step`` is outside ``[0, schedule.total_steps)``.
  """
  step = int(step)
  if not 0 <= step < schedule.total_steps:
    raise ValueError(f'step must be in [0, {schedule.total_steps}), got {step}')
  r = schedule.recipe
  target = r.lr0 * float(schedule.lr_factor(step // schedule.steps_per_epoch))
  warmup = schedule.warmup_steps
  if step <= warmup:
    xp = [0.0, float(warmup)]
    ramp = np.interp(step, xp, [1.0, r.nominal_batch_size / schedule.batch_size])
    accumulate = max(1.0, float(np.round(ramp)))
    starts = [r.warmup_bias_lr if group == BIAS else 0.0 for group in range(len(GROUP_NAMES))]
    lrs = [np.interp(step, xp, [start, target]) for start in starts]
    momentum = np.interp(step, xp, [r.warmup_momentum, r.momentum])
  else:
    accumulate = schedule.accumulate
    lrs = [target] * len(GROUP_NAMES)
    momentum = r.momentum
  return HyperParams(
    step=np.asarray(step, np.int32),
    lrs=np.asarray(lrs, np.float64),
    momentum=np.asarray(momentum, np.float64),
    accumulate=np.asarray(int(accumulate), np.int32),
  )


def scaled_loss_gains(loss_config: LossConfig, *, image_size: int) -> LossConfig:
  """The loss gains as upstream's trainer rescales them before building the loss.

  With ``nl = loss_config.num_levels`` and ``nc = loss_config.num_classes``:
  ``box * 3 / nl``, ``cls * nc / 80 * 3 / nl`` and
  ``obj * (image_size / 640) ** 2 * 3 / nl``. Apply once, to the
  configuration read from the hyper-parameter file.

  Args:
    loss_config: configuration with the file's (unscaled) gains.
    image_size: training image size in pixels (square side).
  """
  if image_size < 1:
    raise ValueError(f'image_size must be >= 1, got {image_size}')
  levels, classes = loss_config.num_levels, loss_config.num_classes
  # Same association order as upstream: ``gain *= (factor expression)``.
  return dataclasses.replace(
    loss_config,
    box=loss_config.box * (3.0 / levels),
    cls=loss_config.cls * (classes / 80.0 * 3.0 / levels),
    obj=loss_config.obj * ((image_size / 640) ** 2 * 3.0 / levels),
  )
