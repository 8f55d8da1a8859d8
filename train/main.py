"""Command line of the training program.

With no arguments, ``python -m train`` trains the small P6 model on the
built-in synthetic dataset (written to ``<workdir>/data`` on first use),
evaluating every epoch. Options come from ``train/configs/default.yaml``,
then ``--config FILE`` (any subset of the same keys), then the flags below.

Exit status (every error is one line on stderr, no traceback):

* 0: the run finished.
* 1: the run could not go on: the run directory is in use by another run
  (its pid is named) or holds another run, a write failed (disk full,
  read-only directory; the path and the newest complete checkpoint are
  named), every checkpoint is damaged, or a step's loss was not finite.
* 2: bad input, found before anything is written or trained: an option's
  type or range, the model file, the dataset (file and line named), or a
  dataset smaller than one batch.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = [
  'OVERRIDES',
  'compile_cache_dir',
  'initialize_distributed',
  'main',
  'parse_args',
  'use_compile_cache',
]

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
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  """The parsed command line."""
  parser = argparse.ArgumentParser(
    prog='python -m train',
    description='Train a YOLOv7 P6 model (default: the small model on the synthetic dataset).',
  )
  parser.add_argument('--config', help='YAML file overriding train/configs/default.yaml')
  parser.add_argument(
    '--workdir', default='runs/train', help='run directory (default: %(default)s)'
  )
  parser.add_argument(
    '--resume', action='store_true', help='continue from the newest checkpoint in --workdir'
  )
  parser.add_argument('--epochs', type=int, help='train.epochs')
  parser.add_argument('--batch-size', type=int, help='train.batch_size (all devices together)')
  parser.add_argument('--image-size', type=int, help='train.image_size')
  parser.add_argument('--steps', type=int, help='train.max_steps: stop after this many steps')
  parser.add_argument('--data', help='dataset YAML (default: the synthetic dataset)')
  parser.add_argument('--model', help="'p6_nano' or a model YAML file")
  parser.add_argument('--seed', type=int, help='seed')
  parser.add_argument('--save-every', type=int, help='checkpoint.save_every (steps)')
  parser.add_argument(
    '--no-progress', action='store_true', help='no progress bar (epoch lines are still printed)'
  )
  cache = parser.add_mutually_exclusive_group()
  cache.add_argument(
    '--compile-cache',
    metavar='DIR',
    help="jax's persistent compilation cache: a later run of the same model, shapes and "
    'devices loads its programs instead of compiling them (default: $JAX_COMPILATION_CACHE_DIR, '
    'else $XDG_CACHE_HOME/reorg-jax/xla, else ~/.cache/reorg-jax/xla)',
  )
  cache.add_argument(
    '--no-compile-cache', action='store_true', help='compile everything, read and write no cache'
  )
  parser.add_argument(
    '--distributed',
    action='store_true',
    help='call jax.distributed.initialize() first (one process per host; see the README)',
  )
  parser.add_argument(
    '--coordinator', metavar='HOST:PORT', help='with --distributed: the address of process 0'
  )
  parser.add_argument(
    '--num-processes', type=int, help='with --distributed: the number of processes'
  )
  parser.add_argument(
    '--process-id', type=int, help='with --distributed: this process, 0 to the process count - 1'
  )
  args = parser.parse_args(argv)
  explicit = [args.coordinator, args.num_processes, args.process_id]
  if any(v is not None for v in explicit):
    if not args.distributed:
      parser.error('--coordinator, --num-processes and --process-id need --distributed')
    if any(v is None for v in explicit):
      parser.error('--coordinator, --num-processes and --process-id go together')
    if args.num_processes < 1 or not 0 <= args.process_id < args.num_processes:
      parser.error(
        f'--process-id must lie in [0, --num-processes), got {args.process_id} of '
        f'{args.num_processes}'
      )
  return args


def compile_cache_dir(args: argparse.Namespace) -> Path | None:
  """The persistent compilation cache the run uses (``None``: none).

  Only process 0 of a multi-process run writes to it (jax's rule); on CPU the
  other processes' programs are keyed to their own devices and never found there.
  """
  import jax

  if args.no_compile_cache:
    return None
  if args.compile_cache is not None:
    return Path(args.compile_cache).expanduser()
  if jax.config.jax_compilation_cache_dir:
    return Path(jax.config.jax_compilation_cache_dir)
  home = os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache'
  return Path(home) / 'reorg-jax' / 'xla'


def use_compile_cache(directory: Path | None) -> None:
  """Points jax's persistent compilation cache at ``directory`` (``None``: off).

  Programs that compile in under a second are not stored (jax's default).
  """
  import jax

  if directory is None:
    jax.config.update('jax_enable_compilation_cache', False)
  else:
    jax.config.update('jax_compilation_cache_dir', str(directory))


def initialize_distributed(args: argparse.Namespace) -> None:
  """Joins the processes of a multi-process run (``--distributed``).

  With ``--coordinator``, ``--num-processes`` and ``--process-id`` those are
  used; without, ``jax.distributed.initialize()`` finds them in the
  environment or the cluster (SLURM, Cloud TPU, ...). CPU devices reduce
  across processes with gloo.

  The processes then take part in one collective at once, while they are
  still in step: gloo connects them at their first collective and gives up
  if one arrives more than 30 s after the other (one compiling longer, say);
  once connected, a process may wait on the others for as long as it takes.
  """
  import jax
  from jax.experimental import multihost_utils

  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if args.coordinator is None:
    jax.distributed.initialize()
  else:
    jax.distributed.initialize(
      coordinator_address=args.coordinator,
      num_processes=args.num_processes,
      process_id=args.process_id,
    )
  multihost_utils.sync_global_devices('train: processes joined')


def _quiet_closed_loops(hook):
  """``hook`` minus the 'Event loop is closed' reports of writes abandoned after a failure."""
  if getattr(hook, 'quiets_closed_loops', False):
    return hook

  def quiet(report):
    value = report.exc_value
    if isinstance(value, RuntimeError) and str(value) == 'Event loop is closed':
      return
    hook(report)

  quiet.quiets_closed_loops = True
  return quiet


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the program; returns the exit status (see the module docstring)."""
  args = parse_args(argv)
  # Orbax logs every failed background write with its traceback, and each of its
  # abandoned array writes then reports 'Event loop is closed' or an unretrieved task
  # error (thousands of lines on a full disk); the failure itself reaches the program
  # and is printed as one line.
  for name in ('absl', 'asyncio'):
    logging.getLogger(name).setLevel(logging.CRITICAL)
  sys.unraisablehook = _quiet_closed_loops(sys.unraisablehook)
  use_compile_cache(compile_cache_dir(args))  # before anything compiles
  if args.distributed:
    initialize_distributed(args)

  from reorg_jax.data.dataset import DatasetError
  from reorg_jax.training.step import NonFiniteError
  from train import config as config_lib
  from train import loop

  overrides = {dotted: getattr(args, flag) for flag, dotted in OVERRIDES.items()}
  if args.no_progress:
    overrides['log.progress'] = False
  try:
    config = config_lib.load(config_path=args.config, overrides=overrides)
    loop.run(config, workdir=args.workdir, resume=args.resume)
  except (config_lib.ConfigError, DatasetError) as error:
    print(f'error: {error}', file=sys.stderr, flush=True)
    return 2
  except (loop.RunError, NonFiniteError) as error:
    print(f'error: {error}', file=sys.stderr, flush=True)
    return 1
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
