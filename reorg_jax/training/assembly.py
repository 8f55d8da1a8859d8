"""One training run assembled from a model and its typed options: the only place that does it.

Glossary: ``S`` image side, ``C`` classes, ``L`` levels.

Every caller that trains, restores or times a model (the program's
subcommands, the benchmarks, the tests) builds its pieces here, so the
order of the parts and the rules between them exist once:

* :func:`loss_config` -- the loss for a model: its anchors and strides,
  upstream's per-level objectness balance for its ``L`` levels, the run's
  gains (``gains`` names any subset of :data:`GAIN_FIELDS`; the rest keep
  :class:`reorg_jax.LossConfig`'s defaults, upstream's values), then scaled for
  ``C`` and ``S`` as upstream's trainer does
  (:func:`reorg_jax.training.optim.scaled_loss_gains`).
* :func:`assemble` -- :class:`Assembly`: that loss, the optimiser and EMA of
  the ``schedule``, the static :class:`~reorg_jax.training.step.TrainSetup` and
  the initial :class:`~reorg_jax.training.step.TrainState` (fresh from a key,
  or from given variables), plus :meth:`Assembly.jit_step`; ``remat`` picks
  what the step's backward pass recomputes to save memory
  (:class:`~reorg_jax.models.yolo.Remat`).
* :func:`state_template` -- the state's structure, shapes and dtypes only
  (nothing computed), which :class:`reorg_jax.training.checkpoint.Checkpoints`
  needs as ``like`` to restore a checkpoint: restoring for inference builds
  no loader, dataset or step.

Example::

  schedule = optim.Schedule(epochs=300, batch_size=16, steps_per_epoch=7393)
  run = assembly.assemble(model, image_size=1280, schedule=schedule, gains={'cls': 0.3})
  step = run.jit_step()
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from reorg_jax.loss import LossConfig, upstream_balance
from reorg_jax.models.yolo import YOLO, Remat
from reorg_jax.training import optim
from reorg_jax.training import step as step_lib

__all__ = [
  'GAIN_FIELDS',
  'Assembly',
  'assemble',
  'initial_variables',
  'loss_config',
  'state_template',
  'zero_variables',
]

# The LossConfig fields a run may set (its gains); the rest are the model's geometry.
GAIN_FIELDS = (
  'box',
  'obj',
  'cls',
  'cls_pw',
  'obj_pw',
  'anchor_t',
  'label_smoothing',
  'aux_weight',
)

# The LossConfig fields the model decides.
_GEOMETRY = ('num_classes', 'anchors', 'strides', 'balance')


def loss_config(
  model: YOLO,
  *,
  image_size: int,
  num_classes: int | None = None,
  gains: Mapping[str, float] | None = None,
  scaled: bool = True,
) -> LossConfig:
  """The loss of ``model``'s heads with the run's gains.

  Args:
    model: the network (anchors, strides, ``C``).
    image_size: ``S``, for the gains' scaling.
    num_classes: ``C``; ``None``: the model's own.
    gains: any subset of :data:`GAIN_FIELDS`, or of LossConfig's other
      options (``capacity_fractions``, ``batch_groups``, ...); the rest keep
      LossConfig's defaults.
    scaled: apply upstream's trainer scaling of the gains for ``C``, ``L`` and
      ``S`` (``False``: the gains as given, as upstream's loss function takes them).

  Raises:
    ValueError: ``gains`` names the model's geometry (``num_classes``,
      ``anchors``, ``strides``, ``balance``) or no LossConfig field, or a value
      LossConfig refuses.
  """
  gains = dict(gains or {})
  allowed = {field.name for field in dataclasses.fields(LossConfig)} - set(_GEOMETRY)
  unknown = sorted(set(gains) - allowed)
  if unknown:
    raise ValueError(
      f'gains: {unknown[0]!r} is not a LossConfig option (the geometry comes from the model)'
    )
  config = LossConfig(
    num_classes=model.num_classes if num_classes is None else num_classes,
    anchors=model.anchors,
    strides=model.strides,
    balance=upstream_balance(len(model.strides)),
    **gains,
  )
  return optim.scaled_loss_gains(config, image_size=image_size) if scaled else config


@dataclasses.dataclass(frozen=True)
class Assembly:
  """The pieces of one training run.

  Attributes:
    model: the network.
    schedule: epochs, batch size, steps per epoch and recipe.
    loss_config: the loss, gains scaled for the run.
    setup: the static parts of the step (hashable).
    state: the initial state, on the default device (not yet placed).
  """

  model: YOLO
  schedule: optim.Schedule
  loss_config: LossConfig
  setup: step_lib.TrainSetup
  state: step_lib.TrainState

  def jit_step(
    self, *, state_sharding: Any = None
  ) -> Callable[..., tuple[step_lib.TrainState, dict[str, jax.Array]]]:
    """The jitted step (``(state, batch) -> (state, metrics)``, state donated)."""
    return step_lib.jit_train_step(self.setup, state_sharding=state_sharding)


def assemble(
  model: YOLO,
  *,
  image_size: int,
  schedule: optim.Schedule,
  gains: Mapping[str, float] | None = None,
  rng: jax.Array | None = None,
  compute_dtype: Any = jnp.float32,
  variables: Mapping[str, Any] | None = None,
  frozen_layers: int = 0,
  remat: Remat | None = None,
) -> Assembly:
  """A run's loss, optimiser, setup and initial state.

  Args:
    model: the network, with the run's ``C`` classes.
    image_size: ``S``.
    schedule: the run's geometry and recipe.
    gains: the loss gains (see :func:`loss_config`).
    rng: the initialisation key; ``None``: ``jax.random.key(0)``. Unused
      when ``variables`` are given.
    compute_dtype: the forward pass's dtype (``jnp.float32`` or ``jnp.bfloat16``).
    variables: start from these ``{'params', 'batch_stats'}`` instead.
    frozen_layers: the first this many layers get no update (upstream's
      ``--freeze``).
    remat: what the step's backward pass recomputes rather than keeps
      (:class:`~reorg_jax.models.yolo.Remat`: less memory, more work, the same
      values); ``None``: the step's default, nothing recomputed.
  """
  config = loss_config(model, image_size=image_size, gains=gains)
  setup, state = step_lib.create_train_state(
    model,
    rng=jax.random.key(0) if rng is None else rng,
    image_size=image_size,
    schedule=schedule,
    loss_config=config,
    compute_dtype=compute_dtype,
    variables=variables,
    **({'frozen_layers': frozen_layers} if frozen_layers else {}),
    **({'remat': remat} if remat is not None else {}),
  )
  return Assembly(model=model, schedule=schedule, loss_config=config, setup=setup, state=state)


def initial_variables(
  model: YOLO, *, image_size: int, rng: jax.Array | None = None
) -> dict[str, Any]:
  """``model``'s freshly initialised ``{'params', 'batch_stats'}`` (as :func:`assemble` makes them).

  Args:
    model: the network.
    image_size: ``S`` of the dummy input.
    rng: the key; ``None``: ``jax.random.key(0)``.
  """
  rng = jax.random.key(0) if rng is None else rng
  dummy = jnp.zeros((1, image_size, image_size, model.in_channels), jnp.float32)
  return dict(jax.jit(functools.partial(model.init, train=False))(rng, dummy))


def zero_variables(model: YOLO) -> dict[str, Any]:
  """``model``'s ``{'params', 'batch_stats'}`` as NumPy zeros, computing nothing.

  The shapes and dtypes of :func:`initial_variables`' (from ``jax.eval_shape``):
  enough to check weights against the model before paying for an initialisation.
  """
  side = 2 * model.max_stride  # the variables' shapes do not depend on the side
  dummy = jax.ShapeDtypeStruct((1, side, side, model.in_channels), jnp.float32)
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), dummy)
  return dict(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes))


def state_template(model: YOLO, *, image_size: int | None = None) -> step_lib.TrainState:
  """The structure, shapes and dtypes of ``model``'s training state, computing nothing.

  The leaves are ``jax.ShapeDtypeStruct``; pass the result as ``like`` to
  :class:`reorg_jax.training.checkpoint.Checkpoints`' restore methods. The
  state's structure depends on neither the schedule nor the gains, nor
  (for these fully convolutional models) the image side.

  Args:
    model: the network the checkpoint was written for (same ``C``).
    image_size: ``S`` of the dummy input; ``None``: twice the largest stride.
  """
  size = 2 * model.max_stride if image_size is None else image_size
  schedule = optim.Schedule(epochs=1, batch_size=1, steps_per_epoch=1)

  def build(key: jax.Array) -> step_lib.TrainState:
    return assemble(model, image_size=size, schedule=schedule, rng=key).state

  return jax.eval_shape(build, jax.random.key(0))
