"""Upstream's optimiser: parameter groups, Nesterov SGD and gradient accumulation.

The optimiser that :mod:`reorg_jax.training.optim`'s recipe drives:

* :func:`param_labels` sorts a Flax ``params`` pytree into upstream's three
  parameter groups: ``NO_DECAY`` (pg0: normalisation scales, implicit
  vectors), ``DECAY`` (pg1: conv/dense kernels) and ``BIAS`` (pg2: all biases),
  the constants of :mod:`reorg_jax.training.optim`.
* :func:`recipe_optimizer` sums micro-batch gradients and, when upstream's
  step rule fires, applies :func:`nesterov_sgd` (``torch.optim.SGD`` with
  ``nesterov=True``: decay coupled into the gradient, per-group learning
  rates, per-call momentum). The hyper-parameters
  (:func:`reorg_jax.training.optim.hyperparams`) enter as traced arrays, so
  one compilation serves every iteration, warm-up included.
* :func:`frozen_mask` (with :func:`layer_count` and :func:`frozen_paths`)
  picks the parameters of upstream's ``--freeze N``: every leaf of layers
  ``0 .. N-1``. Both optimisers take ``frozen_layers=N`` and leave those
  leaves exactly as they are: no update, no weight decay, no momentum.

Gradient convention: upstream's loss is the batch *sum* (mean loss times the
batch size, as :func:`reorg_jax.aux_ota_loss` returns it), and
``loss.backward()`` adds into ``.grad`` across micro-batches, so the
optimizer sees the *sum* of the micro-batch gradients. :func:`recipe_optimizer`
keeps that convention: pass each micro-batch's gradient of that loss unscaled.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from reorg_jax.training.optim import BIAS, DECAY, GROUP_NAMES, NO_DECAY, HyperParams, Schedule

__all__ = [
  'UPSTREAM_GROUPS',
  'RecipeOptimizer',
  'RecipeState',
  'SgdState',
  'frozen_mask',
  'frozen_paths',
  'layer_count',
  'nesterov_sgd',
  'param_labels',
  'recipe_optimizer',
]

# Leaf name -> group, for the parameter names this package's models use.
UPSTREAM_GROUPS: Mapping[str, int] = MappingProxyType(
  {'kernel': DECAY, 'bias': BIAS, 'scale': NO_DECAY, 'implicit': NO_DECAY}
)


# Top-level name of layer i's variables in a YOLO model (upstream's ``model.i``).
_LAYER_KEY = re.compile(r'^model_(\d+)$')


def _key_name(key: Any) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _leaf_name(path: tuple[Any, ...]) -> str:
  return _key_name(path[-1] if path else None)


def _layer_index(path: tuple[Any, ...]) -> int | None:
  """Upstream layer ``i`` of a leaf whose path starts with ``model_i``, else ``None``."""
  match = _LAYER_KEY.match(_key_name(path[0])) if path else None
  return int(match.group(1)) if match else None


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


def layer_count(params: Any) -> int:
  """How many of upstream's layers ``model.0 .. model.{n-1}`` a parameter tree spans.

  One more than the largest ``i`` of its top-level ``model_i`` keys (a
  :class:`~reorg_jax.models.yolo.YOLO` names layer ``i``'s variables
  ``model_i``, as upstream names them ``model.i``), 0 without any. For a
  ``YOLO`` this is ``len(model.specs)``: its last layer, the head, has
  parameters. Layers without parameters (``ReOrg``, ``Concat``, ...) count.

  Args:
    params: a ``params`` pytree, or any tree with its paths (e.g. :func:`param_labels`).
  """
  indices = [_layer_index(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]
  return 1 + max((i for i in indices if i is not None), default=-1)


def frozen_mask(params: Any, frozen_layers: int) -> Any:
  """Which leaves upstream's ``--freeze N`` freezes: those of layers ``0 .. N-1``.

  Upstream turns off ``requires_grad`` of every parameter named
  ``model.{i}.*`` with ``i < N``; here those are the leaves under a
  top-level key ``model_i`` with ``i < N``. ``N = 0`` freezes nothing.

  Args:
    params: a ``params`` pytree, or any tree with its paths (e.g. :func:`param_labels`).
    frozen_layers: ``N``, at most :func:`layer_count` of ``params``.

  Returns:
    A pytree of Python bools with the structure of ``params``.

  Raises:
    ValueError: ``N`` is negative or exceeds the layer count; the message
      names both.
  """
  frozen_layers = operator.index(frozen_layers)
  if frozen_layers:
    count = layer_count(params)
    if not 0 <= frozen_layers <= count:
      raise ValueError(
        f'cannot freeze the first {frozen_layers} layers: the model has {count} layers '
        f'(frozen_layers must lie in [0, {count}])'
      )

  def frozen(path: tuple[Any, ...], _: Any) -> bool:
    index = _layer_index(path)
    return index is not None and index < frozen_layers

  return jax.tree_util.tree_map_with_path(frozen, params)


def frozen_paths(params: Any, frozen_layers: int) -> list[str]:
  """The ``/``-joined paths (``'model_1/conv/kernel'``) of :func:`frozen_mask`'s leaves, in tree order.

  Raises:
    ValueError: as :func:`frozen_mask`.
  """
  mask = frozen_mask(params, frozen_layers)
  return [
    '/'.join(_key_name(key) for key in path)
    for path, frozen in jax.tree_util.tree_leaves_with_path(mask)
    if frozen
  ]


def _frozen_or_none(labels: Any, frozen_layers: int) -> Any:
  """:func:`frozen_mask` of ``labels``, or ``None`` when nothing is frozen."""
  mask = frozen_mask(labels, frozen_layers)
  return mask if any(jax.tree.leaves(mask)) else None


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
  labels: Any, *, weight_decays: Sequence[float], frozen_layers: int = 0
) -> optax.GradientTransformationExtraArgs:
  """``torch.optim.SGD(nesterov=True, dampening=0)`` with per-group settings.

  ``update(grads, state, params, *, lrs, momentum)`` returns the additive
  updates; per leaf of group ``j``, with ``lrs[j]`` and ``momentum`` traced:

  * ``g = g + weight_decays[j] * p`` (decay coupled into the gradient,
    skipped when the decay is 0 as torch does);
  * ``buf = momentum * buf + g``;
  * ``update = -lrs[j] * (g + momentum * buf)``.

  Leaves of the first ``frozen_layers`` layers (:func:`frozen_mask`) are
  skipped as torch skips parameters without a gradient: their gradient is
  ignored, their buffer kept (zero: no momentum) and their update is ``-0.0``,
  which ``optax.apply_updates`` adds without changing a bit (``-0.0``
  parameters included).

  Args:
    labels: group index per parameter (:func:`param_labels`).
    weight_decays: decay per group, in group order
      (:attr:`reorg_jax.training.optim.Schedule.weight_decays`).
    frozen_layers: upstream's ``--freeze N``; 0 trains every layer.

  Raises:
    ValueError: a bad ``weight_decays`` or ``frozen_layers`` (see :func:`frozen_mask`).
  """
  weight_decays = tuple(float(decay) for decay in weight_decays)
  if len(weight_decays) != len(GROUP_NAMES):
    raise ValueError(f'need one weight decay per group {GROUP_NAMES}, got {weight_decays}')
  frozen = _frozen_or_none(labels, frozen_layers)
  if frozen is None:
    frozen = jax.tree.map(lambda _: False, labels)

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

    def leaf(group: int, skip: bool, grad: jax.Array, buf: jax.Array, param: jax.Array):
      if skip:
        return jnp.full_like(grad, -0.0), buf
      decay = weight_decays[group]
      if decay:
        grad = grad + decay * param
      mom = momentum.astype(grad.dtype)
      buf = mom * buf + grad
      return -lrs[group].astype(grad.dtype) * (grad + mom * buf), buf

    pairs = jax.tree.map(leaf, labels, frozen, updates, state.momentum_buffer, params)
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


def recipe_optimizer(labels: Any, *, schedule: Schedule, frozen_layers: int = 0) -> RecipeOptimizer:
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

  With ``frozen_layers = N`` the leaves of layers ``0 .. N-1``
  (:func:`frozen_mask`) are returned as they came in, bit for bit: their
  gradients are neither summed nor applied, so they get no weight decay and
  no momentum (their buffers are left as they are: zero from a fresh
  start). The state keeps its structure, so checkpoints do not depend on
  ``N``.

  Args:
    labels: group index per parameter (:func:`param_labels`).
    schedule: the run's geometry and recipe.
    frozen_layers: upstream's ``--freeze N``; 0 trains every layer.

  Returns:
    A :class:`RecipeOptimizer`; its ``update`` returns the new parameters, the
    new state and a ``[]`` bool telling whether the optimizer stepped (update
    the EMA then, with ``updates=state.num_updates``).
  """
  sgd = nesterov_sgd(labels, weight_decays=schedule.weight_decays, frozen_layers=frozen_layers)
  frozen = _frozen_or_none(labels, frozen_layers)
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
    if frozen is not None:  # frozen leaves have no gradient: nothing is added to their sum
      grad_sum = jax.tree.map(
        lambda skip, new, old: old if skip else new, frozen, grad_sum, state.grad_sum
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
      new_params = optax.apply_updates(params, deltas)
      if frozen is not None:
        new_params = jax.tree.map(
          lambda skip, old, new: old if skip else new, frozen, params, new_params
        )
      return new_params, sgd_state, jax.tree.map(jnp.zeros_like, grad_sum)

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
