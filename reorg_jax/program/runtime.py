"""What every subcommand of ``reorg-jax`` sets up before it works: caches, processes, logging.

* :func:`add_runtime_arguments` adds the flags for jax's persistent
  compilation cache (``--compile-cache``, ``--no-compile-cache``) and, for
  commands that may run on several hosts, ``--distributed``.
* :func:`add_weights_argument`, :func:`add_model_argument`,
  :func:`add_data_argument`, :func:`add_image_size_argument`,
  :func:`add_batch_size_argument` and :func:`add_workdir_argument` add the
  options the commands that read weights share (each command its own help
  text); :func:`check_positive` checks their whole numbers.
* :func:`start` applies them (before anything compiles) and quiets the
  libraries whose background failures would otherwise print tracebacks.
* :func:`fail` prints an error as the program's one line on stderr.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

__all__ = [
  'add_batch_size_argument',
  'add_data_argument',
  'add_image_size_argument',
  'add_model_argument',
  'add_runtime_arguments',
  'add_weights_argument',
  'add_workdir_argument',
  'check_distributed',
  'check_positive',
  'compile_cache_dir',
  'fail',
  'initialize_distributed',
  'start',
  'use_compile_cache',
]


def add_runtime_arguments(parser: argparse.ArgumentParser, *, distributed: bool) -> None:
  """The compilation cache flags, and the multi-process flags when ``distributed``."""
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
  if not distributed:
    return
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


def add_weights_argument(parser: argparse.ArgumentParser, *, help: str) -> None:
  """``--weights PATH``, required: the weights the command reads."""
  parser.add_argument('--weights', required=True, metavar='PATH', help=help)


def add_model_argument(parser: argparse.ArgumentParser, *, help: str) -> None:
  """``--model`` (alias ``--cfg``, upstream's name): a model name or model YAML."""
  parser.add_argument('--model', '--cfg', dest='model', help=help)


def add_data_argument(
  parser: argparse.ArgumentParser, *, help: str, required: bool = False
) -> None:
  """``--data YAML``: a dataset YAML."""
  parser.add_argument('--data', required=required, metavar='YAML', help=help)


def add_image_size_argument(parser: argparse.ArgumentParser, *, help: str) -> None:
  """``--img-size S`` (alias ``--image-size``; ``args.image_size``): an image side in pixels."""
  parser.add_argument(
    '--img-size', '--image-size', dest='image_size', type=int, metavar='S', help=help
  )


def add_batch_size_argument(parser: argparse.ArgumentParser, *, help: str) -> None:
  """``--batch-size B``: images per batch."""
  parser.add_argument('--batch-size', type=int, metavar='B', help=help)


def add_workdir_argument(parser: argparse.ArgumentParser, *, default: str, help: str) -> None:
  """``--workdir``: the folder the command writes to, ``default`` when not given."""
  parser.add_argument('--workdir', default=default, help=help)


def check_positive(parser: argparse.ArgumentParser, *, flags: dict[str, int | None]) -> None:
  """Exits through ``parser.error`` for the first of ``flags`` (flag: value) below 1.

  A value of ``None`` (the flag not given) passes.
  """
  for flag, value in flags.items():
    if value is not None and value < 1:
      parser.error(f'{flag} must be a positive integer, got {value}')


def check_distributed(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  """Exits through ``parser.error`` when the multi-process flags do not fit together."""
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


def start(args: argparse.Namespace) -> None:
  """Quiets background logging, points the compilation cache, joins the processes.

  Orbax logs every failed background write with its traceback, and each of
  its abandoned array writes then reports 'Event loop is closed' or an
  unretrieved task error (thousands of lines on a full disk); the failure
  itself reaches the program and is printed as one line.
  """
  for name in ('absl', 'asyncio'):
    logging.getLogger(name).setLevel(logging.CRITICAL)
  sys.unraisablehook = _quiet_closed_loops(sys.unraisablehook)
  use_compile_cache(compile_cache_dir(args))  # before anything compiles
  if getattr(args, 'distributed', False):
    initialize_distributed(args)


def fail(error: BaseException | str, *, status: int) -> int:
  """Prints ``error: <message>`` on stderr; returns ``status``."""
  print(f'error: {error}', file=sys.stderr, flush=True)
  return status
