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
   (:func:`reorg_jax.reference.step_check.state_from_snapshot`), for the same
   iterations and batches (``ours/``).
6. **Ours in float64**: the same step with ``jax_enable_x64``, the state and
   the forward pass in float64 (the head outputs enter the loss in float32,
   as in training), in a process of its own (``ours64/``). Against (4) it
   shows whether the two steps are the same arithmetic, apart from float32.

Upstream's sides run in one process, ours in another. The sides (2) to (6),
their worker processes and the comparison are :mod:`reorg_jax.reference.step_check`'s,
which ``reorg-jax verify`` runs from the user's weights; this script adds
the upstream run to iteration ``N`` and the ulp baseline. Each side is compared
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
import pathlib
import subprocess
import sys
import time
from typing import Any

import numpy as np

from reorg_jax.program.sections import RunConfig
from reorg_jax.reference import step_check

_HERE = pathlib.Path(__file__).resolve().parent
PARTS = step_check.PARTS
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
  parser.add_argument('--worker', choices=WORKERS[:1], help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.at < 0 or args.steps < 1:
    parser.error(f'--at must be >= 0 and --steps >= 1, got {args.at} and {args.steps}')
  unknown = set(args.sides.split(',')) - set(WORKERS)
  if unknown:
    parser.error(f'--sides: unknown {sorted(unknown)}; use {", ".join(WORKERS)}')
  return args


def run_upstream(config: RunConfig, out: pathlib.Path, *, at: int, steps: int) -> None:
  """Sides (1) to (4); writes ``snapshot.npz`` and their folders."""
  from reorg_jax.program import loop
  from reorg_jax.reference import train_aux

  harness = _harness()
  pieces = loop.setup(config, data_path=pathlib.Path(config.data.yaml))
  try:
    start = harness.initial_state_dict(pieces)
    started = time.perf_counter()
    whole = train_aux.train(
      config,
      start=start,
      feed=pieces.feed,
      val_feed=pieces.val_feed,
      schedule=pieces.schedule,
      num_classes=pieces.num_classes,
      total=at + steps,
      snapshot_at=at,
    )
    seconds = time.perf_counter() - started
    state = whole.snapshot
    np.savez(out / step_check.SNAPSHOT, **state)
    moved = step_check.one_rounding_away(
      {k: v for k, v in state.items() if k.startswith('model/')}, seed=config.seed
    )
    (out / 'perturbed').mkdir(parents=True, exist_ok=True)
    np.savez(out / 'perturbed' / 'start.npz', **moved)
    continued = functools.partial(step_check.upstream_steps, config, pieces, steps=steps)
    runs = {
      'upstream': whole,
      'resumed': continued(state),
      'perturbed': continued({**state, **moved}),
      'float64': continued(state, float64=True),
    }
  finally:
    pieces.close()
  for name, result in runs.items():
    step_check.save_side(
      out / name, [r for r in result.steps if r['step'] >= at], result.raw, result.ema
    )
  (out / 'upstream' / 'timing.json').write_text(json.dumps({'seconds': seconds, 'steps': at}))


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
  return {'at': at, 'steps': steps, **step_check.compare(out, COMPARISONS)}


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
    run_upstream(step_check.load_config(out), out, at=args.at, steps=args.steps)
    return 0

  harness = _harness()
  resolved = argparse.Namespace(
    config=args.config, epochs=args.epochs, seed=args.seed, steps=None, data=args.data
  )
  workers = [w for w in WORKERS if w in args.sides.split(',')]
  kept = [w for w in WORKERS if w not in workers]
  config = harness.resolve_config(resolved, out, reused=kept)
  if kept and not (out / step_check.SNAPSHOT).is_file():
    raise SystemExit(f'{out} holds no snapshot to compare with; run the upstream worker first')
  from reorg_jax.program.pieces import load_splits

  train_data, _ = load_splits(config, pathlib.Path(config.data.yaml))
  total = len(train_data) // config.train.batch_size * config.train.epochs
  if args.at + args.steps > total:  # the training loader drops a last partial batch
    raise SystemExit(f'--at {args.at} + --steps {args.steps} is past the run ({total} steps)')
  for worker in workers:
    print(f'running {worker} ...', flush=True)
    started = time.perf_counter()
    if worker == 'upstream':
      command = [sys.executable, __file__, '--worker', worker, '--out', str(out)]
      subprocess.run(command + ['--at', str(args.at), '--steps', str(args.steps)], check=True)
    else:
      status = step_check.spawn(worker, out=out, steps=args.steps)
      if status:
        raise SystemExit(f'the {worker} worker failed (exit status {status})')
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
