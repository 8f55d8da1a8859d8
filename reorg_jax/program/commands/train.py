"""Train a YOLOv7 P6 model, from scratch or from weights (upstream's train_aux.py).

With no options it trains the small P6 model (p6_nano) on the built-in
synthetic dataset (written to <workdir>/data on first use), evaluating the EMA
weights on the validation split every epoch. Options come from the defaults
(configs/default.yaml in the package), then --config FILE (any subset of the
same keys), then the flags below.

--weights starts from another model's weights: an upstream training
checkpoint (*_training.pt, read without running any of its code), an upstream
deploy checkpoint (the aux head starts fresh), a PyTorch state_dict file, or a
run directory or checkpoint of ours. Tensors are transferred by name and
shape, as upstream's intersect_dicts: another class count keeps everything
but the head's class-dependent tensors. The optimiser, the EMA and the schedule
start fresh (upstream's train_aux.py would also load a checkpoint's optimiser
state, EMA and epoch count when the file holds them).

Exit status (every error is one line on stderr, no traceback):
  0  the run finished.
  1  the run could not go on: the run directory is in use by another run (its
     pid is named) or holds another run, a write failed (disk full, read-only
     directory; the path and the newest complete checkpoint are named), every
     checkpoint is damaged, or a step's loss was not finite.
  2  bad input, found before anything is written or trained: an option's type
     or range, a YAML syntax error (file, line and column named), the model
     file, the weights file, the dataset (file and line named; a label folder
     whose files are named after none of the images; a box of zero width or
     height), a dataset smaller than one batch, a --workdir that is not a
     folder, --resume with no complete checkpoint to resume from, or --resume
     over a dataset whose files changed since the run recorded them (the
     changes named; --accept-changed-data goes on).
  130, 143  stopped by SIGINT (Ctrl-C) or SIGTERM: the line names the steps
     done and the checkpoint --resume continues from. Checkpoint writes in
     flight are finished first (a second signal abandons them); a stop never
     leaves a half-written checkpoint behind.

Each split's counts are printed as it is loaded (images, labelled, without a
label file, with an empty one, boxes, label files named after no image).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from reorg_jax.program import interrupts, runtime

__all__ = ['ORDER', 'OVERRIDES', 'SUMMARY', 'add_arguments', 'main', 'run']

ORDER = 0
SUMMARY = 'train a P6 model (default: the small model on the synthetic dataset)'

# Flag -> dotted option it overrides.
OVERRIDES = {
  'epochs': 'train.epochs',
  'batch_size': 'train.batch_size',
  'image_size': 'train.image_size',
  'steps': 'train.max_steps',
  'data': 'data.yaml',
  'model': 'model.name',
  'seed': 'seed',
  'save_every': 'checkpoint.save_every',
  'freeze': 'train.freeze',
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """The options of ``train``."""
  parser.add_argument(
    '--config', help='YAML file overriding any of the default options (same keys and nesting)'
  )
  parser.add_argument(
    '--workdir', default='runs/train', help='run directory (default: %(default)s)'
  )
  parser.add_argument(
    '--resume',
    action='store_true',
    help='continue from the newest checkpoint in --workdir; the options that define the run '
    '(model, data, sizes, seed, recipe, augmentation, loss, --freeze) come from its config.yaml '
    'and cannot change',
  )
  parser.add_argument('--epochs', type=int, help='train.epochs')
  parser.add_argument('--batch-size', type=int, help='train.batch_size (all devices together)')
  parser.add_argument(
    '--img-size', '--image-size', dest='image_size', type=int, help='train.image_size (pixels)'
  )
  parser.add_argument('--steps', type=int, help='train.max_steps: stop after this many steps')
  parser.add_argument('--data', help='dataset YAML (default: the synthetic dataset)')
  parser.add_argument(
    '--model',
    '--cfg',
    dest='model',
    help="model.name: 'p6_nano' or a model YAML in upstream's format (default: the "
    "config's; with --weights of an upstream training checkpoint, the YAML pickled in it)",
  )
  parser.add_argument('--seed', type=int, help='seed')
  parser.add_argument('--save-every', type=int, help='checkpoint.save_every (steps)')
  parser.add_argument(
    '--weights',
    metavar='FILE',
    help='initial weights: an upstream training or deploy checkpoint (.pt), a PyTorch '
    'state_dict file, or a run directory or checkpoint directory of ours; transferred by name '
    "and shape (upstream's intersect_dicts); not with --resume",
  )
  parser.add_argument(
    '--allow-partial',
    action='store_true',
    help="with --weights: go on when fewer than half of the model's tensors transfer",
  )
  parser.add_argument(
    '--freeze',
    type=int,
    metavar='N',
    help="train.freeze: freeze the first N layers (upstream's --freeze N): their parameters "
    'get no update, no weight decay and no momentum. Their BatchNorm running statistics still '
    'update, as in upstream, whose frozen layers stay in training mode: the statistics follow '
    'the new dataset while the learned scales and shifts stay (default: 0)',
  )
  parser.add_argument(
    '--accept-changed-data',
    action='store_true',
    help="with --resume: go on although the dataset's files differ from those the run recorded "
    'when it last started (dataset.json.gz in the run directory: each image and label file with '
    'its size and modification time); without it such a resume is an error naming what changed',
  )
  parser.add_argument(
    '--no-progress', action='store_true', help='no progress bar (epoch lines are still printed)'
  )
  runtime.add_runtime_arguments(parser, distributed=True)


def run(args: argparse.Namespace) -> int:
  """Runs ``train``; returns the exit status (see the module docstring)."""
  parser = args.command_parser
  runtime.check_distributed(parser, args)
  if args.weights is not None and args.resume:
    parser.error('--weights starts a new run; --resume continues one: use one of them')
  runtime.start(args)

  from reorg_jax.data.dataset import DatasetError
  from reorg_jax.program import config as config_lib
  from reorg_jax.program import loop, rundir, weights
  from reorg_jax.training.step import NonFiniteError

  overrides = {dotted: getattr(args, flag) for flag, dotted in OVERRIDES.items()}
  if args.no_progress:
    overrides['log.progress'] = False
  try:
    rundir.check_workdir_path(Path(args.workdir), resume=args.resume)
    start = None
    if args.weights is not None:
      start = weights.read(args.weights)
      if start.deploy and args.model is None:
        raise weights.WeightsError(
          f'--weights {start.path} is a deploy checkpoint (IDetect head, no aux head): give '
          "--model, the model's training YAML (e.g. upstream's cfg/training/yolov7-w6.yaml)"
        )
      if args.model is None and isinstance(start.model_yaml, str):  # a run of ours: its name
        overrides['model.name'] = start.model_yaml
      elif args.model is None and start.model_yaml is not None:
        # The model the file carries stands in for --model; the run directory keeps a copy,
        # from which --resume rebuilds it.
        overrides['model.name'] = str(weights.save_model_yaml(start, Path(args.workdir)))
    saved = Path(args.workdir) / 'config.yaml'
    config = config_lib.load(
      config_path=args.config,
      overrides=overrides,
      saved=saved if args.resume and saved.is_file() else None,
    )
    loop.run(
      config,
      workdir=args.workdir,
      resume=args.resume,
      start=start,
      allow_partial=args.allow_partial,
      accept_changed_data=args.accept_changed_data,
    )
  except (config_lib.ConfigError, DatasetError, weights.WeightsError, rundir.WorkdirError) as error:
    return runtime.fail(error, status=2)
  except (loop.RunError, NonFiniteError) as error:
    return runtime.fail(error, status=1)
  return 0


def main(argv: Sequence[str] | None = None, *, prog: str = 'reorg-jax train') -> int:
  """``train`` on its own (``python -m train``); ``argv`` defaults to ``sys.argv[1:]``."""
  from reorg_jax.program import cli

  with interrupts.handling():
    try:
      parser = cli.command_parser(sys.modules[__name__], prog=prog)
      args = parser.parse_args(argv)
      args.command_parser = parser
      return run(args)
    except interrupts.Interrupted as error:
      return interrupts.finish(error)
