"""Both frameworks' steps from one trained state: upstream's run at iteration ``N``, continued.

``benchmarks/train_vs_upstream.py`` starts both sides from the same
initial weights, where SimOTA's costs nearly tie and nothing is saturated;
after a few steps the two runs part as two runs of upstream from one float32
rounding apart do, so a difference of method that shows only later (large
logits, converged BatchNorm statistics, momentum buffers and an EMA far from
the weights) would hide in that chaos. Here both sides take the *same* steps
from the *same* trained state:

1. **Upstream** trains the run (``python -m train``'s configuration, weights
   and batches, as in ``train_vs_upstream.py``) to iteration ``--at`` and
   hands out its whole state there (weights, BatchNorm statistics, EMA and
   its update count, Nesterov momentum buffers, accumulated gradient), then
   takes ``--steps`` more iterations. Snapshot and continuation are one run
   (``upstream/``).
2. **Upstream resumed**: a new upstream process loads that state and takes
   the same ``--steps`` iterations (``resumed/``). It must equal (1) to the
   bit, or the state handed over is incomplete.
3. **Upstream, one ulp away**: the same, from the state with every weight and
   BatchNorm statistic moved one float32 ulp (``perturbed/``): how far the
   smallest rounding difference carries.
4. **Upstream in float64**: the same in float64 arithmetic (``float64/``), the
   yardstick for float32 rounding: two float32 implementations that sum in
   other orders differ from each other by about as much as each differs from
   float64.
5. **Ours**: :func:`reorg_jax.program.loop.setup`'s jitted step on a
   :class:`~reorg_jax.training.step.TrainState` imported from the same state
   (:func:`state_from_snapshot`), for the same iterations and batches
   (``ours/``).
6. **Ours in float64**: the same step with ``jax_enable_x64``, the state and
   the forward pass in float64 (the head outputs enter the loss in float32,
   as in training), in a process of its own (``ours64/``). Against (4) it
   shows whether the two steps are the same arithmetic, apart from float32.

Upstream's sides run in one process, ours in another. Each side is compared
with a reference side: every step's loss parts (``losses.csv``), and per
tensor the change of the weights, of the BatchNorm statistics and of the EMA
over the ``--steps`` iterations (``tensors.csv``: the norm of the difference
of two changes over the norm of the reference's change, over all tensors
together). The last line printed is::

  trained_step: at=<N> steps=<k> loss_rel_err=<a> update_rel_err=<b> ema_rel_err=<c> update_rel_err_f64_ours=<d> update_rel_err_f64_upstream=<e> update_rel_err_f64_both=<f> baseline_update_rel_err=<g> resume_exact=<true|false>

``loss_rel_err`` is the largest relative difference of any loss part of any
step of ours against upstream, ``update_rel_err`` and ``ema_rel_err`` the
relative difference of the changes of the weights (with the statistics) and
of the EMA, ours against upstream; ``update_rel_err_f64_ours`` and
``_upstream`` the same of ours and of upstream (float32) against upstream in
float64, ``update_rel_err_f64_both`` that of ours in float64 against upstream
in float64, and ``baseline_update_rel_err`` that of (3) against (1).

    python benchmarks/trained_step.py --at 1200 --out runs/trained_step   # the default demo
    python benchmarks/trained_step.py --at 1200 --steps 3 --seed 1

Needs the test extra (torch and the reference package).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import time
import warnings
from typing import Any

import numpy as np

from reorg_jax.program.sections import RunConfig

_HERE = pathlib.Path(__file__).resolve().parent
_ROOT = _HERE.parent
PARTS = ('loss', 'box', 'obj', 'cls')
WORKERS = ('upstream', 'ours', 'ours64')


@functools.cache
def _harness() -> Any:
  """``train_vs_upstream.py`` (its configuration and start), loaded by path."""
  spec = importlib.util.spec_from_file_location('train_vs_upstream', _HERE / 'train_vs_upstream.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--at', type=int, required=True, help='iteration of the shared state')
  parser.add_argument('--steps', type=int, default=1, help='iterations both sides take from it')
  _harness().add_run_options(parser)
  parser.add_argument('--out', default='runs/trained_step', help='output directory')
  parser.add_argument(
    '--sides',
    default=','.join(WORKERS),
    help='workers to (re)run, comma-separated, of upstream (sides 1 to 4), ours and ours64; '
    'the others are read from --out (e.g. ours,ours64 after a change of ours)',
  )
  parser.add_argument('--worker', choices=WORKERS, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.at < 0 or args.steps < 1:
    parser.error(f'--at must be >= 0 and --steps >= 1, got {args.at} and {args.steps}')
  unknown = set(args.sides.split(',')) - set(WORKERS)
  if unknown:
    parser.error(f'--sides: unknown {sorted(unknown)}; use {", ".join(WORKERS)}')
  return args


# --- The sides --------------------------------------------------------------------------------


def _save_side(side: pathlib.Path, steps: list[dict[str, float]], raw: Any, ema: Any) -> None:
  side.mkdir(parents=True, exist_ok=True)
  _harness().write_csv(side / 'steps.csv', ('step', 'epoch', *PARTS, 'lr'), steps)
  np.savez(
    side / 'weights.npz',
    **{f'raw/{k}': np.asarray(v) for k, v in raw.items()},
    **{f'ema/{k}': np.asarray(v) for k, v in ema.items()},
  )


def run_upstream(config: RunConfig, out: pathlib.Path, *, at: int, steps: int) -> None:
  """Sides (1) to (4); writes ``snapshot.npz`` and their folders."""
  import upstream_train_aux

  from reorg_jax.program import loop

  harness = _harness()
  pieces = loop.setup(config, data_path=pathlib.Path(config.data.yaml))
  common = {
    'feed': pieces.feed,
    'val_feed': pieces.val_feed,
    'schedule': pieces.schedule,
    'num_classes': pieces.num_classes,
    'total': at + steps,
  }
  try:
    start = harness.initial_state_dict(pieces)
    started = time.perf_counter()
    whole = upstream_train_aux.train(config, start=start, snapshot_at=at, **common)
    seconds = time.perf_counter() - started
    state = whole.snapshot
    np.savez(out / 'snapshot.npz', **state)
    moved = harness.one_rounding_away(
      {k: v for k, v in state.items() if k.startswith('model/')}, seed=config.seed
    )
    (out / 'perturbed').mkdir(parents=True, exist_ok=True)
    np.savez(out / 'perturbed' / 'start.npz', **moved)
    runs = {
      'upstream': whole,
      'resumed': upstream_train_aux.train(config, start=start, resume=state, **common),
      'perturbed': upstream_train_aux.train(
        config, start=start, resume={**state, **moved}, **common
      ),
      'float64': upstream_train_aux.train(
        config, start=start, resume=state, float64=True, **common
      ),
    }
  finally:
    pieces.close()
  for name, result in runs.items():
    _save_side(out / name, [r for r in result.steps if r['step'] >= at], result.raw, result.ema)
  (out / 'upstream' / 'timing.json').write_text(json.dumps({'seconds': seconds, 'steps': at}))


def state_from_snapshot(pieces: Any, state: dict[str, np.ndarray]) -> Any:
  """Our :class:`~reorg_jax.training.step.TrainState` equal to upstream's ``state``.

  Weights and BatchNorm statistics, the EMA, the momentum buffers and the
  accumulated gradient go through :func:`reorg_jax.models.convert.import_state_dict`
  (the buffers and gradient in the parameters' places); ``step`` and the
  optimiser's update count come from ``state``. The step of the last update
  is set as if every iteration ``ni`` with ``ni % accumulate == 0`` stepped,
  which only the other step rule (``step_since_last``, refused by the
  comparison) reads.

  Args:
    pieces: the run's :func:`reorg_jax.program.loop.setup`.
    state: :func:`upstream_train_aux.snapshot` arrays.
  """
  import jax.numpy as jnp

  from reorg_jax.models import convert
  from reorg_jax.training import sgd
  from reorg_jax.training import step as train_lib

  def part(prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}

  model_state = part('model/')
  raw = convert.import_state_dict(pieces.model, model_state)
  ema = convert.import_state_dict(pieces.model, part('ema/'))
  momentum = convert.import_state_dict(pieces.model, {**model_state, **part('momentum/')})
  grads = convert.import_state_dict(pieces.model, {**model_state, **part('grad/')})
  step = int(state['step'])
  accumulate = pieces.schedule.accumulate
  opt_state = pieces.state.opt_state._replace(
    sgd=sgd.SgdState(momentum_buffer=momentum['params']),
    grad_sum=grads['params'],
    last_update_step=jnp.asarray((step - 1) // accumulate * accumulate, jnp.int32),
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


def run_ours(
  config: RunConfig, out: pathlib.Path, *, at: int, steps: int, float64: bool = False
) -> None:
  """Side (5), or (6) with ``float64``: our step from ``snapshot.npz``; writes ``ours[64]/``."""
  import jax

  if float64:
    jax.config.update('jax_enable_x64', True)
    # The loss keeps float32 arrays, into which float64 constants are written.
    warnings.filterwarnings('ignore', 'scatter inputs have incompatible types', FutureWarning)
  import jax.numpy as jnp

  from reorg_jax.models import convert
  from reorg_jax.program import loop
  from reorg_jax.training import optim
  from reorg_jax.training import step as train_lib

  pieces = loop.setup(config, data_path=pathlib.Path(config.data.yaml))
  try:
    state = state_from_snapshot(pieces, dict(np.load(out / 'snapshot.npz')))
    step_fn = pieces.step_fn
    if float64:
      wide = functools.partial(jnp.asarray, dtype=jnp.float64)
      state = jax.tree.map(lambda a: wide(a) if jnp.issubdtype(a.dtype, jnp.floating) else a, state)
      setup = pieces.train_setup.replace(compute_dtype=jnp.float64)
      step_fn = jax.jit(functools.partial(train_lib.train_step, setup))
    rows, spe = [], pieces.feed.steps_per_epoch
    for g in range(at, at + steps):
      epoch, index = divmod(g, spe)
      batch = next(iter(pieces.feed.epoch(epoch, start_step=index)))
      hparams = optim.hyperparams(g, schedule=pieces.schedule)
      placed = {'images': batch.images, 'targets': batch.targets, 'hparams': hparams}
      if float64:  # the rates and momentum in float64, as the host computes them
        placed['hparams'] = jax.tree.map(np.asarray, hparams)
      else:
        placed = train_lib.shard_batch(placed, pieces.batch_sharding)
      state, metrics = step_fn(state, placed)
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
      convert.export_state_dict(pieces.model, state.variables(use_ema=e), dtype=dtype)
      for e in (False, True)
    )
  finally:
    pieces.close()
  _save_side(out / ('ours64' if float64 else 'ours'), rows, raw, ema)


# --- Comparison --------------------------------------------------------------------------------


def loss_differences(out: pathlib.Path, side: str, reference: str) -> list[dict[str, float]]:
  """Per step and loss part: ``side``'s relative difference to ``reference``'s."""
  harness = _harness()
  want_rows = harness.read_csv(out / reference / 'steps.csv')
  got_rows = harness.read_csv(out / side / 'steps.csv')
  if [r['step'] for r in got_rows] != [r['step'] for r in want_rows]:
    raise SystemExit(f'{out / side}: other steps than {reference}/; rerun the comparison')
  return [
    {
      'step': int(want['step']),
      **{p: abs(got[p] - want[p]) / max(abs(want[p]), 1e-12) for p in PARTS},
    }
    for got, want in zip(got_rows, want_rows, strict=True)
  ]


def _starts(out: pathlib.Path, side: str) -> dict[str, np.ndarray]:
  """``side``'s state before its steps: the snapshot, with ``side/start.npz`` over it."""
  state = dict(np.load(out / 'snapshot.npz'))
  own = out / side / 'start.npz'
  if own.is_file():
    state.update(np.load(own))
  return state


def tensor_differences(out: pathlib.Path, side: str, reference: str) -> list[dict[str, Any]]:
  """Per floating tensor: how far ``side``'s change from its start is from ``reference``'s.

  Rows ``which`` (``raw`` weights and statistics or ``ema``), ``tensor``,
  ``kind`` (``stats`` for BatchNorm running statistics, else ``weight``),
  ``change`` (norm of the reference's change), ``error`` (norm of the
  difference of the two changes), in float64.
  """
  starts = {name: _starts(out, name) for name in (side, reference)}
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


def overall(rows: list[dict[str, Any]], *, which: str) -> float:
  """Relative difference of the changes over all of ``which``'s tensors together."""
  error = sum(r['error'] ** 2 for r in rows if r['which'] == which)
  change = sum(r['change'] ** 2 for r in rows if r['which'] == which)
  return float(np.sqrt(error / change)) if change > 0 else float(np.sqrt(error))


def worst_tensor(rows: list[dict[str, Any]], *, which: str = 'raw') -> dict[str, Any]:
  """The tensor with the largest relative error among those that carry the change.

  Tensors whose change is below 1e-3 of the largest are left out: their
  changes are a few ulps of their values.
  """
  rows = [r for r in rows if r['which'] == which]
  floor = 1e-3 * max(r['change'] for r in rows)
  return max((r for r in rows if r['change'] > floor), key=lambda r: r['error'] / r['change'])


COMPARISONS = (
  ('ours', 'upstream'),
  ('perturbed', 'upstream'),
  ('resumed', 'upstream'),
  ('ours', 'float64'),
  ('upstream', 'float64'),
  ('ours64', 'float64'),
)


def compare(out: pathlib.Path, *, at: int, steps: int) -> dict[str, Any]:
  """Writes ``losses.csv`` and ``tensors.csv``; returns the figures per comparison."""
  harness = _harness()
  figures: dict[str, Any] = {'at': at, 'steps': steps}
  loss_rows, tensor_rows = [], []
  for side, reference in COMPARISONS:
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
  harness.write_csv(out / 'losses.csv', ('side', 'reference', 'step', *PARTS), loss_rows)
  harness.write_csv(
    out / 'tensors.csv',
    ('side', 'reference', 'which', 'tensor', 'kind', 'change', 'error'),
    tensor_rows,
  )
  return figures


def summary_line(figures: dict[str, Any]) -> str:
  ours = figures['ours', 'upstream']
  return (
    f'trained_step: at={figures["at"]} steps={figures["steps"]} '
    f'loss_rel_err={ours["loss_rel_err"]:.3g} update_rel_err={ours["update_rel_err"]:.3g} '
    f'ema_rel_err={ours["ema_rel_err"]:.3g} '
    f'update_rel_err_f64_ours={figures["ours", "float64"]["update_rel_err"]:.3g} '
    f'update_rel_err_f64_upstream={figures["upstream", "float64"]["update_rel_err"]:.3g} '
    f'update_rel_err_f64_both={figures["ours64", "float64"]["update_rel_err"]:.3g} '
    f'baseline_update_rel_err={figures["perturbed", "upstream"]["update_rel_err"]:.3g} '
    f'resume_exact={str(figures["resumed", "upstream"]["exact"]).lower()}'
  )


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  out = pathlib.Path(args.out).resolve()
  if args.worker is not None:
    config = _harness().worker_config(out)
    if args.worker == 'upstream':
      run_upstream(config, out, at=args.at, steps=args.steps)
    else:
      run_ours(config, out, at=args.at, steps=args.steps, float64=args.worker == 'ours64')
    return 0

  harness = _harness()
  resolved = argparse.Namespace(
    config=args.config, epochs=args.epochs, seed=args.seed, steps=None, data=args.data
  )
  workers = [w for w in WORKERS if w in args.sides.split(',')]
  kept = [w for w in WORKERS if w not in workers]
  config = harness.resolve_config(resolved, out, reused=kept)
  if kept and not (out / 'snapshot.npz').is_file():
    raise SystemExit(f'{out} holds no snapshot to compare with; run the upstream worker first')
  from reorg_jax.program.pieces import load_splits

  train_data, _ = load_splits(config, pathlib.Path(config.data.yaml))
  total = len(train_data) // config.train.batch_size * config.train.epochs
  if args.at + args.steps > total:  # the training loader drops a last partial batch
    raise SystemExit(f'--at {args.at} + --steps {args.steps} is past the run ({total} steps)')
  env = {
    **os.environ,
  }
  for worker in workers:
    print(f'running {worker} ...', flush=True)
    started = time.perf_counter()
    command = [sys.executable, __file__, '--worker', worker, '--out', str(out)]
    command += ['--at', str(args.at), '--steps', str(args.steps)]
    subprocess.run(command, check=True, env=env)
    print(f'{worker}: {time.perf_counter() - started:.0f} s wall (process included)', flush=True)
  figures = compare(out, at=args.at, steps=args.steps)
  for side, reference in COMPARISONS[:2] + COMPARISONS[3:]:
    got = figures[side, reference]
    worst = got['worst']
    print(
      f'{side} against {reference}: loss parts {got["loss_rel_err"]:.3g}, changes of the weights '
      f'{got["update_rel_err"]:.3g} and of the EMA {got["ema_rel_err"]:.3g} (worst tensor '
      f'{worst["tensor"]}: {worst["error"] / worst["change"]:.3g})'
    )
  print(f'per step and per tensor: {out / "losses.csv"}, {out / "tensors.csv"}')
  print(summary_line(figures), flush=True)
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
