"""One pure training step for a YOLOv7 P6 model with lead and auxiliary heads.

Glossary: ``B`` batch, ``S`` image side, ``M`` max boxes per image, ``L``
levels.

:func:`train_step` runs the model in training mode, takes the
:func:`~reorg_jax.loss.aux_ota_loss` (lead head plus 0.25 times the
auxiliary head, targets chosen by the lead head), its gradient, the new
BatchNorm statistics, one micro-batch of upstream's optimiser recipe
(:mod:`reorg_jax.training.optim`, :mod:`reorg_jax.training.sgd`) and, when the
optimiser stepped, the EMA update (:mod:`reorg_jax.training.ema`). A step
whose loss or gradient is not finite changes nothing and says so in its
metrics; :func:`check_finite` turns that into an error naming the step,
before anything is saved.

Freezing (upstream's ``--freeze N``): ``create_train_state(...,
frozen_layers=N)`` keeps the parameters of layers ``0 .. N-1``
(:func:`reorg_jax.training.sgd.frozen_mask`) exactly as they are: the step
takes no gradient for them, the optimiser skips them (no update, no weight
decay, no momentum) and their EMA stays put. Their BatchNorm statistics still
follow the batches, as upstream's do in training mode. :func:`num_layers`
gives the largest ``N``.

Memory: ``create_train_state(..., remat=...)`` chooses what the backward
pass recomputes rather than keeps (:class:`reorg_jax.models.yolo.Remat`, by
blocks of layers; :func:`reorg_jax.models.yolo.apply_train`): the same
losses, gradients and statistics, less memory, more work. In bfloat16
(``compute_dtype``) the parameters, their gradients, the optimiser state and
the EMA stay float32: the step casts the float32 parameters to bfloat16 once,
runs the network on the cast copy and takes the gradient back through that
cast; the loss is float32.

Data parallelism: :func:`data_parallel` places a batch on a
``jax.sharding.Mesh`` along its ``'data'`` axis and the state replicated;
the same jitted step then runs on one device or many, the loss being the
same global function of the batch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from reorg_jax.loss import LossConfig, aux_ota_loss
from reorg_jax.models.yolo import YOLO, Remat, apply_train, unit_images
from reorg_jax.targets import Targets
from reorg_jax.training import ema as ema_lib
from reorg_jax.training import optim, sgd

__all__ = [
  'LossFn',
  'NonFiniteError',
  'TrainSetup',
  'TrainState',
  'apply_update',
  'check_finite',
  'create_train_state',
  'data_parallel',
  'jit_train_step',
  'loss_and_gradients',
  'num_layers',
  'place',
  'process_shard',
  'shard_batch',
  'train_step',
]

# ``(outputs, targets, image_hw, loss_config) -> (loss, parts)``, as :func:`aux_ota_loss`.
LossFn = Callable[
  [Sequence[jax.Array], Targets, tuple[int, int], LossConfig],
  tuple[jax.Array, dict[str, jax.Array]],
]


@flax.struct.dataclass
class TrainState:
  """Everything a run carries from step to step.

  Attributes:
    step: ``[]`` int32, the next global micro-batch index ``ni``.
    params: model parameters (float32).
    batch_stats: BatchNorm running statistics.
    opt_state: :class:`reorg_jax.training.sgd.RecipeState`.
    ema: ``{'params', 'batch_stats'}``, the exponential moving average used
      for evaluation.
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: sgd.RecipeState
  ema: Any

  def variables(self, *, use_ema: bool) -> dict[str, Any]:
    """``{'params', 'batch_stats'}`` of the EMA or of the raw model."""
    if use_ema:
      return dict(self.ema)
    return {'params': self.params, 'batch_stats': self.batch_stats}


@flax.struct.dataclass
class TrainSetup:
  """The static parts of training, hashable for ``jax.jit``.

  Attributes:
    model: the network.
    optimizer: the recipe optimiser (built from the parameter labels).
    loss_config: loss hyper-parameters, gains already scaled for the run.
    image_hw: network input ``(S, S)``.
    recipe: EMA constants.
    compute_dtype: dtype of the forward pass (``jnp.bfloat16`` runs the
      network in bfloat16 with float32 parameters; the loss is float32).
    remat: what the backward pass recomputes rather than keeps (memory only;
      see :func:`reorg_jax.models.yolo.apply_train`).
    frozen_layers: upstream's ``--freeze N``: the parameters of layers
      ``0 .. N-1`` stay as they are (the optimiser was built with the same ``N``).
  """

  model: YOLO = flax.struct.field(pytree_node=False)
  optimizer: sgd.RecipeOptimizer = flax.struct.field(pytree_node=False)
  loss_config: LossConfig = flax.struct.field(pytree_node=False)
  image_hw: tuple[int, int] = flax.struct.field(pytree_node=False)
  recipe: optim.RecipeConfig = flax.struct.field(pytree_node=False)
  compute_dtype: Any = flax.struct.field(pytree_node=False)
  remat: Remat = flax.struct.field(pytree_node=False)
  frozen_layers: int = flax.struct.field(pytree_node=False, default=0)


def num_layers(model: YOLO) -> int:
  """Layers of ``model`` (``model_0 .. model_{n-1}``, upstream's ``model.0 .. model.{n-1}``).

  The largest ``frozen_layers`` :func:`create_train_state` accepts; it equals
  :func:`reorg_jax.training.sgd.layer_count` of the model's parameters.
  """
  return len(model.specs)


def create_train_state(
  setup_model: YOLO,
  *,
  rng: jax.Array,
  image_size: int,
  schedule: optim.Schedule,
  loss_config: LossConfig,
  compute_dtype: Any = jnp.float32,
  variables: Mapping[str, Any] | None = None,
  frozen_layers: int = 0,
  remat: Remat = Remat.NONE,
) -> tuple[TrainSetup, TrainState]:
  """Initialises (or takes) the variables and builds optimiser, EMA and setup.

  Args:
    setup_model: the network.
    rng: PRNG key for initialisation (unused when ``variables`` is given).
    image_size: ``S``.
    schedule: epochs, batch size and steps per epoch of the run.
    loss_config: loss hyper-parameters with the run's gains (see
      :func:`reorg_jax.training.optim.scaled_loss_gains`).
    compute_dtype: forward-pass dtype.
    variables: start from these ``{'params', 'batch_stats'}`` (e.g. imported
      upstream weights) instead of a fresh initialisation.
    frozen_layers: upstream's ``--freeze N``: layers ``0 .. N-1`` are not
      trained (see the module docstring); at most :func:`num_layers`.
    remat: what the backward pass recomputes (:class:`reorg_jax.models.yolo.Remat`).

  Raises:
    ValueError: ``frozen_layers`` is negative or exceeds the model's layers
      (the message names both numbers).
  """
  count = num_layers(setup_model)
  if not 0 <= frozen_layers <= count:
    raise ValueError(
      f'cannot freeze the first {frozen_layers} layers: the model has {count} layers '
      f'(frozen_layers must lie in [0, {count}])'
    )
  if variables is None:
    dummy = jnp.zeros((1, image_size, image_size, setup_model.in_channels), jnp.float32)
    variables = jax.jit(functools.partial(setup_model.init, train=False))(rng, dummy)
  params, batch_stats = variables['params'], variables.get('batch_stats', {})
  optimizer = sgd.recipe_optimizer(
    sgd.param_labels(params), schedule=schedule, frozen_layers=frozen_layers
  )
  state = TrainState(
    step=jnp.asarray(0, jnp.int32),
    params=params,
    batch_stats=batch_stats,
    opt_state=optimizer.init(params),
    ema=ema_lib.ema_init({'params': params, 'batch_stats': batch_stats}),
  )
  setup = TrainSetup(
    model=setup_model,
    optimizer=optimizer,
    loss_config=loss_config,
    image_hw=(image_size, image_size),
    recipe=schedule.recipe,
    compute_dtype=compute_dtype,
    remat=remat,
    frozen_layers=frozen_layers,
  )
  return setup, state


def _all_finite(tree: Any) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves))


def apply_update(
  setup: TrainSetup,
  state: TrainState,
  *,
  grads: Any,
  batch_stats: Any,
  hparams: optim.HyperParams,
) -> tuple[TrainState, jax.Array]:
  """One micro-batch of the recipe optimiser and, if it stepped, the EMA update.

  The EMA of a frozen parameter (``setup.frozen_layers``) is the EMA of a
  constant: where it already equals the parameter it is kept as it is (the
  update ``d * ema + (1 - d) * p`` would move it by rounding), elsewhere it
  is updated as any other leaf.

  Returns the advanced state and a ``[]`` bool telling whether the weights changed.
  """
  params, opt_state, stepped = setup.optimizer.update(
    grads, state.opt_state, state.params, hparams=hparams
  )
  model_vars = {'params': params, 'batch_stats': batch_stats}

  def update_ema(ema: Any) -> Any:
    new = ema_lib.ema_update(ema, model_vars, updates=opt_state.num_updates, recipe=setup.recipe)
    if not setup.frozen_layers:
      return new
    kept = jax.tree.map(
      lambda frozen, old, average, p: jnp.where(old == p, old, average) if frozen else average,
      sgd.frozen_mask(params, setup.frozen_layers),
      ema['params'],
      new['params'],
      params,
    )
    return type(new)({**new, 'params': kept})

  ema = jax.lax.cond(stepped, update_ema, lambda e: e, state.ema)
  new_state = TrainState(
    step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state, ema=ema
  )
  return new_state, stepped


def train_step(
  setup: TrainSetup,
  state: TrainState,
  batch: Mapping[str, Any],
  *,
  loss_fn: LossFn = aux_ota_loss,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One micro-batch of training.

  Args:
    setup: static parts (see :class:`TrainSetup`).
    state: the current state.
    batch: ``images`` ``[B, S, S, 3]`` (uint8, converted by
      :func:`~reorg_jax.models.yolo.unit_images`, or float in ``[0, 1]``),
      ``targets`` (:class:`~reorg_jax.targets.Targets` ``[B, M]``) and
      ``hparams`` (:func:`reorg_jax.training.optim.hyperparams` of ``state.step``,
      computed on the host in float64 as upstream does).
    loss_fn: the loss of the float32 head outputs (static: bind it before
      ``jax.jit``, e.g. with ``functools.partial``). Training uses the
      default; ``benchmarks/train_speed.py`` passes a trivial one to time the
      step without assignment and loss.

  Returns:
    The new state and scalar metrics: ``loss`` (upstream's batch-sum loss),
    the parts ``loss_fn`` returns (``box``/``obj``/``cls``/``total``; the
    default's ``lead_positives`` and ``aux_positives``, the mean number of
    the lead and auxiliary heads' SimOTA positives per image of the batch),
    ``boxes_per_image`` (float32, the mean number of valid targets per image
    of the batch), ``stepped`` (the optimiser updated the weights) and
    ``finite`` (loss and gradient were finite; if not, the returned state is
    the old one with only ``step`` advanced).
  """
  targets: Targets = batch['targets']
  hparams: optim.HyperParams = batch['hparams']
  loss, parts, grads, batch_stats = loss_and_gradients(setup, state, batch, loss_fn=loss_fn)
  finite = jnp.isfinite(loss) & _all_finite(grads)
  # A branch, not a select of the two states: the update runs only on finite gradients
  # and no pass over every weight, momentum and EMA leaf chooses between old and new.
  new_state, stepped = jax.lax.cond(
    finite,
    lambda state: apply_update(setup, state, grads=grads, batch_stats=batch_stats, hparams=hparams),
    lambda state: (state.replace(step=state.step + 1), jnp.zeros((), bool)),
    state,
  )
  boxes_per_image = jnp.mean(jnp.sum(targets.valid, axis=1, dtype=jnp.float32))
  metrics = {
    'loss': loss,
    **parts,
    'boxes_per_image': boxes_per_image,
    'stepped': stepped & finite,
    'finite': finite,
  }
  return new_state, metrics


def loss_and_gradients(
  setup: TrainSetup,
  state: TrainState,
  batch: Mapping[str, Any],
  *,
  loss_fn: LossFn = aux_ota_loss,
) -> tuple[jax.Array, dict[str, jax.Array], Any, Any]:
  """The forward and backward pass of :func:`train_step`, without the update.

  Args:
    setup: static parts (see :class:`TrainSetup`); ``setup.remat`` decides
      what the backward pass recomputes, not the values.
    state: the current state (its ``params`` and ``batch_stats``).
    batch: ``images`` and ``targets`` as :func:`train_step` takes them
      (``hparams`` is not read).
    loss_fn: as in :func:`train_step`.

  Returns:
    ``(loss, parts, grads, batch_stats)``: the loss, the parts ``loss_fn``
    returns, the gradient of the loss with respect to ``state.params``
    (float32, zero for frozen layers) and the new BatchNorm statistics
    (dtypes of ``state.batch_stats``).
  """
  images = batch['images']
  if jnp.issubdtype(images.dtype, jnp.integer):
    images = unit_images(images)
  targets: Targets = batch['targets']
  frozen = sgd.frozen_mask(state.params, setup.frozen_layers) if setup.frozen_layers else None

  def objective(params):
    if frozen is not None:  # no gradient for frozen layers (torch's requires_grad=False)
      params = jax.tree.map(lambda skip, p: jax.lax.stop_gradient(p) if skip else p, frozen, params)
    # The one cast of the step: the network reads (and, under remat, keeps) this copy.
    cast = jax.tree.map(lambda p: p.astype(setup.compute_dtype), params)
    outputs, batch_stats = apply_train(
      setup.model,
      {'params': cast, 'batch_stats': state.batch_stats},
      images.astype(setup.compute_dtype),
      remat=setup.remat,
    )
    outputs = [o.astype(jnp.float32) for o in outputs]
    loss, parts = loss_fn(outputs, targets, setup.image_hw, setup.loss_config)
    return loss, (parts, batch_stats)

  (loss, (parts, batch_stats)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
  batch_stats = jax.tree.map(lambda new, old: new.astype(old.dtype), batch_stats, state.batch_stats)
  return loss, parts, grads, batch_stats


def jit_train_step(setup: TrainSetup, *, state_sharding: Any = None):
  """``train_step`` bound to ``setup``, jitted once with the state donated.

  ``state_sharding`` (optional, from :func:`data_parallel`) pins the layout of
  the returned state; batches carry their own placement (:func:`shard_batch`).
  """
  step = functools.partial(train_step, setup)
  out_shardings = None
  if state_sharding is not None:  # metrics replicated: every process can read them
    mesh = jax.tree.leaves(state_sharding)[0].mesh
    out_shardings = (state_sharding, NamedSharding(mesh, PartitionSpec()))
  return jax.jit(step, donate_argnums=(0,), out_shardings=out_shardings)


class NonFiniteError(FloatingPointError):
  """The loss or gradient of a step was not finite."""


def check_finite(metrics: Mapping[str, Any], *, step: int) -> None:
  """Raises :class:`NonFiniteError` naming ``step`` if its metrics say so."""
  if not bool(metrics['finite']):
    raise NonFiniteError(
      f'non-finite loss or gradient at step {step} (loss={float(metrics["loss"])}); '
      'the weights of that step were not applied and nothing was saved from it'
    )


def data_parallel(
  state: TrainState, *, devices: list[Any] | None = None
) -> tuple[Mesh, Any, NamedSharding]:
  """A one-axis ``'data'`` mesh, the state replicated on it, and the batch sharding.

  Returns:
    ``(mesh, state_sharding, batch_sharding)``: place the state with
    :func:`place` (``place(state, state_sharding)``), pass ``state_sharding`` to
    :func:`jit_train_step`, and place batches with :func:`shard_batch`.
  """
  mesh = Mesh(np.asarray(devices if devices is not None else jax.devices()), ('data',))
  replicated = NamedSharding(mesh, PartitionSpec())
  state_sharding = jax.tree.map(lambda _: replicated, state)
  return mesh, state_sharding, NamedSharding(mesh, PartitionSpec('data'))


def place(tree: Any, sharding: Any) -> Any:
  """``tree``'s arrays placed as ``sharding`` says (one sharding, or a tree of them).

  Every process passes the same global values and each keeps the pieces its
  own devices hold, so this works with one process or many (where
  ``jax.device_put`` of a local array onto other processes' devices cannot).
  """

  def put(value: Any, where: jax.sharding.Sharding) -> jax.Array:
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, where, lambda index: host[index])

  if isinstance(sharding, jax.sharding.Sharding):
    return jax.tree.map(lambda value: put(value, sharding), tree)
  return jax.tree.map(put, tree, sharding)


def process_shard(batch_sharding: NamedSharding) -> tuple[int, int]:
  """``(index, count)``: which block of every global batch's rows this process holds.

  With ``count`` processes, process ``index`` feeds rows
  ``[index * B / count, (index + 1) * B / count)`` (give these to
  :class:`reorg_jax.data.loader.BatchLoader` as ``shard_index, shard_count``).

  Raises:
    ValueError: the mesh does not give each process one contiguous block of
      devices in process order (the row blocks would not match the devices).
  """
  devices = list(batch_sharding.mesh.devices.flat)
  count = jax.process_count()
  per = len(devices) // count
  owners = [d.process_index for d in devices]
  if owners != [i // per for i in range(len(devices))]:
    raise ValueError(f'the batch mesh orders its devices by process as {owners}, not in blocks')
  return jax.process_index(), count


def shard_batch(batch: Mapping[str, Any], batch_sharding: NamedSharding) -> dict[str, Any]:
  """Places ``images`` and ``targets`` split along the batch axis, ``hparams`` replicated.

  Each process passes its own rows of the global batch (:func:`process_shard`;
  with one process, the whole batch), and the global arrays hold the
  processes' rows stacked in process order.

  Raises:
    ValueError: the global batch size is not a multiple of the number of devices.
  """
  devices = batch_sharding.mesh.size
  size = batch['images'].shape[0] * jax.process_count()
  if size % devices:
    raise ValueError(f'batch size {size} is not a multiple of the {devices} devices')

  def put(local: Any) -> jax.Array:
    local = np.asarray(local)
    shape = (local.shape[0] * jax.process_count(), *local.shape[1:])
    return jax.make_array_from_process_local_data(batch_sharding, local, shape)

  replicated = NamedSharding(batch_sharding.mesh, PartitionSpec())
  return {
    'images': put(batch['images']),
    'targets': jax.tree.map(put, batch['targets']),
    'hparams': place(batch['hparams'], replicated),
  }
