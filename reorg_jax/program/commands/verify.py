"""Check on your model and data that this port trains as upstream's YOLOv7 code: the same steps.

From --weights both frameworks start the same new fine-tuning run, as
`reorg-jax train --weights` starts one: the tensors transferred by name and
shape (upstream's intersect_dicts; those that do not fit, such as the
class-dependent head tensors for another class count, initialised from
--seed), the optimiser fresh (no momentum, no accumulated gradient), the EMA
equal to the weights. Then each takes the same --steps training iterations on
the same batches of the --data train split, in processes of their own, at the
same time (the three workers' memory together):

  upstream     the reference implementation (sas-yolov7: upstream's Model,
               ComputeLossAuxOTA and ModelEMA) in train_aux.py's loop: torch's
               Nesterov SGD over upstream's three parameter groups, its
               warm-up, gradient accumulation and LambdaLR
  float64      the same in float64
  perturbed64  the same in float64 from the start with every weight and
               statistic moved one float32 ulp: how far these steps carry the
               smallest rounding
  ours         this package's training step, as `reorg-jax train` runs it
  ours64       the same step in float64 (the head outputs enter the loss in
               float32, as upstream's loss sums its parts in float32)

The options are those of `reorg-jax train` (recipe, loss gains, augmentation,
batch, image size: its defaults, then --config, then the flags below), so the
check covers the run you would train. The batches come from this package's
loader and enter both frameworks identically: the check covers the model, the
loss with its label assignment, the optimiser, warm-up, EMA and BatchNorm
updates, not the data pipeline. The first iteration is the warm-up's first:
upstream's warm-up gives the weights a learning rate of 0 there (the biases
0.1), so it moves the biases and the BatchNorm statistics; from the second on
every tensor moves, with the momentum of the steps before (hence 2 steps by
default).

Printed: the loss parts (total, box, obj, cls) of every step on each side;
for each comparison the largest relative difference of a loss part and the
relative difference of the changes over the steps of all weights with the
BatchNorm statistics, and of the EMA (the norm of the difference of the two
changes over the norm of the reference's change, all tensors together), with
the tensor that differs most; then one verdict line on ours64 against
float64:

  agree         every figure within its tolerance (exit 0);
  DISAGREE      beyond it, and beyond how far upstream alone moves from one
                ulp away (perturbed64 against float64): the two frameworks do
                not take the same training step on this model and data, a
                difference of method (a loss term or gain, the label
                assignment, the optimiser, warm-up or EMA rule, a BatchNorm
                update, a layer built differently); tensors.csv ranks the
                tensors and losses.csv the steps (exit 1);
  INCONCLUSIVE  beyond the tolerance, but upstream alone moves as far from
                one ulp away: these steps carry a rounding beyond the
                tolerance (e.g. BatchNorm over few values: p6_nano at 64 px
                and batch 2 has a 1x1 grid at stride 64, where after two
                steps upstream's changes from one ulp away differ by 0.25)
                and cannot show a difference of method; a larger --img-size
                or --batch-size can (exit 1).

Why float64: in float32 two implementations that sum in other orders differ
by about as much as each differs from float64 (the ours/upstream and
*/float64 lines show it), and that grows with the steps; in float64 what is
left is the method. The tolerances are those of the project's cross-framework
test of its trained step (tests/test_trained_step.py): 1e-4 relative on every
loss part (both sides round the loss to float32 on the way, and a near-tie of
SimOTA's float32 costs may fall the other way) and 1e-5 relative on the
changes of the weights and statistics and of the EMA. There, after two
upstream iterations of the demo's run, the float64 sides differ by 2.5e-7
(loss) and 1.1e-8 (changes), in the demo's trained state at iteration 1200 by
3.8e-7 and 5.3e-8, while losing the momentum carried into a step moves the
changes by more than 1e-2.

Needs the reference implementation: pip install 'reorg-jax[verify]'
(torch==2.13.0 and sas-yolov7==1.0.7).

Written to --workdir (created if missing; earlier files of verify replaced):
  report.txt        what was printed
  losses.csv        per comparison (side, reference), step and loss part:
                    the relative difference
  tensors.csv       per comparison and tensor (which: raw weights and
                    statistics, or ema; kind: weight or stats): the norm of
                    the reference's change and of the difference of the changes
  config.yaml       the options both frameworks trained with
  model.yaml        the model the weights carry (when --model is not given)
  snapshot.npz      the shared start (upstream's names: model/, ema/,
                    momentum/, grad/, step, updates)
  upstream/ float64/ perturbed64/ ours/ ours64/
                    each side's steps.csv (loss parts and learning rate per
                    step) and weights.npz (raw and EMA state after the steps);
                    perturbed64/start.npz its start
  upstream.log ours.log ours64.log
                    each worker process's output

Exit status (every error is one line on stderr, no traceback):
  0  the float64 sides agree within the tolerances.
  1  they do not (DISAGREE or INCONCLUSIVE: the verdict line says by how
     much), or a side failed (its log is named).
  2  bad input, found before any side runs: the reference implementation not
     installed, an option's range, the weights (missing, unreadable, a deploy
     checkpoint without --model, too little of them fitting the model), the
     model file, the dataset (file and line named, or fewer images than a
     batch), options upstream's loop cannot follow (bfloat16, the other step
     rule, another aux-head weight, frozen layers), a --workdir that holds a
     training run.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reorg_jax.program import runtime

if TYPE_CHECKING:
  import numpy as np

  from reorg_jax.program.sections import RunConfig
  from reorg_jax.program.weights import Weights

__all__ = [
  'BASELINE',
  'COMPARISONS',
  'ORDER',
  'REFERENCE_MODULES',
  'SIDES',
  'SUMMARY',
  'VERDICT',
  'add_arguments',
  'run',
  'verdict_line',
]

ORDER = 5
SUMMARY = 'check that both frameworks take the same training steps on your weights and data'

# The modules of the reference implementation the sides import.
REFERENCE_MODULES = (
  'torch',
  'sas_yolov7.models.yolo',
  'sas_yolov7.utils.loss',
  'sas_yolov7.utils.torch_utils',
)
# The sides, in the order of the printed loss table.
SIDES = ('upstream', 'float64', 'ours', 'ours64', 'perturbed64')
# The pair the verdict is on, and its yardstick: upstream's float64 steps from one ulp away.
VERDICT = ('ours64', 'float64')
BASELINE = ('perturbed64', 'float64')
# (side, reference) pairs compared and printed.
COMPARISONS = (
  ('ours', 'upstream'),
  ('ours', 'float64'),
  ('upstream', 'float64'),
  VERDICT,
  BASELINE,
)
# Files of an earlier verify in --workdir, removed before a new one.
_OUTPUTS = ('report.txt', 'losses.csv', 'tensors.csv', 'snapshot.npz')


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """The options of ``verify``."""
  runtime.add_weights_argument(
    parser,
    help='the weights to start from: an upstream training checkpoint (.pt; its model, as '
    'train_aux.py --weights), a PyTorch state_dict file or an upstream deploy checkpoint (give '
    '--model), or a run directory or checkpoint of ours',
  )
  runtime.add_data_argument(parser, required=True, help='dataset YAML (train, val, nc, names)')
  runtime.add_model_argument(
    parser,
    help="'p6_nano' or a model YAML in upstream's format (default: the model the weights carry)",
  )
  parser.add_argument(
    '--steps',
    type=int,
    default=2,
    help='training iterations both frameworks take (default: %(default)s)',
  )
  runtime.add_batch_size_argument(
    parser,
    help="train.batch_size (default: the configuration's, as train)",
  )
  runtime.add_image_size_argument(
    parser,
    help="train.image_size in pixels, a multiple of the model's largest stride (default: "
    "the configuration's, as train)",
  )
  parser.add_argument('--seed', type=int, help='seed: batches, augmentation, untransferred tensors')
  parser.add_argument(
    '--config', help='YAML file overriding any of the default options (as train --config)'
  )
  parser.add_argument(
    '--allow-partial',
    action='store_true',
    help="go on when fewer than half of the model's tensors transfer from --weights",
  )
  parser.add_argument(
    '--one-at-a-time',
    action='store_true',
    help='run the three worker processes one after another instead of at once (about a '
    'third of the memory, for large models: YOLOv7-W6 at 128 px needs about 24 GB at once)',
  )
  runtime.add_workdir_argument(
    parser,
    default='runs/verify',
    help='where the report, tables and sides go (default: %(default)s)',
  )
  runtime.add_runtime_arguments(parser, distributed=False)


def _missing_reference() -> str | None:
  """The first module of the reference implementation that cannot be imported, or ``None``."""
  try:
    importlib.import_module('reorg_jax.reference')  # the torchvision stand-in, first
    for name in REFERENCE_MODULES:
      importlib.import_module(name)
  except ImportError as error:
    return error.name or str(error)
  return None


class _BadInput(ValueError):
  """Input found unusable before any side runs (exit status 2)."""


def _model_name(weights: Weights, *, model: str | None, workdir: Path) -> str:
  """``model.name``: ``--model``, else the model the weights carry (written to ``model.yaml``)."""
  from reorg_jax.program import weights as weights_lib

  if weights.deploy and model is None:
    raise _BadInput(
      f'--weights {weights.path} is a deploy checkpoint (IDetect head, no aux head): give '
      "--model, the model's training YAML (e.g. upstream's cfg/training/yolov7-w6.yaml)"
    )
  if model is not None:
    return model
  if isinstance(weights.model_yaml, str):  # a run of ours: its model's name
    return weights.model_yaml
  if weights.model_yaml is None:
    raise _BadInput(
      f'--weights {weights.path} ({weights.kind}) carries no model definition: give --model'
    )
  return str(weights_lib.save_model_yaml(weights, workdir))


def _check_upstream_can_follow(config: RunConfig) -> None:
  """Raises :class:`_BadInput` for options upstream's ``train_aux.py`` loop has no counterpart of."""
  from reorg_jax.reference import train_aux

  if config.model.compute_dtype != 'float32':
    raise _BadInput(
      f'model.compute_dtype = {config.model.compute_dtype}: verify trains both frameworks in '
      'float32 and float64 (upstream on a CPU has no mixed precision); set it to float32'
    )
  if config.recipe.step_since_last:
    raise _BadInput(
      "recipe.step_since_last = true is not train_aux.py's step rule (ni % accumulate == 0); "
      'set it to false'
    )
  if config.loss['aux_weight'] != train_aux.UPSTREAM_AUX_WEIGHT:
    raise _BadInput(
      f"loss.aux_weight = {config.loss['aux_weight']}: upstream's ComputeLossAuxOTA fixes the "
      f"aux head's weight at {train_aux.UPSTREAM_AUX_WEIGHT}"
    )
  if config.train.freeze:
    raise _BadInput(
      f"train.freeze = {config.train.freeze}: upstream's train_aux.py loop here freezes nothing; "
      'set it to 0'
    )


def _prepare(
  args: argparse.Namespace, workdir: Path
) -> tuple[Weights, RunConfig, dict[str, np.ndarray], list[str]]:
  """Reads and checks everything; returns ``(weights, config, snapshot, notes)``.

  Writes at most ``model.yaml`` (the model the weights carry, which the options name).
  """
  from reorg_jax.program import config as config_lib
  from reorg_jax.program import loop
  from reorg_jax.program import weights as weights_lib
  from reorg_jax.program.pieces import load_splits
  from reorg_jax.reference import step_check

  if workdir.exists() and not workdir.is_dir():
    raise _BadInput(f'--workdir {workdir} exists and is not a folder')
  if (workdir / 'config.yaml').is_file() and (workdir / 'checkpoints').is_dir():
    raise _BadInput(f'--workdir {workdir} holds a training run: give another --workdir')
  weights = weights_lib.read(args.weights)
  overrides = {
    'data.yaml': args.data,
    'model.name': _model_name(weights, model=args.model, workdir=workdir),
    'train.batch_size': args.batch_size,
    'train.image_size': args.image_size,
    'seed': args.seed,
    'log.progress': False,
    # Nothing is evaluated: the bound eval.max_detections puts on the image size does not apply.
    'eval.max_detections': 1,
  }
  config = config_lib.load(config_path=args.config, overrides=overrides)
  _check_upstream_can_follow(config)
  data_path = Path(config.data.yaml)
  splits = load_splits(config, data_path)
  per_epoch = len(splits[0]) // config.train.batch_size
  if args.steps > per_epoch * config.train.epochs:
    raise _BadInput(
      f'--steps {args.steps} is more than the run has ({config.train.epochs} epochs of '
      f'{per_epoch} steps)'
    )
  model = config_lib.build_model(config.model.name, num_classes=splits[0].num_classes)
  variables, notes = loop.start_from(
    weights,
    model,
    image_size=config.train.image_size,
    seed=config.seed,
    allow_partial=args.allow_partial,
  )
  pieces = loop.setup(config, data_path=data_path, splits=splits, variables=variables)
  try:  # the program's own fresh state: what a training run from these weights starts from
    snapshot = step_check.snapshot_from_state(pieces.model, pieces.state)
  finally:
    pieces.close()
  return weights, config, snapshot, list(notes)


def _write(path: Path, text: str) -> None:
  partial = path.with_name(path.name + '.partial')
  partial.write_text(text)
  os.replace(partial, path)


def _clear(workdir: Path) -> None:
  """Removes the files and side folders of an earlier verify in ``workdir``."""
  from reorg_jax.reference import step_check

  for side in SIDES:
    shutil.rmtree(workdir / side, ignore_errors=True)
  for name in (*_OUTPUTS, *(f'{worker}.log' for worker in step_check.WORKERS)):
    (workdir / name).unlink(missing_ok=True)


def _loss_table(workdir: Path) -> list[str]:
  """The loss parts of every step on each side."""
  from reorg_jax.reference import step_check

  rows = {side: step_check.read_csv(workdir / side / 'steps.csv') for side in SIDES}
  parts = step_check.PARTS
  width = max(len(side) for side in SIDES)
  lines = [f'{"step":>5}  {"side":<{width}}' + ''.join(f'{p:>17}' for p in parts)]
  for index, first in enumerate(rows[SIDES[0]]):
    for side in SIDES:
      row = rows[side][index]
      lines.append(
        f'{int(first["step"]):>5}  {side:<{width}}' + ''.join(f'{row[p]:>17.9g}' for p in parts)
      )
  return lines


def _comparison_line(side: str, reference: str, figure: dict[str, Any]) -> str:
  worst = figure['worst']
  where = (
    f' (worst tensor {worst["tensor"]}: {worst["error"] / worst["change"]:.3g})'
    if worst is not None
    else ''
  )
  return (
    f'{side} against {reference}: loss parts {figure["loss_rel_err"]:.3g}, changes of the '
    f'weights and statistics {figure["update_rel_err"]:.3g} and of the EMA '
    f'{figure["ema_rel_err"]:.3g}{where}'
  )


def verdict_line(figure: dict[str, Any], baseline: dict[str, Any], *, steps: int) -> str:
  """The verdict on the float64 pair :data:`VERDICT`, with the :data:`BASELINE` pair's figures.

  ``agree`` when every figure is within its tolerance; else ``INCONCLUSIVE``
  when upstream's own float64 steps from one float32 ulp away differ at least
  as much in each figure beyond it (these steps carry a rounding that far, so
  they cannot show a difference of method), else ``DISAGREE``.
  """
  from reorg_jax.reference import step_check

  measured = (
    f'in float64 the {steps} steps of the two frameworks differ by {figure["loss_rel_err"]:.2g} '
    f'in the loss parts (tolerance {step_check.FLOAT64_LOSS_TOLERANCE:g}) and by '
    f'{figure["update_rel_err"]:.2g} and {figure["ema_rel_err"]:.2g} in the changes of the '
    'weights and statistics and of the EMA (tolerance '
    f'{step_check.FLOAT64_CHANGE_TOLERANCE:g}, relative)'
  )
  beyond = step_check.beyond_float64_tolerance(figure)
  if not beyond:
    return (
      f'verdict: agree: {measured}: on this model and data reorg-jax takes the training steps '
      "of upstream's code"
    )
  rounding = ', '.join(f'{baseline[key]:.2g}' for key in beyond)
  if all(figure[key] <= baseline[key] for key in beyond):
    return (
      f'verdict: INCONCLUSIVE: {measured}, but upstream alone, from a start one float32 ulp '
      f'away, differs from itself by as much ({rounding}): these steps carry the smallest '
      'rounding beyond the tolerance (e.g. BatchNorm over few values: a small batch, a 1x1 '
      'coarsest grid) and cannot show a difference of method; check with a larger --img-size '
      'or --batch-size, or --steps 1 (biases and statistics only)'
    )
  worst = figure['worst']
  where = f'; the tensor that differs most is {worst["tensor"]}' if worst is not None else ''
  return (
    f'verdict: DISAGREE: {measured}, more than upstream alone from a start one float32 ulp away '
    f'({rounding}): the two frameworks do not take the same training step on this model and '
    'data, a difference of method (a loss term or gain, the label assignment, the optimiser, '
    'warm-up or EMA rule, a BatchNorm update, a layer built differently)'
    f'{where}; see tensors.csv and losses.csv'
  )


def _run_workers(args: argparse.Namespace, workdir: Path) -> int:
  """Runs the worker processes (at once, or one at a time) and waits for them; 0, or 1 after a
  failure's line."""
  from reorg_jax.reference import step_check

  env = dict(os.environ)
  cache = runtime.compile_cache_dir(args)
  if cache is None:
    env['JAX_ENABLE_COMPILATION_CACHE'] = 'false'
  else:
    env['JAX_COMPILATION_CACHE_DIR'] = str(cache)
  env.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')  # two jax processes on one GPU
  labels = {
    'upstream': 'upstream (float32, float64, perturbed64)',
    'ours': 'ours',
    'ours64': 'ours64',
  }
  logs = {worker: workdir / f'{worker}.log' for worker in step_check.WORKERS}
  workers = list(logs)
  rounds = [[worker] for worker in workers] if args.one_at_a_time else [workers]
  how = 'one after another' if args.one_at_a_time else f'in {len(workers)} processes'
  print(f'running {", ".join(labels[w] for w in workers)} {how} ...', flush=True)
  started = time.perf_counter()
  processes = {}
  failed = []
  try:
    for group in rounds:
      for worker in group:
        processes[worker] = step_check.start_worker(
          worker, out=workdir, steps=args.steps, log=logs[worker], env=env
        )
      for worker in group:
        if processes[worker].wait():
          failed.append(worker)
        else:
          print(f'{labels[worker]}: done after {time.perf_counter() - started:.0f} s', flush=True)
      if failed:
        break
  finally:
    for process in processes.values():
      if process.poll() is None:  # interrupted while waiting
        process.kill()
  for worker in failed:
    log = logs[worker]
    tail = [line for line in log.read_text(errors='replace').splitlines() if line.strip()]
    last = f': {tail[-1].strip()}' if tail else ''
    runtime.fail(
      f'the {labels[worker]} side failed (exit status {processes[worker].returncode}){last}; '
      f'its output is in {log}',
      status=1,
    )
  return 1 if failed else 0


def run(args: argparse.Namespace) -> int:
  """Runs ``verify``; returns the exit status (see the module docstring)."""
  parser = args.command_parser
  runtime.check_positive(
    parser,
    flags={'--steps': args.steps, '--img-size': args.image_size, '--batch-size': args.batch_size},
  )
  missing = _missing_reference()
  if missing is not None:
    return runtime.fail(
      f'verify runs the reference implementation, which is not installed here (no module '
      f"{missing}): pip install 'reorg-jax[verify]' (torch==2.13.0, sas-yolov7==1.0.7)",
      status=2,
    )
  runtime.start(args)

  from reorg_jax.data.dataset import DatasetError
  from reorg_jax.program import config as config_lib
  from reorg_jax.program import loop
  from reorg_jax.program import weights as weights_lib
  from reorg_jax.reference import step_check

  workdir = Path(args.workdir).resolve()
  try:
    weights, config, snapshot, notes = _prepare(args, workdir)
  except (
    _BadInput,
    config_lib.ConfigError,
    DatasetError,
    weights_lib.WeightsError,
    loop.RunError,
  ) as error:
    return runtime.fail(error, status=2)

  import numpy as np

  tcfg = config.train
  lines = [
    f'verifying {weights.path} ({weights.kind}, {weights.entry} weights; {config.model.name}) on '
    f'{config.data.yaml}: {args.steps} steps of {tcfg.batch_size} images at {tcfg.image_size} px '
    'from a new fine-tuning start, in both frameworks',
    *notes,
  ]
  print('\n'.join(lines), flush=True)
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    _clear(workdir)
    config_lib.dump(config.options, workdir / step_check.CONFIG)
    partial = workdir / 'snapshot.partial.npz'
    np.savez(partial, **snapshot)
    os.replace(partial, workdir / step_check.SNAPSHOT)
  except OSError as error:
    return runtime.fail(f'cannot write to {workdir}: {error}', status=1)

  status = _run_workers(args, workdir)
  if status:
    return status
  figures = step_check.compare(workdir, COMPARISONS)
  report = [
    *_loss_table(workdir),
    *(_comparison_line(side, ref, figures[side, ref]) for side, ref in COMPARISONS),
    f'per step and per tensor: {workdir / "losses.csv"}, {workdir / "tensors.csv"}',
    verdict_line(figures[VERDICT], figures[BASELINE], steps=args.steps),
  ]
  print('\n'.join(report), flush=True)
  try:
    _write(workdir / 'report.txt', '\n'.join(lines + report) + '\n')
  except OSError as error:
    return runtime.fail(f'cannot write the report to {workdir}: {error}', status=1)
  return 1 if step_check.beyond_float64_tolerance(figures[VERDICT]) else 0
