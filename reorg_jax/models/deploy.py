"""Reparameterisation for deployment: a trained IAuxDetect model to its deploy model.

Glossary: ``L`` levels, ``A`` anchors per level, ``C`` classes, ``F = 5 + C``,
``I_l`` input channels of level ``l``; a *training* model ends in
:class:`~reorg_jax.models.detect.IAuxDetect` (``2L`` inputs), a *deploy*
model in :class:`~reorg_jax.models.detect.IDetect` without implicit layers
(the original's ``Detect``, ``L`` inputs).

What the original does by hand per model in its reparameterisation notebook,
for any P6 model file, class count and anchors:

* the auxiliary head goes, with every layer that only feeds it (for W6, E6,
  D6 and E6E the four auxiliary ``3x3`` convs before the head); the layers
  after a removed one move down, and the ``from`` of every kept row is
  rewritten to name the same layers (relative entries stay relative,
  absolute ones absolute), so the result equals the original's
  ``cfg/deploy`` files layer for layer;
* the lead head becomes ``Detect`` over the lead inputs, with each level's
  ``ImplicitA``/``ImplicitM`` folded into its ``1x1`` conv
  (:func:`~reorg_jax.models.detect.fuse_implicit`, computed in float64);
* the anchors are the model's own, written into the deploy file. The
  original's notebook builds the deploy model from its ``cfg/deploy`` file and
  copies tensors whose names match; the P6 head moves (W6: layer 122 to 118),
  so anchors that training re-fitted (autoanchor) are not copied and the
  deploy model decodes boxes with the file's default anchors.

:func:`deploy_config` derives the deploy model file (:func:`config_text`
writes it as the original's files are written, a row per line), :func:`deploy`
the deploy :class:`~reorg_jax.models.yolo.YOLO` and its variables;
``build_model(deploy_config(...))`` builds the model :func:`deploy` returns.
In evaluation mode the deploy model's decoded outputs ``[B, R, F]`` are the
training model's up to float rounding.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import yaml

from reorg_jax.models.detect import IAuxDetect, IDetect, fuse_implicit
from reorg_jax.models.from_yaml import LayerSpec, parse_config
from reorg_jax.models.yolo import YOLO

__all__ = ['DEPLOY_HEAD', 'config_text', 'deploy', 'deploy_config', 'kept_layers']

# the deploy head's module name in a model file (the original's cfg/deploy files)
DEPLOY_HEAD = 'Detect'


def kept_layers(specs: Sequence[LayerSpec]) -> tuple[int, ...]:
  """The layers of an IAuxDetect model a deploy model keeps, in order, head last.

  Those the lead head's inputs depend on; the auxiliary inputs and any layer
  only they read are dropped.

  Raises:
    ValueError: the last layer is not ``IAuxDetect``.
  """
  head = specs[-1]
  if head.module is not IAuxDetect:
    raise ValueError(
      f'the last layer is {head.name}, not IAuxDetect: only a training model (with the '
      'auxiliary head) is reparameterised for deployment'
    )
  levels = len(dict(head.kwargs)['anchors'])
  needed, pending = set(), list(head.sources[:levels])
  while pending:
    index = pending.pop()
    if index == -1 or index in needed:
      continue
    needed.add(index)
    pending.extend(specs[index].sources)
  return (*sorted(needed), head.index)


def _renumbered(origin: Any, *, index: int, new: Mapping[int, int]) -> Any:
  """A row's ``from`` naming the same layers once layer ``i`` is layer ``new[i]``."""
  entries = origin if isinstance(origin, (list, tuple)) else [origin]
  written = []
  for entry in entries:
    if index == 0 and entry == -1:  # the image
      written.append(entry)
      continue
    source = index + entry if entry < 0 else entry
    written.append(new[source] - new[index] if entry < 0 else new[source])
  return written if isinstance(origin, (list, tuple)) else written[0]


def _plain(value: float) -> float | int:
  """``19.0`` -> ``19``: anchors read from weights written as the model files write them."""
  return int(value) if float(value).is_integer() else float(value)


def deploy_config(
  config: Mapping[str, Any],
  *,
  num_classes: int | None = None,
  anchors: Sequence[Sequence[float]] | None = None,
) -> dict[str, Any]:
  """The deploy model file of a training model file (both as mappings).

  Args:
    config: an original-format model file ending in ``IAuxDetect``.
    num_classes: ``C`` to write as ``nc``; ``None`` keeps the file's.
    anchors: the anchors to write (per level ``[w0, h0, ...]`` in pixels),
      e.g. the ones the weights were trained with; ``None`` keeps the file's.

  Returns:
    The deploy model file: the same keys, the kept rows renumbered (the
    ``backbone``/``head`` split kept), the last row ``[lead inputs, 1, Detect,
    args]`` with the head row's own ``args`` (``[nc, anchors]``).

  Raises:
    ValueError: the file does not parse (naming the layer), or does not end in
      ``IAuxDetect``.
  """
  specs, _ = parse_config(config, num_classes=num_classes, anchors=anchors, in_channels=None)
  keep = kept_layers(specs)
  new = {old: position for position, old in enumerate(keep)}
  rows = list(config['backbone']) + list(config['head'])
  backbone_rows = len(config['backbone'])
  head = specs[-1]
  levels = len(dict(head.kwargs)['anchors'])
  backbone, top = [], []
  for old in keep:
    origin, number, _, args = rows[old]
    if old == head.index:
      lead = list(origin)[:levels] if isinstance(origin, (list, tuple)) else origin
      row = [_renumbered(lead, index=old, new=new), number, DEPLOY_HEAD, copy.deepcopy(args)]
    else:
      row = [_renumbered(origin, index=old, new=new), *copy.deepcopy(rows[old][1:])]
    (backbone if old < backbone_rows else top).append(row)
  derived = {key: copy.deepcopy(value) for key, value in config.items()}
  if num_classes is not None:
    derived['nc'] = num_classes
  if anchors is not None:
    derived['anchors'] = [[_plain(v) for v in level] for level in anchors]
  derived['backbone'], derived['head'] = backbone, top
  return derived


def deploy(model: YOLO, variables: Mapping[str, Any]) -> tuple[YOLO, dict[str, Any]]:
  """The deploy model of a trained IAuxDetect model, and its variables.

  Args:
    model: a training model (its head ``IAuxDetect``, fused or not).
    variables: its ``{'params', 'batch_stats'}``.

  Returns:
    The deploy model (layers renumbered as :func:`deploy_config` does; the
    head an :class:`~reorg_jax.models.detect.IDetect` without implicit layers,
    with the model's classes, anchors and strides) and its variables: the kept
    layers' unchanged, the lead convs with the implicit layers folded in (in
    float64, stored in the convs' dtype).

  Raises:
    ValueError: the model's last layer is not ``IAuxDetect``.
  """
  keep = kept_layers(model.specs)
  new = {old: position for position, old in enumerate(keep)}
  head = model.head
  levels = len(model.anchors)
  specs = []
  for old in keep[:-1]:
    spec = model.specs[old]
    sources = tuple(-1 if s == -1 else new[s] for s in spec.sources)
    specs.append(dataclasses.replace(spec, index=new[old], sources=sources))
  specs.append(
    LayerSpec(
      index=new[head.index],
      name=DEPLOY_HEAD,
      sources=tuple(new[s] for s in head.sources[:levels]),
      gathers=True,
      module=IDetect,
      kwargs=(*dict(head.kwargs).items(), ('implicit', False)),
      takes_train=True,
      channels=0,
      stride=head.stride,
    )
  )
  lead_params = dict(variables['params'][f'model_{head.index}'])
  dtype = np.asarray(lead_params['m_0']['kernel']).dtype
  if not model.fused:
    wide = {
      name: {leaf: np.asarray(value, np.float64) for leaf, value in params.items()}
      for name, params in lead_params.items()
    }
    lead_params = fuse_implicit(wide, num_levels=levels)
  head_params = {
    f'm_{level}': {
      leaf: np.asarray(value).astype(dtype) for leaf, value in lead_params[f'm_{level}'].items()
    }
    for level in range(levels)
  }
  derived: dict[str, Any] = {}
  for collection, layers in variables.items():
    derived[collection] = {
      f'model_{new[old]}': layers[f'model_{old}'] for old in keep[:-1] if f'model_{old}' in layers
    }
  derived['params'][f'model_{new[head.index]}'] = head_params
  return YOLO(specs=tuple(specs), in_channels=model.in_channels), derived


def config_text(config: Mapping[str, Any], *, header: str = '') -> str:
  """A model file's text: each ``backbone``/``head`` row on one line, its layer index after it.

  ``yaml.safe_load`` of the text gives ``config`` back. ``header`` (lines
  without the ``#``) goes first as comments.
  """

  def flow(value: Any) -> str:
    return yaml.safe_dump([value], default_flow_style=True, width=10**9).strip()[1:-1]

  lines = [f'# {line}'.rstrip() for line in header.splitlines()]
  index = 0
  for key, value in config.items():
    if not isinstance(value, list):
      lines.append(yaml.safe_dump({key: value}, default_flow_style=False).rstrip())
      continue
    lines.append(f'{flow(key)}:')
    for row in value:
      if key in ('backbone', 'head'):
        lines.append(f'  - {flow(row)}  # {index}')
        index += 1
      else:
        lines.append(f'  - {flow(row)}')
  return '\n'.join(lines) + '\n'
