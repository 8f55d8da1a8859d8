"""Importing the reference implementation (``sas-yolov7``) on a CPU-only machine.

The reference imports ``torchvision`` at module level but never calls it on the
loss and model paths the tests use, and no CPU build of torchvision exists here,
so a stand-in package is registered before the import. Any attribute of the
stand-in is a function that raises if it is ever called.
"""

from __future__ import annotations

import sys
import types


class _StandIn(types.ModuleType):
  def __getattr__(self, name: str):
    if name.startswith('__'):
      raise AttributeError(name)

    def unavailable(*args, **kwargs):
      raise RuntimeError(f'{self.__name__}.{name} is a test stand-in and cannot be called')

    return unavailable


def install_torchvision_stand_in() -> None:
  """Registers ``torchvision`` and the submodules the reference imports, unless real."""
  if 'torchvision' in sys.modules:
    return
  root = _StandIn('torchvision')
  root.__path__ = []
  sys.modules['torchvision'] = root
  for sub in ('ops', 'utils', 'transforms', 'datasets', 'models', 'io'):
    module = _StandIn(f'torchvision.{sub}')
    sys.modules[module.__name__] = module
    setattr(root, sub, module)


install_torchvision_stand_in()
