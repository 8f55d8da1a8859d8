"""Both frameworks' training steps from one state, compared tensor by tensor.

Glossary: ``g`` global iteration (upstream's ``ni``), ``k`` iterations taken
from the state; a *snapshot* is a whole training state in upstream's names,
as NumPy arrays (:func:`reorg_jax.reference.train_aux.snapshot`):
``model/<key>`` and ``ema/<key>`` (state dicts), ``momentum/<key>`` and
``grad/<key>`` per parameter (Nesterov buffers, gradient accumulated since
the last optimiser step), ``step`` (``g`` of the next iteration) and
``updates`` (optimiser steps taken, the EMA's count).

A check directory ``out`` holds the run's resolved options (``config.yaml``)
and the shared state (``snapshot.npz``). From it *sides* take the same ``k``
iterations on the same batches (the run's loader: each batch is a pure
function of the seed, epoch and index, so every process builds the same):

* ``upstream``: the reference package's ``Model``, ``ComputeLossAuxOTA`` and
  ``ModelEMA`` in ``train_aux.py``'s loop (:mod:`reorg_jax.reference.train_aux`),
  resumed from the snapshot (:func:`upstream_steps`);
* ``float64``: the same in float64 arithmetic: the yardstick for float32
  rounding;
* ``ours``: the program's jitted step (:func:`reorg_jax.program.loop.setup`)
  on the :class:`~reorg_jax.training.step.TrainState` that
  :func:`state_from_snapshot` makes (:func:`ours_steps`);
* ``ours64``: the same step with ``jax_enable_x64``, the state and the forward
  pass in float64 (the head outputs enter the loss in float32, as in training);
* ``perturbed64``: upstream in float64 from the snapshot with every weight and
  BatchNorm statistic moved one float32 ulp (:func:`one_rounding_away`): how
  far these steps carry the smallest rounding difference, the yardstick for
  ``ours64`` against ``float64``. Steps of a model whose BatchNorm layers
  normalise over few values (a 1x1 coarsest grid at a small batch) can carry
  a rounding far: a difference of ``ours64`` within this one is no sign of a
  difference of method.

A side may start from a state of its own (``<out>/<side>/start.npz`` over the
snapshot, e.g. a perturbed one). Each writes ``<out>/<side>/steps.csv`` (per
iteration ``step, epoch, loss, box, obj, cls, lr``; ``lr`` of the decay
group) and ``weights.npz`` (``raw/<key>`` and ``ema/<key>`` after the
iterations). :func:`compare` then compares pairs ``(side, reference)``: every
step's loss parts (``losses.csv``: relative differences), and per floating
tensor the change over the ``k`` iterations (``tensors.csv``: the norm of the
difference of the two changes and the norm of the reference's change), summed
over all tensors into one relative difference of the weights (with the
BatchNorm statistics) and one of the EMA.

Each worker runs in a process of its own, ``python -m
reorg_jax.reference.step_check WORKER --out DIR --steps K`` (:func:`start_worker`,
:func:`spawn`): float64 is a process-wide switch of jax, and the frameworks'
thread pools stay apart. The workers are ``upstream`` (sides ``upstream``,
``float64`` and ``perturbed64``, one process), ``ours`` and ``ours64``.

Users: ``reorg-jax verify`` (the snapshot of a new fine-tuning run from the
user's weights, :func:`snapshot_from_state`) and ``benchmarks/trained_step.py``
(upstream's state after ``N`` iterations of a run). Needs torch and the
reference package (the ``verify`` or ``test`` extra).
"""

from __future__ import annotations

import argparse
import csv
import functools
import os
import pathlib
import subprocess
import sys
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from reorg_jax.program.sections import RunConfig

__all__ = [
  'CONFIG',
  'FLOAT64_CHANGE_TOLERANCE',
  'FLOAT64_LOSS_TOLERANCE',
  'PARTS',
  'SNAPSHOT',
  'STEP_COLUMNS',
  'UPSTREAM_SIDES',
  'WORKERS',
  'beyond_float64_tolerance',
  'compare',
  'load_config',
  'loss_differences',
  'main',
  'one_rounding_away',
  'ours_steps',
  'overall',
  'read_csv',
  'run_worker',
  'save_side',
  'side_start',
  'snapshot_from_state',
  'spawn',
  'start_worker',
  'state_from_snapshot',
  'tensor_differences',
  'upstream_steps',
  'worst_tensor',
  'write_csv',
]

PARTS = ('loss', 'box', 'obj', 'cls')
STEP_COLUMNS = ('step', 'epoch', *PARTS, 'lr')
CONFIG = 'config.yaml'
SNAPSHOT = 'snapshot.npz'
WORKERS = ('upstream', 'ours', 'ours64')
# The sides of the upstream worker: (name, in float64, from one float32 ulp away).
UPSTREAM_SIDES = (('upstream', False, False), ('float64', True, False), ('perturbed64', True, True))

# How far the two float64 steps may differ and still be the same arithmetic: the relative
# difference of any loss part of any step, and of the changes of all weights and statistics
# (and of the EMA) together. Both sides round the loss to float32 on the way (ours takes
# float32 head outputs, upstream sums its parts in float32), the rest is float64; measured
# 2.5e-7 and 1.1e-8 on the tiny run of tests/test_trained_step.py, 3.8e-7 and 5.3e-8 in the
# demo's trained state. A difference of method moves the changes by far more (losing the
# momentum carried into a step, by more than 1e-2). The loss bound leaves room for a near-tie
# of SimOTA's float32 costs falling the other way.
FLOAT64_LOSS_TOLERANCE = 1e-4
FLOAT64_CHANGE_TOLERANCE = 1e-5


# --- Files --------------------------------------------------------------------------------------


def write_csv(path: pathlib.Path, columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> None:
  """``rows`` (extra keys ignored) under ``columns``, written whole (temporary file renamed)."""
  partial = path.with_name(path.name + '.partial')
  with open(partial, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=columns, extrasaction='ignore')
    writer.writeheader()
    writer.writerows(rows)
  os.replace(partial, path)


def read_csv(path: pathlib.Path) -> list[dict[str, float]]:
  with open(path, newline='') as f:
    return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def load_config(out: pathlib.Path) -> RunConfig:
  """The run's options, ``<out>/config.yaml`` (written by the caller)."""
  from reorg_jax.program import config as config_lib

  return config_lib.load(config_path=out / CONFIG, overrides=None)


def side_start(out: pathlib.Path, side: str | None = None) -> dict[str, np.ndarray]:
  """The state ``side`` starts from: the snapshot, with ``<out>/<side>/start.npz`` over it."""
  state = dict(np.load(out / SNAPSHOT))
  own = out / side / 'start.npz' if side is not None else None
  if own is not None and own.is_file():
    state.update(np.load(own))
  return state


def save_side(
  side: pathlib.Path,
  steps: Sequence[dict[str, float]],
  raw: dict[str, Any],
  ema: dict[str, Any],
) -> None:
  """A side's ``steps.csv`` and ``weights.npz`` (``raw/<key>``, ``ema/<key>``), each written whole."""
  side.mkdir(parents=True, exist_ok=True)
  write_csv(side / 'steps.csv', STEP_COLUMNS, steps)
  partial = side / 'weights.partial.npz'
  np.savez(
    partial,
    **{f'raw/{k}': np.asarray(v) for k, v in raw.items()},
    **{f'ema/{k}': np.asarray(v) for k, v in ema.items()},
  )
  os.replace(partial, side / 'weights.npz')


# --- States -------------------------------------------------------------------------------------


def _part(state: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
  return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def one_rounding_away(state: dict[str, np.ndarray], *, seed: int) -> dict[str, np.ndarray]:
  """``state`` with every float32 value moved one ulp up or down (random signs from ``seed``).

  Other tensors (integer counters) and the anchors, which are fixed, are
  returned unchanged.
  """
  rng = np.random.default_rng([seed, 0x5E1F])
  moved = {}
  for key, value in state.items():
    if value.dtype != np.float32 or 'anchor' in key:
      moved[key] = value
      continue
    toward = np.where(rng.random(value.shape) < 0.5, -np.inf, np.inf).astype(np.float32)
    moved[key] = np.nextafter(value, toward)
  return moved


def snapshot_from_state(model: Any, state: Any) -> dict[str, np.ndarray]:
  """Our :class:`~reorg_jax.training.step.TrainState` as a snapshot (upstream's names).

  The inverse of :func:`state_from_snapshot`: the weights and statistics, the
  EMA, and per parameter the momentum buffer and the accumulated gradient
  (:func:`reorg_jax.models.convert.export_state_dict` layouts), ``step`` and
  ``updates``. The fresh state of a new run (:func:`reorg_jax.program.loop.setup`)
  gives zero buffers and gradients, an EMA equal to the weights, step 0 and no
  updates: where upstream's ``train_aux.py`` starts a run from ``--weights``.

  Args:
    model: the network the state is of.
    state: the state (on any device; fetched).
  """
  import jax

  from reorg_jax.models import convert

  state = jax.device_get(state)

  def parameters(tree: Any) -> dict[str, np.ndarray]:
    exported = convert.state_dict_from_variables({'params': tree}, buffers={})
    return {k: v for k, v in exported.items() if np.issubdtype(v.dtype, np.floating)}

  opt = state.opt_state
  snapshot = {
    **{
      f'model/{k}': v
      for k, v in convert.export_state_dict(model, state.variables(use_ema=False)).items()
    },
    **{
      f'ema/{k}': v
      for k, v in convert.export_state_dict(model, state.variables(use_ema=True)).items()
    },
    **{f'momentum/{k}': v for k, v in parameters(opt.sgd.momentum_buffer).items()},
    **{f'grad/{k}': v for k, v in parameters(opt.grad_sum).items()},
  }
  snapshot['step'] = np.asarray(int(state.step), np.int64)
  snapshot['updates'] = np.asarray(int(opt.num_updates), np.int64)
  return snapshot


def state_from_snapshot(pieces: Any, state: dict[str, np.ndarray]) -> Any:
  """Our :class:`~reorg_jax.training.step.TrainState` equal to the snapshot ``state``.

  Weights and BatchNorm statistics, the EMA, the momentum buffers and the
  accumulated gradient go through :func:`reorg_jax.models.convert.import_state_dict`
  (the buffers and gradient in the parameters' places); ``step`` and the
  optimiser's update count come from ``state``. The step of the last update
  is set as if every iteration ``g`` with ``g % accumulate == 0`` stepped (-1
  before the first iteration), which only the other step rule
  (``recipe.step_since_last``, refused by the comparison) reads.

  Args:
    pieces: the run's :func:`reorg_jax.program.loop.setup`.
    state: a snapshot.
  """
  import jax.numpy as jnp

  from reorg_jax.models import convert
  from reorg_jax.training import sgd
  from reorg_jax.training import step as train_lib

  model_state = _part(state, 'model/')
  raw = convert.import_state_dict(pieces.model, model_state)
  ema = convert.import_state_dict(pieces.model, _part(state, 'ema/'))
  momentum = convert.import_state_dict(pieces.model, {**model_state, **_part(state, 'momentum/')})
  grads = convert.import_state_dict(pieces.model, {**model_state, **_part(state, 'grad/')})
  step = int(state['step'])
  accumulate = pieces.schedule.accumulate
  last = (step - 1) // accumulate * accumulate if step else -1
  opt_state = pieces.state.opt_state._replace(
    sgd=sgd.SgdState(momentum_buffer=momentum['params']),
    grad_sum=grads['params'],
    last_update_step=jnp.asarray(last, jnp.int32),
    num_updates=jnp.asarray(int(state['updates']), jnp.int32),
  )
  ours = train_lib.TrainState(
    step=jnp.asarray(step, jnp.int32),
    params=raw['params'],
    batch_stats=raw['batch_stats'],
    opt_state=opt_state,
    ema={'params': ema['params'], 'batch_stats': ema['batch_stats']},
  )
  return train_lib.place(ours, pieces.state_sharding)


def _pieces(config: RunConfig, state: dict[str, np.ndarray]) -> Any:
  """The run's :func:`reorg_jax.program.loop.setup`, its variables the snapshot's (no initialisation)."""
  from reorg_jax.models import convert
  from reorg_jax.program import config as config_lib
  from reorg_jax.program import loop
  from reorg_jax.program.pieces import load_splits

  data_path = pathlib.Path(config.data.yaml)
  splits = load_splits(config, data_path)
  model = config_lib.build_model(config.model.name, num_classes=splits[0].num_classes)
  variables = convert.import_state_dict(model, _part(state, 'model/'))
  return loop.setup(config, data_path=data_path, splits=splits, variables=variables)


# --- The sides ----------------------------------------------------------------------------------


def upstream_steps(
  config: RunConfig, pieces: Any, state: dict[str, np.ndarray], *, steps: int, float64: bool = False
) -> Any:
  """Upstream's ``steps`` iterations from the snapshot ``state``; a :class:`~reorg_jax.reference.train_aux.UpstreamRun`.

  Its ``steps`` rows are the iterations taken; no epoch is evaluated.

  Args:
    config: the run's options.
    pieces: the run's :func:`reorg_jax.program.loop.setup` (batches, schedule, ``C``).
    state: the snapshot to resume from.
    steps: ``k``.
    float64: upstream in float64 (see :func:`reorg_jax.reference.train_aux.train`).
  """
  from reorg_jax.reference import train_aux

  at = int(state['step'])
  return train_aux.train(
    config,
    start=_part(state, 'model/'),
    feed=pieces.feed,
    val_feed=pieces.val_feed,
    schedule=pieces.schedule,
    num_classes=pieces.num_classes,
    total=at + steps,
    resume=state,
    float64=float64,
    evaluate_epochs=False,
  )


def ours_steps(
  config: RunConfig, state: dict[str, np.ndarray], *, steps: int, float64: bool = False
) -> tuple[list[dict[str, float]], dict[str, np.ndarray], dict[str, np.ndarray]]:
  """Our ``steps`` iterations from the snapshot ``state``: ``(steps.csv rows, raw, ema)``.

  The step is the program's (:func:`reorg_jax.program.loop.setup`'s jitted
  ``step_fn`` on the run's sharded batches); with ``float64`` the same
  :func:`reorg_jax.training.step.train_step` with ``jax_enable_x64`` on, the
  state, the forward pass and the rates in float64. The raw and EMA states come
  back as state dicts (float64 ones with ``float64``).
  """
  import jax

  if float64:
    jax.config.update('jax_enable_x64', True)
    # The loss keeps float32 arrays, into which float64 constants are written.
    warnings.filterwarnings('ignore', 'scatter inputs have incompatible types', FutureWarning)
  import jax.numpy as jnp

  from reorg_jax.models import convert
  from reorg_jax.training import optim
  from reorg_jax.training import step as train_lib

  pieces = _pieces(config, state)
  try:
    ours = state_from_snapshot(pieces, state)
    step_fn = pieces.step_fn
    if float64:
      wide = functools.partial(jnp.asarray, dtype=jnp.float64)
      ours = jax.tree.map(lambda a: wide(a) if jnp.issubdtype(a.dtype, jnp.floating) else a, ours)
      setup = pieces.train_setup.replace(compute_dtype=jnp.float64)
      step_fn = jax.jit(functools.partial(train_lib.train_step, setup))
    rows, spe, at = [], pieces.feed.steps_per_epoch, int(state['step'])
    for g in range(at, at + steps):
      epoch, index = divmod(g, spe)
      batch = next(iter(pieces.feed.epoch(epoch, start_step=index)))
      hparams = optim.hyperparams(g, schedule=pieces.schedule)
      placed = {'images': batch.images, 'targets': batch.targets, 'hparams': hparams}
      if float64:  # the rates and momentum in float64, as the host computes them
        placed['hparams'] = jax.tree.map(np.asarray, hparams)
      else:
        placed = train_lib.shard_batch(placed, pieces.batch_sharding)
      ours, metrics = step_fn(ours, placed)
      metrics = jax.device_get(metrics)
      train_lib.check_finite(metrics, step=g)
      rows.append(
        {
          'step': g,
          'epoch': epoch,
          **{part: float(metrics['total' if part == 'loss' else part]) for part in PARTS},
          'lr': float(hparams.lrs[optim.DECAY]),
        }
      )
    dtype = np.float64 if float64 else np.float32
    raw, ema = (
      convert.export_state_dict(pieces.model, ours.variables(use_ema=e), dtype=dtype)
      for e in (False, True)
    )
  finally:
    pieces.close()
  return rows, raw, ema


def run_worker(worker: str, out: pathlib.Path, *, steps: int) -> None:
  """One worker's sides from ``out``'s snapshot, written to ``out/<side>/``.

  ``upstream``: the :data:`UPSTREAM_SIDES` (``perturbed64`` writes its start,
  ``start.npz``, too); ``ours`` and ``ours64``: those sides.
  """
  config = load_config(out)
  if worker == 'upstream':
    state = side_start(out)
    at = int(state['step'])
    pieces = _pieces(config, state)
    try:
      for side, float64, perturbed in UPSTREAM_SIDES:
        (out / side).mkdir(parents=True, exist_ok=True)
        if perturbed:
          moved = one_rounding_away(_part(state, 'model/'), seed=config.seed)
          np.savez(out / side / 'start.npz', **{f'model/{k}': v for k, v in moved.items()})
        start = side_start(out, side)
        run = upstream_steps(config, pieces, start, steps=steps, float64=float64)
        save_side(out / side, [r for r in run.steps if r['step'] >= at], run.raw, run.ema)
    finally:
      pieces.close()
  else:
    rows, raw, ema = ours_steps(
      config, side_start(out, worker), steps=steps, float64=worker == 'ours64'
    )
    save_side(out / worker, rows, raw, ema)


def start_worker(
  worker: str,
  *,
  out: pathlib.Path,
  steps: int,
  log: pathlib.Path | None = None,
  env: dict[str, str] | None = None,
) -> subprocess.Popen:
  """Starts :func:`run_worker` in a new process of this interpreter (not waited for).

  Args:
    worker: one of :data:`WORKERS`.
    out: the check directory.
    steps: ``k``.
    log: where the process's output goes (``None``: this process's).
    env: the process's environment (``None``: this process's).
  """
  command = [sys.executable, '-m', __name__, worker, '--out', str(out), '--steps', str(steps)]
  if log is None:
    return subprocess.Popen(command, env=env)
  with open(log, 'w') as stream:  # the process keeps its own descriptor
    return subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT, env=env)


def spawn(worker: str, *, out: pathlib.Path, steps: int) -> int:
  """Runs :func:`run_worker` in a new process, its output this process's; its exit status."""
  process = start_worker(worker, out=out, steps=steps)
  try:
    return process.wait()
  finally:
    if process.poll() is None:  # interrupted while waiting
      process.kill()


# --- Comparison ---------------------------------------------------------------------------------


def loss_differences(out: pathlib.Path, side: str, reference: str) -> list[dict[str, float]]:
  """Per step and loss part: ``side``'s relative difference to ``reference``'s.

  Raises:
    ValueError: the two sides took other steps.
  """
  want_rows = read_csv(out / reference / 'steps.csv')
  got_rows = read_csv(out / side / 'steps.csv')
  if [r['step'] for r in got_rows] != [r['step'] for r in want_rows]:
    raise ValueError(f'{out / side}: other steps than {reference}/; rerun the comparison')
  return [
    {
      'step': int(want['step']),
      **{p: abs(got[p] - want[p]) / max(abs(want[p]), 1e-12) for p in PARTS},
    }
    for got, want in zip(got_rows, want_rows, strict=True)
  ]


def tensor_differences(out: pathlib.Path, side: str, reference: str) -> list[dict[str, Any]]:
  """Per floating tensor: how far ``side``'s change from its start is from ``reference``'s.

  Rows ``which`` (``raw`` weights and statistics or ``ema``), ``tensor``,
  ``kind`` (``stats`` for BatchNorm running statistics, else ``weight``),
  ``change`` (norm of the reference's change), ``error`` (norm of the
  difference of the two changes), in float64. The anchors, which no step
  changes, are left out.
  """
  starts = {name: side_start(out, name) for name in (side, reference)}
  after = {name: np.load(out / name / 'weights.npz') for name in (side, reference)}
  rows = []
  for key in after[reference].files:
    which, name = key.split('/', 1)
    origin = f'{"model" if which == "raw" else "ema"}/{name}'
    if not np.issubdtype(starts[reference][origin].dtype, np.floating) or 'anchor' in name:
      continue
    want, got = (
      after[n][key].astype(np.float64) - starts[n][origin].astype(np.float64)
      for n in (reference, side)
    )
    rows.append(
      {
        'which': which,
        'tensor': name,
        'kind': 'stats' if 'running_' in name else 'weight',
        'change': float(np.linalg.norm(want)),
        'error': float(np.linalg.norm(got - want)),
      }
    )
  return rows


def overall(rows: Sequence[dict[str, Any]], *, which: str) -> float:
  """Relative difference of the changes over all of ``which``'s tensors together."""
  error = sum(r['error'] ** 2 for r in rows if r['which'] == which)
  change = sum(r['change'] ** 2 for r in rows if r['which'] == which)
  return float(np.sqrt(error / change)) if change > 0 else float(np.sqrt(error))


def worst_tensor(rows: Sequence[dict[str, Any]], *, which: str = 'raw') -> dict[str, Any] | None:
  """The tensor with the largest relative error among those that carry the change.

  Tensors whose change is below 1e-3 of the largest are left out: their
  changes are a few ulps of their values. ``None`` when nothing changed.
  """
  rows = [r for r in rows if r['which'] == which]
  largest = max((r['change'] for r in rows), default=0.0)
  carrying = [r for r in rows if r['change'] > 1e-3 * largest]
  if not carrying:
    return None
  return max(carrying, key=lambda r: r['error'] / r['change'])


def compare(
  out: pathlib.Path, comparisons: Sequence[tuple[str, str]]
) -> dict[tuple[str, str], dict[str, Any]]:
  """Compares each ``(side, reference)``; writes ``losses.csv`` and ``tensors.csv`` to ``out``.

  Returns per pair: ``loss_rel_err`` (the largest relative difference of any
  loss part of any step), ``update_rel_err`` and ``ema_rel_err`` (:func:`overall`
  of the weights with the statistics, and of the EMA), ``worst``
  (:func:`worst_tensor`) and ``exact`` (every loss and change equal to the bit).

  Raises:
    ValueError: a pair took other steps.
  """
  figures: dict[tuple[str, str], dict[str, Any]] = {}
  loss_rows, tensor_rows = [], []
  for side, reference in comparisons:
    losses = loss_differences(out, side, reference)
    tensors = tensor_differences(out, side, reference)
    pair = {'side': side, 'reference': reference}
    loss_rows += [{**pair, **r} for r in losses]
    tensor_rows += [{**pair, **r} for r in tensors]
    figures[side, reference] = {
      'loss_rel_err': max(max(r[p] for p in PARTS) for r in losses),
      'update_rel_err': overall(tensors, which='raw'),
      'ema_rel_err': overall(tensors, which='ema'),
      'worst': worst_tensor(tensors),
      'exact': all(r['error'] == 0 for r in tensors)
      and all(r[p] == 0 for r in losses for p in PARTS),
    }
  write_csv(out / 'losses.csv', ('side', 'reference', 'step', *PARTS), loss_rows)
  write_csv(
    out / 'tensors.csv',
    ('side', 'reference', 'which', 'tensor', 'kind', 'change', 'error'),
    tensor_rows,
  )
  return figures


def beyond_float64_tolerance(figure: dict[str, Any]) -> list[str]:
  """The figures of a float64 pair of :func:`compare` not within their tolerance.

  ``loss_rel_err`` against :data:`FLOAT64_LOSS_TOLERANCE`, ``update_rel_err``
  and ``ema_rel_err`` against :data:`FLOAT64_CHANGE_TOLERANCE`; empty when the
  two sides take the same steps.
  """
  tolerances = {
    'loss_rel_err': FLOAT64_LOSS_TOLERANCE,
    'update_rel_err': FLOAT64_CHANGE_TOLERANCE,
    'ema_rel_err': FLOAT64_CHANGE_TOLERANCE,
  }
  return [key for key, tolerance in tolerances.items() if not figure[key] < tolerance]


def main(argv: Sequence[str] | None = None) -> int:
  """``python -m reorg_jax.reference.step_check WORKER --out DIR --steps K``: one worker."""
  parser = argparse.ArgumentParser(description=main.__doc__)
  parser.add_argument('worker', choices=WORKERS)
  parser.add_argument('--out', required=True, help='the check directory')
  parser.add_argument('--steps', type=int, required=True, help='iterations from the snapshot')
  args = parser.parse_args(argv)
  run_worker(args.worker, pathlib.Path(args.out).resolve(), steps=args.steps)
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
