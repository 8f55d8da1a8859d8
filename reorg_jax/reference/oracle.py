"""Importing the reference implementation (``sas-yolov7``) on a CPU-only machine.

The reference imports ``torchvision`` at module level but never calls it on the
loss and model paths the tests use, and no CPU build of torchvision exists here,
so a stand-in package is registered before the import. Any attribute of the
stand-in is a function that raises if it is ever called.
"""

from __future__ import annotations

import builtins
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


class LabelScanProgress:
  """A stand-in for the progress bar of upstream's ``LoadImagesAndLabels`` label scan.

  The package dropped tqdm but still sets ``pbar.desc`` on what its label scan
  iterates (a plain ``zip`` now). Put this class in place of that module's
  ``zip`` while building a ``LoadImagesAndLabels``.
  """

  def __init__(self, *iterables):
    self._items = builtins.zip(*iterables, strict=True)
    self.desc = ''

  def __iter__(self):
    return self._items

  def close(self):
    pass


def reference_loss_module():
  """The reference loss module, with its hard-coded ``'cuda:0'`` redirected to the CPU.

  Upstream builds the per-level results of a level that gets no positive with
  ``torch.tensor([], device='cuda:0')``, which fails on CPU-only torch. The
  module's ``torch`` name is replaced by a proxy whose ``tensor`` drops that
  device argument; everything else is the real torch.
  """
  import torch
  from sas_yolov7.utils import loss as reference

  if not isinstance(reference.torch, types.ModuleType):
    return reference

  class _CpuTorch:
    def __getattr__(self, name):
      return getattr(torch, name)

    @staticmethod
    def tensor(*args, **kwargs):
      if str(kwargs.get('device', '')).startswith('cuda'):
        kwargs['device'] = 'cpu'
      return torch.tensor(*args, **kwargs)

  reference.torch = _CpuTorch()
  return reference


def reference_loss(config):
  """Upstream ``ComputeLossAuxOTA`` configured like ``config`` (a ``LossConfig``)."""
  import torch

  reference = reference_loss_module()

  class Head(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.nl, self.na, self.nc = config.num_levels, config.num_anchors, config.num_classes
      self.stride = torch.tensor(config.strides, dtype=torch.float32)
      anchors = torch.tensor(config.anchors, dtype=torch.float32)
      self.register_buffer('anchors', anchors / self.stride.view(-1, 1, 1))

  class Model(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.model = torch.nn.ModuleList([Head()])
      self.anchor = torch.nn.Parameter(torch.zeros(1))
      self.gr = config.gr
      self.hyp = {
        'box': config.box,
        'obj': config.obj,
        'cls': config.cls,
        'cls_pw': config.cls_pw,
        'obj_pw': config.obj_pw,
        'label_smoothing': config.label_smoothing,
        'anchor_t': config.anchor_t,
        'fl_gamma': 0.0,
      }

  loss = reference.ComputeLossAuxOTA(Model())
  loss.balance = list(config.balance)
  return loss
