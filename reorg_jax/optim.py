"""The optimisation recipe of upstream's ``train_aux.py`` with ``hyp.scratch.p6``.

A trainer uses these pieces in this order:

* :class:`RecipeConfig` holds the hyper-parameters (defaults: ``hyp.scratch.p6``);
  :class:`Schedule` adds a run's geometry (epochs, batch size, batches per
  epoch) and derives what upstream derives from it: warm-up length, nominal
  gradient accumulation and the scaled weight decay.
* :func:`param_labels` sorts a Flax ``params`` pytree into upstream's three
  parameter groups: ``NO_DECAY`` (pg0: normalisation scales, implicit
  vectors), ``DECAY`` (pg1: conv/dense kernels) and ``BIAS`` (pg2: all biases).
* :func:`hyperparams` gives, for global iteration ``ni``, the learning rate of
  each group, the momentum and the accumulation count, computed on the host
  in NumPy with upstream's own float64 arithmetic (warm-up by ``np.interp``,
  then the one-cycle cosine of :meth:`Schedule.lr_factor`).
* :func:`recipe_optimizer` sums micro-batch gradients and, when upstream's
  step rule fires, applies :func:`nesterov_sgd` (``torch.optim.SGD`` with
  ``nesterov=True``: decay coupled into the gradient, per-group learning
  rates, per-call momentum). The hyper-parameters enter as traced arrays, so
  one compilation serves every iteration, warm-up included.
* :func:`scaled_loss_gains` applies the trainer's per-layer, per-class and
  per-image-size scaling of the loss gains.

The model EMA lives in :mod:`reorg_jax.ema`.

Gradient convention: upstream's loss is the batch *sum* (mean loss times the
batch size, as :func:`reorg_jax.aux_ota_loss` returns it), and
``loss.backward()`` adds into ``.grad`` across micro-batches, so the
optimizer sees the *sum* of the micro-batch gradients. :func:`recipe_optimizer`
keeps that convention: pass each micro-batch's gradient of that loss unscaled.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from reorg_jax.config import LossConfig

# Upstream's optimizer parameter groups, in param-group order.
NO_DECAY = 0  # pg0: BatchNorm weights (Flax 'scale') and implicit vectors; no decay.
DECAY = 1  # pg1: conv and linear weights (Flax 'kernel'); weight decay.
BIAS = 2  # pg2: every bias (conv, dense, BatchNorm); no decay, own warm-up.
GROUP_NAMES: tuple[str, ...] = ('no_decay', 'decay', 'bias')

# Leaf name -> group, for the parameter names this package's models use.
UPSTREAM_GROUPS: Mapping[str, int] = MappingProxyType(
  {'kernel': DECAY, 'bias': BIAS, 'scale': NO_DECAY, 'implicit': NO_DECAY}
)


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


def _leaf_name(path: tuple[Any, ...]) -> str:
  key = path[-1] if path else None
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def param_labels(params: Any, *, groups: Mapping[str, int] = UPSTREAM_GROUPS) -> Any:
  """Upstream's parameter group of every leaf of a Flax ``params`` pytree.

  The group is chosen by the leaf's own name (the last key of its path):
  with the default table, ``kernel`` (``nn.Conv``/``nn.Dense`` weights) ->
  ``DECAY``; ``bias`` (conv, dense and BatchNorm biases) -> ``BIAS``;
  ``scale`` (BatchNorm weight) and ``implicit`` (``ImplicitA``/``ImplicitM``)
  -> ``NO_DECAY``. Kernels must have at least two axes, the others exactly
  one, as in upstream where only module weights are decayed.

  Args:
    params: the ``'params'`` collection (not the whole variables dict: batch
      statistics are not optimised).
    groups: leaf name -> group index (``NO_DECAY``, ``DECAY`` or ``BIAS``).

  Returns:
    A pytree of Python ints with the structure of ``params``.

  Raises:
    ValueError: a leaf's name is not in ``groups`` or its rank does not fit
      its group; the message lists every offending path.
  """
  bad_groups = {name: group for name, group in groups.items() if group not in (0, 1, 2)}
  if bad_groups:
    raise ValueError(f'groups must map names to NO_DECAY, DECAY or BIAS, got {bad_groups}')
  unknown: list[str] = []
  bad_rank: list[str] = []

  def label(path: tuple[Any, ...], leaf: Any) -> int:
    name = _leaf_name(path)
    group = groups.get(name)
    if group is None:
      unknown.append(jax.tree_util.keystr(path))
      return -1
    ndim = np.ndim(leaf)
    if (group == DECAY and ndim < 2) or (group != DECAY and ndim != 1):
      bad_rank.append(f'{jax.tree_util.keystr(path)} (shape {np.shape(leaf)})')
    return group

  labels = jax.tree_util.tree_map_with_path(label, params)
  if unknown:
    raise ValueError(
      f'no parameter group for leaves named other than {sorted(groups)}: {unknown}; '
      'pass groups=... to name them'
    )
  if bad_rank:
    raise ValueError(
      f'decayed kernels need >= 2 axes and the other groups exactly 1, got {bad_rank}'
    )
  return labels


class SgdState(NamedTuple):
  """State of :func:`nesterov_sgd`.

  Attributes:
    momentum_buffer: torch's per-parameter ``momentum_buffer``, shaped like
      the parameters. Zero before the first step, which makes torch's
      first-step rule ``buf = g`` the general ``buf = momentum * buf + g``.
  """

  momentum_buffer: Any


def _check_structure(labels: Any, tree: Any, what: str) -> None:
  expected, got = jax.tree.structure(labels), jax.tree.structure(tree)
  if expected != got:
    raise ValueError(f'{what} do not match the labels: expected {expected}, got {got}')


def nesterov_sgd(
  labels: Any, *, weight_decays: Sequence[float]
) -> optax.GradientTransformationExtraArgs:
  """``torch.optim.SGD(nesterov=True, dampening=0)`` with per-group settings.

  ``update(grads, state, params, *, lrs, momentum)`` returns the additive
  updates; per leaf of group ``j``, with ``lrs[j]`` and ``momentum`` traced:

  * ``g = g + weight_decays[j] * p`` (decay coupled into the gradient,
    skipped when the decay is 0 as torch does);
  * ``buf = momentum * buf + g``;
  * ``update = -lrs[j] * (g + momentum * buf)``.

  Args:
    labels: group index per parameter (:func:`param_labels`).
    weight_decays: decay per group, in group order
      (:attr:`Schedule.weight_decays`).
  """
  weight_decays = tuple(float(decay) for decay in weight_decays)
  if len(weight_decays) != len(GROUP_NAMES):
    raise ValueError(f'need one weight decay per group {GROUP_NAMES}, got {weight_decays}')

  def init_fn(params: Any) -> SgdState:
    _check_structure(labels, params, 'parameters')
    return SgdState(momentum_buffer=jax.tree.map(jnp.zeros_like, params))

  def update_fn(
    updates: Any, state: SgdState, params: Any = None, *, lrs: Any, momentum: Any, **extra_args
  ) -> tuple[Any, SgdState]:
    del extra_args
    if params is None:
      raise ValueError('nesterov_sgd needs the parameters for weight decay')
    _check_structure(labels, updates, 'gradients')
    lrs = jnp.asarray(lrs)
    if lrs.shape != (len(GROUP_NAMES),):
      raise ValueError(f'lrs must have shape ({len(GROUP_NAMES)},), got {lrs.shape}')
    momentum = jnp.asarray(momentum)

    def leaf(group: int, grad: jax.Array, buf: jax.Array, param: jax.Array):
      decay = weight_decays[group]
      if decay:
        grad = grad + decay * param
      mom = momentum.astype(grad.dtype)
      buf = mom * buf + grad
      return -lrs[group].astype(grad.dtype) * (grad + mom * buf), buf

    pairs = jax.tree.map(leaf, labels, updates, state.momentum_buffer, params)
    new_updates = jax.tree.map(lambda _, pair: pair[0], labels, pairs)
    buffers = jax.tree.map(lambda _, pair: pair[1], labels, pairs)
    return new_updates, SgdState(momentum_buffer=buffers)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class RecipeState(NamedTuple):
  """State of :func:`recipe_optimizer`.

  Attributes:
    sgd: the :func:`nesterov_sgd` state (momentum buffers).
    grad_sum: gradients summed since the last optimizer step (or epoch start).
    last_update_step: ``[]`` int32, iteration of the last optimizer step, -1
      before the first.
    num_updates: ``[]`` int32, optimizer steps taken (the EMA's ``updates``).
  """

  sgd: SgdState
  grad_sum: Any
  last_update_step: jax.Array
  num_updates: jax.Array


class RecipeOptimizer(NamedTuple):
  """``init(params) -> RecipeState`` and
  ``update(grads, state, params, *, hparams) -> (params, state, stepped)``."""

  init: Callable[[Any], RecipeState]
  update: Callable[..., tuple[Any, RecipeState, jax.Array]]


def recipe_optimizer(labels: Any, *, schedule: Schedule) -> RecipeOptimizer:
  """Gradient accumulation and upstream's step rule around :func:`nesterov_sgd`.

  ``update(grads, state, params, *, hparams)`` consumes one micro-batch at
  iteration ``ni = hparams.step``:

  1. at an epoch start (``ni % steps_per_epoch == 0``) the gradient sum is
     cleared first: upstream zeroes gradients before each epoch, dropping a
     partial accumulation;
  2. ``grads`` are added to the sum (torch's ``.grad`` summation);
  3. if the step rule fires (``ni % accumulate == 0``, or ``ni - last_step >=
     accumulate`` with ``step_since_last``) the summed gradient goes
     through Nesterov SGD with ``hparams.lrs``/``hparams.momentum`` and the
     sum is cleared.

  All of ``hparams`` is traced: one compilation of a step calling ``update``
  serves the whole run.

  Returns:
    A :class:`RecipeOptimizer`; its ``update`` returns the new parameters, the
    new state and a ``[]`` bool telling whether the optimizer stepped (update
    the EMA then, with ``updates=state.num_updates``).
  """
  sgd = nesterov_sgd(labels, weight_decays=schedule.weight_decays)
  steps_per_epoch = schedule.steps_per_epoch
  since_last = schedule.recipe.step_since_last

  def init(params: Any) -> RecipeState:
    return RecipeState(
      sgd=sgd.init(params),
      grad_sum=jax.tree.map(jnp.zeros_like, params),
      last_update_step=jnp.asarray(-1, jnp.int32),
      num_updates=jnp.asarray(0, jnp.int32),
    )

  def update(
    grads: Any, state: RecipeState, params: Any, *, hparams: HyperParams
  ) -> tuple[Any, RecipeState, jax.Array]:
    _check_structure(labels, grads, 'gradients')
    step = jnp.asarray(hparams.step, jnp.int32)
    accumulate = jnp.asarray(hparams.accumulate, jnp.int32)
    epoch_start = step % steps_per_epoch == 0
    grad_sum = jax.tree.map(
      lambda total, grad: jnp.where(epoch_start, jnp.zeros_like(total), total) + grad,
      state.grad_sum,
      grads,
    )
    if since_last:
      stepped = step - state.last_update_step >= accumulate
    else:
      stepped = step % accumulate == 0

    def apply(operand):
      params, sgd_state, grad_sum = operand
      deltas, sgd_state = sgd.update(
        grad_sum, sgd_state, params, lrs=hparams.lrs, momentum=hparams.momentum
      )
      return optax.apply_updates(params, deltas), sgd_state, jax.tree.map(jnp.zeros_like, grad_sum)

    params, sgd_state, grad_sum = jax.lax.cond(
      stepped, apply, lambda operand: operand, (params, state.sgd, grad_sum)
    )
    new_state = RecipeState(
      sgd=sgd_state,
      grad_sum=grad_sum,
      last_update_step=jnp.where(stepped, step, state.last_update_step),
      num_updates=state.num_updates + stepped.astype(jnp.int32),
    )
    return params, new_state, stepped

  return RecipeOptimizer(init=init, update=update)


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
