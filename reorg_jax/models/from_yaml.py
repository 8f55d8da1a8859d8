"""Parsing YOLOv7 model files (the original ``cfg/training`` YAML format) into layer specs.

A model file has ``nc``, ``depth_multiple``, ``width_multiple``, ``anchors``
(per level, a flat ``[w0, h0, w1, h1, ...]`` list in pixels), optionally
``ch`` (image channels, 3 by default), and two layer lists, ``backbone`` and
``head``, whose rows are ``[from, number, module, args]``: ``from`` names the
input layers (negative: relative to this one; ``-1`` on the first layer is the
image), ``number`` the repeats after scaling by ``depth_multiple``, ``args``
the module arguments with output channels scaled by ``width_multiple`` (to a
multiple of 8), exactly as the original parser reads them. The strings
``nc``, ``anchors`` and ``None`` in ``args`` stand for the number of classes,
the anchors and no value.

Supported modules: ``ReOrg``, ``Conv``, ``DownC``, ``SPPCSPC``, ``Concat``,
``Shortcut``, ``nn.Upsample`` (nearest, integer factor), ``MP``, ``SP`` and,
as the last layer, a detection head: ``IAuxDetect`` (``2L`` inputs, lead then
auxiliary; the training head) or, for deploy models, ``IDetect`` (``L``
inputs, with implicit layers) or ``Detect`` (``L`` inputs, plain convs), both
built as :class:`~reorg_jax.models.detect.IDetect`. This covers the W6, E6, D6
and E6E training and deploy configurations. Anything else raises a
``ValueError`` naming the layer, as do
wrong argument types, sources that are not earlier layers, inputs of
different strides to a concatenation, and similar mistakes.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping, Sequence
from fractions import Fraction
from typing import Any

import flax.linen as nn

from reorg_jax import yaml_file
from reorg_jax.models import layers
from reorg_jax.models.detect import IAuxDetect, IDetect

try:
  from importlib.resources.abc import Traversable
except ImportError:  # Python 3.10
  from importlib.abc import Traversable

__all__ = ['HEADS', 'LayerSpec', 'load_config', 'parse_config']


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """One parsed layer.

  Attributes:
    index: position in the layer list.
    name: module name as written in the model file.
    sources: absolute indices of the layers feeding this one; ``-1`` is the
      input image (only for layer 0).
    gathers: the layer takes the list of its sources' outputs (``from`` was a
      list in the file) rather than a single array.
    module: the Linen class.
    kwargs: its constructor arguments, as ``(name, value)`` pairs.
    takes_train: the module's call takes the ``train`` flag.
    channels: output channels (``0`` for the head).
    stride: input pixels per output pixel (the head's is that of its first input).
  """

  index: int
  name: str
  sources: tuple[int, ...]
  gathers: bool
  module: type[nn.Module]
  kwargs: tuple[tuple[str, Any], ...]
  takes_train: bool
  channels: int
  stride: Fraction


def load_config(path: str | os.PathLike | Traversable) -> dict[str, Any]:
  """Reads a model YAML file into a mapping.

  Raises:
    ValueError: the file cannot be read, is not valid YAML or holds no
      mapping (the message starts with the path).
  """
  try:
    config = yaml_file.read(path)
  except yaml_file.YamlFileError as error:
    raise ValueError(str(error)) from None
  if not isinstance(config, dict):
    raise ValueError(f'{path}: a model file must hold a mapping, got {type(config).__name__}')
  return config


@dataclasses.dataclass(frozen=True)
class _Context:
  """What a layer handler may read besides its own row."""

  label: str
  args: tuple[Any, ...]
  in_channels: tuple[int, ...]
  in_strides: tuple[Fraction, ...]
  width: float
  outputs: int


# A handler returns the module, its kwargs, output channels and output stride.
_Built = tuple[type[nn.Module], dict[str, Any], int, Fraction]


def _fail(context: _Context, message: str) -> ValueError:
  return ValueError(f'{context.label}: {message}')


def _positional(context: _Context, names: Sequence[str], *, required: int) -> dict[str, Any]:
  """Names the row's ``args``; leaves unspecified trailing ones to the module's defaults."""
  args = context.args
  if not required <= len(args) <= len(names):
    raise _fail(context, f'expects {required} to {len(names)} args {list(names)}, got {list(args)}')
  return dict(zip(names, args, strict=False))


def _check_types(context: _Context, kwargs: Mapping[str, Any], types: Mapping[str, Any]) -> None:
  for key, value in kwargs.items():
    expected = types[key]
    ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
    if not ok:
      raise _fail(context, f'argument {key}={value!r} must be {expected}')


def _single_input(context: _Context) -> tuple[int, Fraction]:
  if len(context.in_channels) != 1:
    raise _fail(context, f'takes one input, got {len(context.in_channels)}')
  return context.in_channels[0], context.in_strides[0]


def _scaled(context: _Context, features: int) -> int:
  if features == context.outputs:
    return features
  return math.ceil(features * context.width / 8) * 8


def _reorg(context: _Context) -> _Built:
  channels, stride = _single_input(context)
  _positional(context, (), required=0)
  return layers.ReOrg, {}, 4 * channels, stride * 2


def _conv(context: _Context) -> _Built:
  _, stride = _single_input(context)
  names = ('features', 'kernel_size', 'strides', 'padding', 'groups', 'activation')
  kwargs = _positional(context, names, required=1)
  types = {
    'features': int,
    'kernel_size': int,
    'strides': int,
    'padding': (int, type(None)),
    'groups': int,
    'activation': bool,
  }
  _check_types(context, kwargs, types)
  kwargs['features'] = _scaled(context, kwargs['features'])
  module = layers.Conv(**kwargs)
  if module.kernel_size % 2 == 0 or module.padding not in (None, module.kernel_size // 2):
    raise _fail(context, 'only odd kernels with the default padding (kernel // 2) are supported')
  return layers.Conv, kwargs, module.features, stride * module.strides


def _down_c(context: _Context) -> _Built:
  _, stride = _single_input(context)
  kwargs = _positional(context, ('features', 'strides'), required=1)
  _check_types(context, kwargs, {'features': int, 'strides': int})
  kwargs['features'] = _scaled(context, kwargs['features'])
  module = layers.DownC(**kwargs)
  if module.features % 2:
    raise _fail(context, f'DownC needs an even number of features, got {module.features}')
  return layers.DownC, kwargs, module.features, stride * module.strides


def _sppcspc(context: _Context) -> _Built:
  _, stride = _single_input(context)
  names = ('features', 'shortcut', 'groups', 'expansion', 'pool_sizes')
  kwargs = _positional(context, names, required=1)
  if kwargs.pop('shortcut', False) is not False or kwargs.pop('groups', 1) != 1:
    raise _fail(context, 'SPPCSPC shortcut and groups are unused by the original; leave them out')
  _check_types(
    context, kwargs, {'features': int, 'expansion': (int, float), 'pool_sizes': (list, tuple)}
  )
  kwargs['features'] = _scaled(context, kwargs['features'])
  if 'pool_sizes' in kwargs:
    kwargs['pool_sizes'] = tuple(kwargs['pool_sizes'])
  return layers.SPPCSPC, kwargs, kwargs['features'], stride


def _same_strides(context: _Context) -> Fraction:
  if len(set(context.in_strides)) != 1:
    raise _fail(context, f'inputs have different strides {[str(s) for s in context.in_strides]}')
  return context.in_strides[0]


def _concat(context: _Context) -> _Built:
  kwargs = _positional(context, ('dimension',), required=0)
  if kwargs.get('dimension', 1) != 1:
    raise _fail(context, f'only channel concatenation (dimension 1) is supported, got {kwargs}')
  return layers.Concat, {}, sum(context.in_channels), _same_strides(context)


def _shortcut(context: _Context) -> _Built:
  _positional(context, ('dimension',), required=0)
  if len(context.in_channels) != 2 or len(set(context.in_channels)) != 1:
    raise _fail(context, f'adds two inputs of equal channels, got {list(context.in_channels)}')
  return layers.Shortcut, {}, context.in_channels[0], _same_strides(context)


def _upsample(context: _Context) -> _Built:
  channels, stride = _single_input(context)
  kwargs = _positional(context, ('size', 'scale', 'mode'), required=2)
  size, scale, mode = kwargs['size'], kwargs['scale'], kwargs.get('mode', 'nearest')
  if size is not None or mode != 'nearest' or not isinstance(scale, int) or scale < 1:
    raise _fail(context, f'only nearest upsampling by an integer factor is supported, got {kwargs}')
  return layers.Upsample, {'scale': scale}, channels, stride / scale


def _mp(context: _Context) -> _Built:
  channels, stride = _single_input(context)
  kwargs = _positional(context, ('window',), required=0)
  window = kwargs.get('window', 2)
  _check_types(context, {'window': window}, {'window': int})
  return (
    layers.MaxPool,
    {'window': window, 'strides': window, 'padding': 0},
    channels,
    stride * window,
  )


def _sp(context: _Context) -> _Built:
  channels, stride = _single_input(context)
  kwargs = _positional(context, ('window', 'strides'), required=0)
  window, step = kwargs.get('window', 3), kwargs.get('strides', 1)
  _check_types(context, {'window': window, 'strides': step}, {'window': int, 'strides': int})
  if window % 2 == 0:
    raise _fail(context, f'SP needs an odd window, got {window}')
  pool = {'window': window, 'strides': step, 'padding': window // 2}
  return layers.MaxPool, pool, channels, stride * step


def _head_arguments(context: _Context, *, auxiliary: bool) -> dict[str, Any]:
  """``num_classes``, ``anchors`` and ``strides`` of a head with ``2L`` (``auxiliary``) or ``L`` inputs."""
  kwargs = _positional(context, ('num_classes', 'anchors'), required=2)
  num_classes, anchors = kwargs['num_classes'], kwargs['anchors']
  if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
    raise _fail(context, f'number of classes must be a positive integer, got {num_classes!r}')
  anchors = _anchor_pairs(context, anchors)
  levels = len(anchors)
  inputs = 2 * levels if auxiliary else levels
  if len(context.in_strides) != inputs:
    which = ' (lead then auxiliary)' if auxiliary else ''
    raise _fail(
      context, f'{levels} anchor levels need {inputs} inputs{which}, got {len(context.in_strides)}'
    )
  lead, aux = context.in_strides[:levels], context.in_strides[levels:]
  if auxiliary and lead != aux:
    raise _fail(
      context,
      f'lead strides {[str(s) for s in lead]} differ from auxiliary {[str(s) for s in aux]}',
    )
  areas = [w * h for w, h in anchors[0]], [w * h for w, h in anchors[-1]]
  if levels > 1 and (areas[1][-1] - areas[0][0] > 0) != (lead[-1] > lead[0]):
    raise _fail(context, 'anchor areas must grow with the level stride; reverse the anchor list')
  if any(s.denominator != 1 for s in lead):
    raise _fail(context, f'head inputs need integer strides, got {[str(s) for s in lead]}')
  strides = tuple(int(s) for s in lead)
  return {'num_classes': num_classes, 'anchors': anchors, 'strides': strides}


def _aux_head(context: _Context) -> _Built:
  kwargs = _head_arguments(context, auxiliary=True)
  return IAuxDetect, kwargs, 0, context.in_strides[0]


def _implicit_head(context: _Context) -> _Built:
  kwargs = _head_arguments(context, auxiliary=False)
  return IDetect, {**kwargs, 'implicit': True}, 0, context.in_strides[0]


def _plain_head(context: _Context) -> _Built:
  kwargs = _head_arguments(context, auxiliary=False)
  return IDetect, {**kwargs, 'implicit': False}, 0, context.in_strides[0]


def _anchor_pairs(context: _Context, anchors: Any) -> tuple[tuple[tuple[float, float], ...], ...]:
  if isinstance(anchors, int) or not isinstance(anchors, (list, tuple)) or not anchors:
    raise _fail(context, f'anchors must be explicit per-level [w, h, ...] lists, got {anchors!r}')
  pairs = []
  for level in anchors:
    if not isinstance(level, (list, tuple)) or len(level) % 2 or not level:
      raise _fail(
        context, f'each anchor level must be a flat [w0, h0, w1, h1, ...] list, got {level!r}'
      )
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in level):
      raise _fail(context, f'anchor sizes must be numbers, got {level!r}')
    values = [float(v) for v in level]
    pairs.append(tuple(zip(values[0::2], values[1::2], strict=True)))
  if len({len(level) for level in pairs}) != 1:
    raise _fail(context, 'every level needs the same number of anchors')
  return tuple(pairs)


_Handler = Callable[[_Context], _Built]

# module name in the file -> (handler, whether the module's call takes `train`)
_MODULES: dict[str, tuple[_Handler, bool]] = {
  'ReOrg': (_reorg, False),
  'Conv': (_conv, True),
  'DownC': (_down_c, True),
  'SPPCSPC': (_sppcspc, True),
  'Concat': (_concat, False),
  'Shortcut': (_shortcut, False),
  'nn.Upsample': (_upsample, False),
  'MP': (_mp, False),
  'SP': (_sp, False),
  'IAuxDetect': (_aux_head, True),
  'IDetect': (_implicit_head, True),
  'Detect': (_plain_head, True),
}

# the detection heads, one of which ends every model (and nothing else does)
HEADS = frozenset({'IAuxDetect', 'IDetect', 'Detect'})

# modules whose `number` the original passes to the constructor (unused) instead of repeating
_NUMBER_IGNORED = frozenset({'DownC', 'SPPCSPC'})


def parse_config(
  config: Mapping[str, Any],
  *,
  num_classes: int | None,
  anchors: Sequence[Sequence[float]] | None,
  in_channels: int | None,
) -> tuple[tuple[LayerSpec, ...], int]:
  """Parses a model mapping into layer specs.

  Args:
    config: the model file's content.
    num_classes: overrides ``nc`` when not ``None``.
    anchors: overrides ``anchors`` (per level ``[w0, h0, ...]`` in pixels) when not ``None``.
    in_channels: overrides ``ch`` (default of the format: 3) when not ``None``.

  Returns:
    The layer specs and the number of image channels.

  Raises:
    ValueError: naming the offending key or layer.
  """
  missing = [
    k
    for k in ('nc', 'depth_multiple', 'width_multiple', 'anchors', 'backbone', 'head')
    if k not in config
  ]
  if missing:
    raise ValueError(f'model config lacks {missing}')
  num_classes = config['nc'] if num_classes is None else num_classes
  anchors = config['anchors'] if anchors is None else anchors
  in_channels = config.get('ch', 3) if in_channels is None else in_channels
  depth, width = config['depth_multiple'], config['width_multiple']
  for key, value in (('nc', num_classes), ('ch', in_channels)):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f'{key} must be a positive integer, got {value!r}')
  for key, value in (('depth_multiple', depth), ('width_multiple', width)):
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
      raise ValueError(f'{key} must be a positive number, got {value!r}')
  for key in ('backbone', 'head'):
    if not isinstance(config[key], list):
      raise ValueError(f'{key} must be a list of [from, number, module, args] rows')
  rows = list(config['backbone']) + list(config['head'])
  if not rows:
    raise ValueError('model config has no layers')
  num_anchors = len(anchors[0]) // 2 if isinstance(anchors, (list, tuple)) and anchors else 0
  outputs = num_anchors * (5 + num_classes) if isinstance(num_classes, int) else -1
  names = {'nc': num_classes, 'anchors': anchors, 'None': None}

  specs: list[LayerSpec] = []
  for index, row in enumerate(rows):
    label = f'layer {index} ({row!r})'
    if not isinstance(row, (list, tuple)) or len(row) != 4:
      raise ValueError(f'{label}: rows are [from, number, module, args]')
    origin, number, name, args = row
    if not isinstance(name, str) or name not in _MODULES:
      raise ValueError(f'{label}: module {name!r} is not supported; supported: {sorted(_MODULES)}')
    if name in HEADS and index != len(rows) - 1:
      raise ValueError(f'{label}: {name} must be the last layer')
    if index == len(rows) - 1 and name not in HEADS:
      raise ValueError(
        f'{label}: the last layer must be a detection head ({", ".join(sorted(HEADS))})'
      )
    sources = _resolve_sources(label, origin, index)
    if not isinstance(number, int) or number < 1:
      raise ValueError(f'{label}: number must be a positive integer, got {number!r}')
    repeats = max(round(number * depth), 1) if number > 1 else number
    if repeats > 1 and name not in _NUMBER_IGNORED:
      raise ValueError(
        f'{label}: repeated modules (number {repeats} after depth_multiple) are not supported'
      )
    if args is not None and not isinstance(args, list):
      raise ValueError(f'{label}: args must be a list, got {args!r}')
    args = tuple(names.get(a, a) if isinstance(a, str) else a for a in (args or ()))
    image = (in_channels, Fraction(1))
    inputs = [image if s == -1 else (specs[s].channels, specs[s].stride) for s in sources]
    context = _Context(
      label=label,
      args=args,
      in_channels=tuple(c for c, _ in inputs),
      in_strides=tuple(s for _, s in inputs),
      width=width,
      outputs=outputs,
    )
    handler, takes_train = _MODULES[name]
    module, kwargs, channels, stride = handler(context)
    specs.append(
      LayerSpec(
        index=index,
        name=name,
        sources=sources,
        gathers=isinstance(origin, (list, tuple)),
        module=module,
        kwargs=tuple(kwargs.items()),
        takes_train=takes_train,
        channels=channels,
        stride=stride,
      )
    )
  return tuple(specs), in_channels


def _resolve_sources(label: str, origin: Any, index: int) -> tuple[int, ...]:
  listed = origin if isinstance(origin, (list, tuple)) else [origin]
  sources = []
  for source in listed:
    if not isinstance(source, int) or isinstance(source, bool):
      raise ValueError(f'{label}: from must hold layer indices, got {origin!r}')
    if index == 0 and source == -1:
      sources.append(-1)
      continue
    absolute = index + source if source < 0 else source
    if not 0 <= absolute < index:
      raise ValueError(f'{label}: from {source} does not name an earlier layer')
    sources.append(absolute)
  if not sources:
    raise ValueError(f'{label}: from is empty')
  return tuple(sources)
