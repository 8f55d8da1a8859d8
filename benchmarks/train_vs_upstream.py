"""The same training run in upstream PyTorch and in reorg-jax, step by step.

Both sides start from the same weights, consume the same batches and are
evaluated by the same code, so what differs is only the model, the loss, the
optimiser recipe and the EMA:

* **Weights.** Our model is initialised exactly as ``python -m train`` does
  (``create_train_state`` with ``jax.random.key(seed)``), exported with
  :func:`reorg_jax.models.convert.export_state_dict` and loaded (strictly) into
  upstream's ``Model`` built from the same model YAML.
* **Batches.** Both sides read :class:`reorg_jax.data.loader.BatchLoader` with the
  run's seed and augmentation: every batch is a pure function of
  ``(seed, epoch, step)``, so the two processes build identical batches.
* **Ours** is ``python -m train`` itself (:func:`reorg_jax.program.loop.run`) with the
  resolved configuration: its ``steps.csv`` and ``results.csv`` are the
  demo's.
* **Upstream** is the reference package's ``Model``, ``ComputeLossAuxOTA``
  and ``ModelEMA`` with torch's Nesterov ``SGD`` over upstream's three
  parameter groups and ``LambdaLR``, in ``train_aux.py``'s loop (not in the
  package; :mod:`reorg_jax.reference.train_aux` writes it from its formulas and lists
  them). Its hyper-parameters are upstream's ``hyp.scratch.p6.yaml`` with
  the run's ``recipe`` and ``loss`` values on top, so a default of ours that
  drifted from upstream's file shows as a difference.
* **Evaluation.** After every epoch each side's EMA weights are scored on the
  validation split by the same selection (:func:`reorg_jax.models.inference.select_detections`,
  from upstream's decoded outputs on its side) and the same
  :class:`reorg_jax.evaluate.DetectionEvaluator` with the run's ``eval``
  thresholds, so the metrics differ only by training.

Each side runs in its own worker process, one after the other, so neither's
thread pool slows the other. Outputs in ``--out``:

* ``ours/`` and ``upstream/``: each side's ``steps.csv`` (per-step total and
  box/obj/cls losses and the decay group's learning rate), ``results.csv``
  (per-epoch metrics), ``weights.npz`` (final raw and EMA state in
  upstream's names) and ``timing.json`` (wall seconds);
* ``steps.csv`` (both sides' losses and their relative difference per
  step), ``epochs.csv`` (both sides' metrics), ``weights.csv`` (per tensor,
  the largest absolute and the relative difference of the final raw and EMA
  weights and BatchNorm statistics) and ``train_vs_upstream.png`` (the
  curves overlaid).

The last line printed is::

  agreement: steps=<n> first_divergence_step=<k> loss_rel_err_first50=<x> map50_ours=<a> map50_upstream=<b>

``first_divergence_step`` is the first step whose total losses differ by
more than 1e-3 relative (``none`` if no step does), ``loss_rel_err_first50``
the largest relative difference over the first 50 steps, and the mAP@0.5
values those of the last evaluated epoch (``nan`` when no epoch ended).

    python benchmarks/train_vs_upstream.py                 # the default demo, seed 0
    python benchmarks/train_vs_upstream.py --epochs 2 --seed 1 --out runs/agreement
    python benchmarks/train_vs_upstream.py --steps 3       # a few steps, no evaluation
    python benchmarks/train_vs_upstream.py --sides perturbed --out runs/agreement  # baseline

**Rounding baseline.** The side ``perturbed`` is upstream once more, from the
same weights with every floating-point value moved to a neighbouring float32
(one unit in the last place, up or down at random, seeded by the run's seed):
the smallest change float rounding can make. Compared with ``upstream`` it
shows how fast upstream's own recipe turns one rounding into different runs,
the yardstick for the cross-framework figures. Its tables go to
``baseline/`` (the same files, columns ``*_upstream`` and ``*_perturbed``),
and a second line is printed before the ``agreement:`` line::

  baseline: steps=<n> first_divergence_step=<k> loss_rel_err_first50=<x> map50_upstream=<a> map50_perturbed=<b>

Needs the test extra (``pip install -e '.[test]'``: torch and the reference
package).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import pathlib
import subprocess
import sys
import time
from typing import Any

import numpy as np

from reorg_jax.program.sections import RunConfig
from reorg_jax.reference.step_check import one_rounding_away

_ROOT = pathlib.Path(__file__).resolve().parents[1]
_TESTS = _ROOT / 'tests'
DIVERGENCE = 1e-3  # Relative difference of the total loss that counts as diverged.
FIRST_STEPS = 50  # Steps over which loss_rel_err_first50 is taken.
STEP_COLUMNS = ('step', 'epoch', 'loss', 'box', 'obj', 'cls', 'lr')
EPOCH_COLUMNS = ('epoch', 'step', 'precision', 'recall', 'map50', 'map50_95')
SIDES = ('ours', 'upstream', 'perturbed')


def add_run_options(parser: argparse.ArgumentParser) -> None:
  """``--config``, ``--epochs``, ``--seed`` and ``--data``: the run both sides train."""
  parser.add_argument(
    '--config', help='override YAML (default: reorg_jax/program/configs/default.yaml)'
  )
  parser.add_argument('--epochs', type=int, help='train.epochs')
  parser.add_argument('--seed', type=int, help='seed (weights, data order, augmentation)')
  parser.add_argument('--data', help='dataset YAML (default: the synthetic dataset)')


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  add_run_options(parser)
  parser.add_argument('--steps', type=int, help='train.max_steps: stop after this many steps')
  parser.add_argument('--out', default='runs/train_vs_upstream', help='output directory')
  parser.add_argument(
    '--sides',
    default='ours,upstream',
    help='sides to (re)run, comma-separated, of ours, upstream and perturbed (upstream from '
    'weights one float32 rounding away: a baseline); a side not run is read from --out',
  )
  parser.add_argument('--worker', choices=SIDES, help=argparse.SUPPRESS)
  return parser.parse_args(argv)


# --- The run's configuration and starting point, shared by both workers ---------------------


def resolve_config(args: argparse.Namespace, out: pathlib.Path, *, reused: list[str]) -> RunConfig:
  """The checked configuration of the run, its dataset written, saved as ``out/config.yaml``.

  A side in ``reused`` may have stopped at another ``train.max_steps``: the
  comparison covers the steps and epochs both sides ran.

  Raises:
    SystemExit: an option upstream's recipe cannot follow (bfloat16, the
      other step rule), or a side in ``reused`` (read from ``out``, not
      rerun) was trained with other options (each differing key is named).
  """
  from reorg_jax.program import config as config_lib
  from reorg_jax.program.pieces import dataset_yaml

  overrides = {
    'seed': args.seed,
    'train.epochs': args.epochs,
    'train.max_steps': args.steps,
    'data.yaml': args.data,
    'log.progress': False,
  }
  config = config_lib.load(config_path=args.config, overrides=overrides)
  if config.model.compute_dtype != 'float32':
    raise SystemExit(
      f'model.compute_dtype = {config.model.compute_dtype}: the comparison trains both '
      'sides in float32 (upstream on CPU has no mixed precision); set it to float32'
    )
  if config.recipe.step_since_last:
    raise SystemExit(
      "recipe.step_since_last = true is not train_aux.py's step rule (ni % accumulate == 0); "
      'set it to false to compare with upstream'
    )
  out.mkdir(parents=True, exist_ok=True)
  overrides['data.yaml'] = str(dataset_yaml(config, workdir=out).resolve())
  config = config_lib.load(config_path=args.config, overrides=overrides)
  saved = out / 'config.yaml'
  if reused and saved.is_file():
    before = config_lib.flatten(config_lib.read_yaml(saved))
    now = config_lib.flatten(config.options)
    changed = [
      f'{k}: {before.get(k)!r} -> {now.get(k)!r}'
      for k in now
      if before.get(k) != now[k] and k != 'train.max_steps'  # only shared steps are compared
    ]
    if changed:
      raise SystemExit(
        f'{out}: the {" and ".join(reused)} run there used other options ('
        + '; '.join(changed)
        + '); rerun it (--sides ours,upstream) or choose another --out'
      )
  config_lib.dump(config.options, saved)
  return config


def initial_state_dict(pieces: Any) -> dict[str, np.ndarray]:
  """The starting weights of ``python -m train``, in upstream's names.

  Args:
    pieces: the run's :func:`reorg_jax.program.loop.setup`.
  """
  from reorg_jax.models import convert

  exported = convert.export_state_dict(pieces.model, pieces.state.variables(use_ema=False))
  return {k: np.asarray(v) for k, v in exported.items()}


def write_csv(path: pathlib.Path, columns: tuple[str, ...], rows: list[dict[str, Any]]) -> None:
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=columns, extrasaction='ignore')
    writer.writeheader()
    writer.writerows(rows)


def read_csv(path: pathlib.Path) -> list[dict[str, float]]:
  with open(path, newline='') as f:
    return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


# --- Ours: python -m train ---------------------------------------------------------------------


def run_ours(config: dict[str, Any], side: pathlib.Path) -> None:
  import shutil

  from reorg_jax.models import convert
  from reorg_jax.program import loop

  shutil.rmtree(side, ignore_errors=True)
  started = time.perf_counter()
  result = loop.run(config, workdir=side, resume=False)
  seconds = time.perf_counter() - started
  raw = convert.export_state_dict(result.model, result.state.variables(use_ema=False))
  ema = convert.export_state_dict(result.model, result.state.variables(use_ema=True))
  np.savez(
    side / 'weights.npz',
    **{f'raw/{k}': np.asarray(v) for k, v in raw.items()},
    **{f'ema/{k}': np.asarray(v) for k, v in ema.items()},
  )
  (side / 'timing.json').write_text(json.dumps({'seconds': seconds, 'steps': result.steps}))


def run_upstream(config: dict[str, Any], side: pathlib.Path, *, perturb: bool = False) -> None:
  """Upstream's loop; ``perturb``: from :func:`one_rounding_away` of the shared start."""
  from reorg_jax.program import loop
  from reorg_jax.reference import train_aux

  pieces = loop.setup(config, data_path=pathlib.Path(config.data.yaml))
  try:
    start = initial_state_dict(pieces)
    if perturb:
      start = one_rounding_away(start, seed=config.seed)
    np.savez(side / 'initial.npz', **start)
    result = train_aux.train(
      config,
      start=start,
      feed=pieces.feed,
      val_feed=pieces.val_feed,
      schedule=pieces.schedule,
      num_classes=pieces.num_classes,
      total=pieces.total_steps,
    )
  finally:
    pieces.close()
  write_csv(side / 'steps.csv', STEP_COLUMNS, result.steps)
  write_csv(side / 'results.csv', EPOCH_COLUMNS, result.epochs)
  np.savez(
    side / 'weights.npz',
    **{f'raw/{k}': v for k, v in result.raw.items()},
    **{f'ema/{k}': v for k, v in result.ema.items()},
  )
  (side / 'timing.json').write_text(
    json.dumps({'seconds': result.seconds, 'steps': len(result.steps)})
  )


# --- Comparison --------------------------------------------------------------------------------


def compare(
  out: pathlib.Path,
  *,
  sides: tuple[str, str] = ('ours', 'upstream'),
  into: pathlib.Path | None = None,
) -> RunConfig:
  """Writes the joined tables and the figure of two sides; returns their agreement figures.

  Args:
    out: the run's directory, holding one folder per side.
    sides: ``(compared, reference)``; relative differences are taken to the
      reference, and columns are suffixed with the side names.
    into: where the tables go (default ``out``).
  """
  a_name, b_name = sides
  into = out if into is None else into
  into.mkdir(parents=True, exist_ok=True)
  a_steps = {int(r['step']): r for r in read_csv(out / a_name / 'steps.csv')}
  b_steps = {int(r['step']): r for r in read_csv(out / b_name / 'steps.csv')}
  shared = sorted(set(a_steps) & set(b_steps))
  rows, divergence, first = [], None, 0.0
  for step in shared:
    a, b = a_steps[step]['loss'], b_steps[step]['loss']
    rel = abs(a - b) / max(abs(b), 1e-12)
    if divergence is None and not rel <= DIVERGENCE:
      divergence = step
    if step < FIRST_STEPS:
      first = max(first, rel)
    row = {'step': step, 'epoch': int(a_steps[step]['epoch']), 'rel_err': rel}
    for part in ('loss', 'box', 'obj', 'cls'):
      row[f'{part}_{a_name}'], row[f'{part}_{b_name}'] = a_steps[step][part], b_steps[step][part]
    rows.append(row)
  columns = ('step', 'epoch', 'rel_err') + tuple(
    f'{p}_{s}' for p in ('loss', 'box', 'obj', 'cls') for s in sides
  )
  write_csv(into / 'steps.csv', columns, rows)

  a_epochs = read_csv(out / a_name / 'results.csv')
  b_epochs = {int(r['epoch']): r for r in read_csv(out / b_name / 'results.csv')}
  epoch_rows = []
  for row in a_epochs:
    other = b_epochs.get(int(row['epoch']))
    if other is None:
      continue
    joined = {'epoch': int(row['epoch'])}
    for key in ('precision', 'recall', 'map50', 'map50_95'):
      joined[f'{key}_{a_name}'], joined[f'{key}_{b_name}'] = row[key], other[key]
    epoch_rows.append(joined)
  write_csv(
    into / 'epochs.csv',
    ('epoch',)
    + tuple(f'{k}_{s}' for k in ('precision', 'recall', 'map50', 'map50_95') for s in sides),
    epoch_rows,
  )
  weight_rows = weight_differences(out, sides=sides)
  write_csv(into / 'weights.csv', ('which', 'tensor', 'max_abs', 'rel'), weight_rows)
  also = out / 'perturbed'
  shown = sides == ('ours', 'upstream') and (also / 'timing.json').is_file()
  plot(into, rows, epoch_rows, sides=sides, also=also if shown else None)
  last = epoch_rows[-1] if epoch_rows else {}
  return {
    'steps': len(shared),
    'first_divergence_step': 'none' if divergence is None else divergence,
    'loss_rel_err_first50': first,
    f'map50_{a_name}': last.get(f'map50_{a_name}', float('nan')),
    f'map50_{b_name}': last.get(f'map50_{b_name}', float('nan')),
    'weights': weight_rows,
  }


def weight_differences(
  out: pathlib.Path, *, sides: tuple[str, str] = ('ours', 'upstream')
) -> list[dict[str, Any]]:
  """Per floating tensor of the final raw and EMA state: largest and relative difference."""
  compared, reference = (np.load(out / side / 'weights.npz') for side in sides)
  rows = []
  for key in reference.files:
    which, name = key.split('/', 1)
    want = reference[key]
    if not np.issubdtype(want.dtype, np.floating) or 'anchor' in name:
      continue
    got = compared[key].astype(np.float64)
    diff = got - want.astype(np.float64)
    norm = np.linalg.norm(want.astype(np.float64))
    rows.append(
      {
        'which': which,
        'tensor': name,
        'max_abs': float(np.max(np.abs(diff))) if diff.size else 0.0,
        'rel': float(np.linalg.norm(diff) / norm) if norm > 0 else float(np.linalg.norm(diff)),
      }
    )
  return rows


def plot(
  out: pathlib.Path,
  rows: list[dict[str, Any]],
  epoch_rows: list[dict[str, Any]],
  *,
  sides: tuple[str, str] = ('ours', 'upstream'),
  also: pathlib.Path | None = None,
) -> None:
  """Losses per step and mAP@0.5 per epoch of both sides; ``also``: the baseline's mAP too."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
  steps = [r['step'] for r in rows]
  for side, style in ((sides[1], '-'), (sides[0], '--')):
    left.plot(steps, [r[f'loss_{side}'] for r in rows], style, lw=1, label=side)
  left.set_yscale('log')
  left.set_xlabel('step')
  left.set_ylabel('total loss (per image)')
  left.legend()
  if epoch_rows:
    epochs = [r['epoch'] + 1 for r in epoch_rows]
    for side, style in ((sides[1], 'o-'), (sides[0], 's--')):
      right.plot(epochs, [r[f'map50_{side}'] for r in epoch_rows], style, ms=3, label=side)
    if also is not None:
      baseline = read_csv(also / 'results.csv')
      right.plot(
        [r['epoch'] + 1 for r in baseline],
        [r['map50'] for r in baseline],
        '^:',
        ms=3,
        color='0.45',
        label='upstream, start one float32 ulp away',
      )
    right.set_xlabel('epoch')
    right.set_ylabel('mAP@0.5 (EMA, validation)')
    right.legend()
  else:
    right.text(0.5, 0.5, 'no epoch evaluated', ha='center', va='center')
  fig.tight_layout()
  fig.savefig(out / 'train_vs_upstream.png', dpi=110)
  plt.close(fig)


def agreement_line(
  figures: dict[str, Any],
  *,
  sides: tuple[str, str] = ('ours', 'upstream'),
  label: str = 'agreement',
) -> str:
  return (
    f'{label}: steps={figures["steps"]} '
    f'first_divergence_step={figures["first_divergence_step"]} '
    f'loss_rel_err_first50={figures["loss_rel_err_first50"]:.3g} '
    + ' '.join(f'map50_{side}={figures[f"map50_{side}"]:.4f}' for side in sides)
  )


def worker_config(out: pathlib.Path) -> RunConfig:
  """In a worker process: the run's saved configuration."""
  from reorg_jax.program import config as config_lib

  return config_lib.load(config_path=out / 'config.yaml', overrides=None)


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  out = pathlib.Path(args.out).resolve()
  if args.worker is not None:
    config = worker_config(out)
    side = out / args.worker
    side.mkdir(parents=True, exist_ok=True)
    if args.worker == 'ours':
      run_ours(config, side)
    else:
      run_upstream(config, side, perturb=args.worker == 'perturbed')
    return 0

  sides = [s for s in args.sides.split(',') if s]
  unknown = set(sides) - set(SIDES)
  if unknown:
    raise SystemExit(f'--sides: unknown side(s) {sorted(unknown)}; use {", ".join(SIDES)}')
  kept = [s for s in ('ours', 'upstream') if s not in sides]
  if 'perturbed' not in sides and (out / 'perturbed' / 'timing.json').is_file():
    kept.append('perturbed')  # compared again below, so it must match the run's options
  resolve_config(args, out, reused=kept)
  env = {
    **os.environ,
  }
  for side in sides:
    print(f'running {side} ...', flush=True)
    started = time.perf_counter()
    subprocess.run(
      [sys.executable, __file__, '--worker', side, '--out', str(out)], check=True, env=env
    )
    print(f'{side}: {time.perf_counter() - started:.0f} s wall (process included)', flush=True)
  done = {side for side in SIDES if (out / side / 'timing.json').is_file()}
  if not {'ours', 'upstream'} <= done and not {'upstream', 'perturbed'} <= done:
    missing = sorted({'ours', 'upstream'} - done)
    raise SystemExit(f'{out} holds no finished {" and ".join(missing)} run; run it with --sides')
  for side in SIDES:
    if side in done:
      timing = json.loads((out / side / 'timing.json').read_text())
      print(
        f'{side}: {timing["steps"]} steps in {timing["seconds"]:.0f} s (training and evaluation)'
      )
  if {'upstream', 'perturbed'} <= done:
    baseline = compare(out, sides=('perturbed', 'upstream'), into=out / 'baseline')
    print(agreement_line(baseline, sides=('upstream', 'perturbed'), label='baseline'))
  if not {'ours', 'upstream'} <= done:
    return 0
  figures = compare(out)
  worst = max(figures['weights'], key=lambda r: r['rel'], default=None)
  if worst is not None:
    print(
      f'final weights: largest relative difference {worst["rel"]:.3g} '
      f'({worst["which"]} {worst["tensor"]}); all per tensor in {out / "weights.csv"}'
    )
  print(agreement_line(figures), flush=True)
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
