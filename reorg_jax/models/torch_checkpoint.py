"""Upstream's checkpoints as read by :mod:`reorg_jax.models.torch_file`: state dicts and kinds.

Glossary: a *state dict* maps PyTorch keys (``model.3.bn.weight``) to arrays.

:func:`module_state_dict` walks a pickled ``nn.Module`` stand-in as
``Module.state_dict()`` would; :func:`load_checkpoint` tells the three kinds of
file upstream users have apart (a training checkpoint, a deploy checkpoint, a
plain state dict) and returns their state dicts, the pickled model's own
config (``yaml``) and class names.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np

from reorg_jax.models.torch_file import StandIn, TorchFileError, describe, read_pt

__all__ = ['CheckpointKind', 'TorchCheckpoint', 'load_checkpoint', 'module_state_dict']

CheckpointKind = Literal['training', 'deploy', 'state_dict']


def _is_module(obj: Any) -> bool:
  """Whether ``obj`` is a pickled ``nn.Module``: its state has the three tables of one."""
  attributes = obj.attributes if isinstance(obj, StandIn) else {}
  return all(
    isinstance(attributes.get(k), Mapping) for k in ('_parameters', '_buffers', '_modules')
  )


def module_state_dict(module: StandIn) -> dict[str, np.ndarray]:
  """The ``state_dict()`` of a pickled ``nn.Module`` stand-in, in PyTorch's key order.

  Per module: parameters, then persistent buffers (``None`` entries skipped),
  then each child's entries under ``<child name>.``; arrays keep their dtype.

  Raises:
    TorchFileError: when ``module`` or a child is not a pickled module, an entry
      is not an array, or modules nest in a cycle.
  """
  out: dict[str, np.ndarray] = {}

  def collect(node: Any, prefix: str, active: frozenset[int]) -> None:
    where = prefix.rstrip('.') or '<root>'
    if not _is_module(node):
      raise TorchFileError(f'module {where} is {describe(node)}, not a pickled torch module')
    if id(node) in active:
      raise TorchFileError(f'module {where} contains itself')
    attributes = node.attributes
    skipped = attributes.get('_non_persistent_buffers_set')
    skipped = skipped if isinstance(skipped, set | frozenset) else set()
    entries = [
      *attributes['_parameters'].items(),
      *((k, v) for k, v in attributes['_buffers'].items() if k not in skipped),
    ]
    for name, value in entries:
      if value is not None and not isinstance(value, np.ndarray):
        raise TorchFileError(f'state {prefix}{name} is {describe(value)}, not a tensor')
      if value is not None:
        out[f'{prefix}{name}'] = value
    for name, child in attributes['_modules'].items():
      if child is not None:
        collect(child, f'{prefix}{name}.', active | {id(node)})

  collect(module, '', frozenset())
  return out


@dataclasses.dataclass(frozen=True, eq=False)
class TorchCheckpoint:
  """What :func:`load_checkpoint` found in a ``.pt`` file.

  Attributes:
    path: the file.
    kind: ``'training'`` (a model plus an optimizer state or an EMA model, as
      upstream's ``train.py``/``train_aux.py`` write), ``'deploy'`` (a model only)
      or ``'state_dict'`` (the file is a flat mapping of tensors).
    model: the model's state dict (PyTorch key -> array of the saved dtype).
    ema: the EMA model's state dict, when the file has one.
    yaml: the pickled ``Model``'s ``yaml`` attribute (its config), when present.
    class_names: the pickled ``Model``'s ``names``, when present.
    epoch: the ``epoch`` entry, when an int.
  """

  path: pathlib.Path
  kind: CheckpointKind
  model: dict[str, np.ndarray]
  ema: dict[str, np.ndarray] | None = None
  yaml: dict[str, Any] | None = None
  class_names: list[str] | None = None
  epoch: int | None = None


def _is_state_dict(obj: Any) -> bool:
  return isinstance(obj, Mapping) and all(isinstance(v, np.ndarray) for v in obj.values())


def _entry(
  path: pathlib.Path, key: str, entry: Any
) -> tuple[dict[str, np.ndarray], StandIn | None]:
  if _is_module(entry):
    try:
      state = module_state_dict(entry)
    except TorchFileError as error:
      raise TorchFileError(f'{path}: {key!r} entry: {error}') from None
  elif _is_state_dict(entry):
    state, entry = dict(entry), None
  else:
    raise TorchFileError(
      f'{path}: {key!r} entry is {describe(entry)}, neither a module nor a state dict'
    )
  if not state:
    raise TorchFileError(f'{path}: {key!r} entry holds an empty state dict')
  return state, entry


def load_checkpoint(path: str | os.PathLike) -> TorchCheckpoint:
  """Reads a state dict file, an upstream deploy checkpoint or a training checkpoint.

  Accepted content: a mapping of tensors; a mapping with a ``'model'`` entry
  (a pickled module or a state dict) and optionally ``'ema'``, ``'optimizer'``,
  ``'epoch'``; or a pickled module alone.

  Raises:
    TorchFileError: as :func:`read_pt`, and when the content holds neither a
      state dict nor a model, or an empty one.
  """
  content, path = read_pt(path), pathlib.Path(path)
  if isinstance(content, Mapping) and not content:
    raise TorchFileError(f'{path}: holds an empty mapping, no state dict or model')
  if _is_state_dict(content):
    return TorchCheckpoint(path, 'state_dict', dict(content))
  if _is_module(content):
    content = {'model': content}
  if not (isinstance(content, Mapping) and 'model' in content):
    raise TorchFileError(f'{path}: holds {describe(content)}, neither a state dict nor a model')
  model, module = _entry(path, 'model', content['model'])
  ema = None if content.get('ema') is None else _entry(path, 'ema', content['ema'])[0]
  attributes = module.attributes if module is not None else {}
  yaml, names, epoch = attributes.get('yaml'), attributes.get('names'), content.get('epoch')
  if isinstance(names, Mapping):  # {index: name}
    names = [names[k] for k in sorted(names)] if all(isinstance(k, int) for k in names) else None
  if not (isinstance(names, list | tuple) and all(isinstance(n, str) for n in names)):
    names = None
  training = content.get('optimizer') is not None or ema is not None
  return TorchCheckpoint(
    path,
    'training' if training else 'deploy',
    model,
    ema,
    dict(yaml) if isinstance(yaml, Mapping) else None,
    None if names is None else list(names),
    epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else None,
  )
