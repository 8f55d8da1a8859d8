"""The subcommands of ``reorg-jax``, one module each.

A command module has:

* ``ORDER``: its place in ``reorg-jax --help``;
* ``SUMMARY``: one line for that list;
* ``add_arguments(parser)``: its options (the parser's description is the
  module docstring's first paragraph, so ``--help`` explains the command);
* ``run(args) -> int``: the command; the exit status (0 done, 1 the work could
  not go on, 2 bad input found before anything was written), every error one
  line on stderr.

:func:`discover` finds every public module of this package: adding a
subcommand is adding a module.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

__all__ = ['discover']


def discover() -> list[ModuleType]:
  """The command modules, in ``ORDER``; their names are the subcommands."""
  modules = [
    importlib.import_module(f'{__name__}.{info.name}')
    for info in pkgutil.iter_modules(__path__)
    if not info.name.startswith('_')
  ]
  return sorted(modules, key=lambda module: (module.ORDER, module.__name__))
