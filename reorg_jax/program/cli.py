"""``reorg-jax``: the installed command.

``reorg-jax <command> [options]``; ``reorg-jax --help`` lists the commands
and ``reorg-jax <command> --help`` gives every option of one. The commands
are the modules of :mod:`reorg_jax.program.commands`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from types import ModuleType

from reorg_jax.program import allocator, commands, interrupts

__all__ = ['build_parser', 'command_parser', 'main']


def _description(module: ModuleType) -> str:
  return (module.__doc__ or '').strip()


def command_parser(module: ModuleType, *, prog: str) -> argparse.ArgumentParser:
  """The parser of one command module, on its own (``python -m train`` uses it)."""
  parser = argparse.ArgumentParser(
    prog=prog,
    description=_description(module),
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  module.add_arguments(parser)
  return parser


def build_parser(*, prog: str = 'reorg-jax') -> argparse.ArgumentParser:
  """The parser of ``reorg-jax`` with one subparser per command module."""
  parser = argparse.ArgumentParser(
    prog=prog,
    description='YOLOv7 P6 models (W6/E6/D6/E6E) in JAX: train, fine-tune from upstream '
    'checkpoints, validate, detect, export for deployment, and check against upstream on your '
    'model and data. `%(prog)s COMMAND --help` gives every option of a command.',
  )
  sub = parser.add_subparsers(dest='command', metavar='COMMAND', required=True)
  for module in commands.discover():
    name = module.__name__.rsplit('.', 1)[-1]
    child = sub.add_parser(
      name,
      help=module.SUMMARY,
      description=_description(module),
      formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    module.add_arguments(child)
    child.set_defaults(command_module=module, command_parser=child)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  """Runs ``reorg-jax``; returns the exit status of the command.

  Ctrl-C and SIGTERM end any command with one line and status 130 or 143
  (:mod:`reorg_jax.program.interrupts`), from the first moment on. Called
  as the program (``argv`` not given), it first restarts itself with glibc's
  huge-page tunable where that helps (:mod:`reorg_jax.program.allocator`).
  """
  if argv is None:
    allocator.restart_with_huge_pages()
  with interrupts.handling():
    try:
      parser = build_parser()
      args = parser.parse_args(argv)
      return args.command_module.run(args)
    except interrupts.Interrupted as error:
      return interrupts.finish(error)
