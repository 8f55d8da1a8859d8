"""Weights between the original PyTorch YOLOv7 and :class:`reorg_jax.models.yolo.YOLO`.

Glossary: ``L`` levels, ``A`` anchors per level, ``O``/``I`` output/input
channels, ``k`` kernel size.

Names map one to one: the Flax variable ``params/model_3/bn/scale`` is the
PyTorch ``model.3.bn.weight``; any path component ``name_i`` becomes
``name.i`` (``model_122/m2_1`` is ``model.122.m2.1``). Leaves (Flax -> PyTorch):

* ``params/.../kernel`` ``[k, k, I, O]`` -> ``weight`` ``[O, I, k, k]``;
* ``params/.../bias`` -> ``bias``;
* ``params/.../bn/scale`` -> ``bn.weight``;
* ``params/.../implicit`` ``[I]`` -> ``implicit`` ``[1, I, 1, 1]``;
* ``batch_stats/.../mean`` -> ``running_mean``;
* ``batch_stats/.../var`` -> ``running_var``.

The PyTorch state also holds buffers with no Flax variable: each batch norm's
``num_batches_tracked`` (unused by the original, whose momentum is fixed; read
as a scalar and exported as ``0``) and the head's ``anchors`` (grid units,
``[L, A, 2]``) and ``anchor_grid`` (pixels, ``[L, 1, A, 1, 1, 2]``). Anchors are
part of the model definition here: import checks them against the model and
fails on a difference (build the model with
``anchors=anchors_from_state_dict(state)`` for re-fitted anchors); export
writes the model's.

Import fails on any missing key, unexpected key or shape difference, listing
all of them; nothing is skipped.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from reorg_jax.models.yolo import YOLO

__all__ = [
  'anchors_from_state_dict',
  'export_state_dict',
  'import_state_dict',
  'load_torch_state_dict',
  'save_torch_state_dict',
  'state_dict_from_variables',
  'variables_from_state_dict',
]

_INDEXED = re.compile(r'^(.+)_(\d+)$')

# (collection, Flax leaf) -> PyTorch leaf
_LEAVES = {
  ('params', 'kernel'): 'weight',
  ('params', 'bias'): 'bias',
  ('params', 'scale'): 'weight',
  ('params', 'implicit'): 'implicit',
  ('batch_stats', 'mean'): 'running_mean',
  ('batch_stats', 'var'): 'running_var',
}


def _torch_shape(leaf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  if leaf == 'kernel':
    return (shape[3], shape[2], shape[0], shape[1])
  if leaf == 'implicit':
    return (1, shape[0], 1, 1)
  return tuple(shape)


def _to_torch_layout(leaf: str, value: np.ndarray) -> np.ndarray:
  if leaf == 'kernel':
    return value.transpose(3, 2, 0, 1)  # [O, I, k, k]
  if leaf == 'implicit':
    return value.reshape(1, -1, 1, 1)  # [1, I, 1, 1]
  return value


def _to_flax_layout(leaf: str, value: np.ndarray) -> np.ndarray:
  if leaf == 'kernel':
    return value.transpose(2, 3, 1, 0)  # [k, k, I, O]
  if leaf == 'implicit':
    return value.reshape(-1)  # [I]
  return value


def _torch_prefix(path: tuple[str, ...]) -> str:
  parts = []
  for part in path:
    match = _INDEXED.match(part)
    parts.append(f'{match.group(1)}.{match.group(2)}' if match else part)
  return '.'.join(parts)


def _leaves(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()):
  for key, value in tree.items():
    if isinstance(value, Mapping):
      yield from _leaves(value, (*prefix, key))
    else:
      yield (*prefix, key), value


def _layout(shapes: Mapping[str, Any]) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
  """Torch key -> (Flax path ``(collection, ..., leaf)``, torch shape), by layer index."""
  layout = {}
  for collection in ('params', 'batch_stats'):
    for path, leaf_value in _leaves(shapes.get(collection, {})):
      leaf = path[-1]
      if (collection, leaf) not in _LEAVES:
        raise ValueError(f'no PyTorch counterpart for {collection}/{"/".join(path)}')
      key = f'{_torch_prefix(path[:-1])}.{_LEAVES[collection, leaf]}'
      layout[key] = ((collection, *path), _torch_shape(leaf, tuple(leaf_value.shape)))
  return dict(sorted(layout.items(), key=lambda item: _natural(item[0])))


def _natural(key: str) -> tuple:
  return tuple((0, int(p), '') if p.isdigit() else (1, 0, p) for p in key.split('.'))


def _counters(layout: Mapping[str, Any]) -> list[str]:
  """The ``num_batches_tracked`` key of every batch norm in ``layout``."""
  suffix = '.running_mean'
  return [
    key.removesuffix(suffix) + '.num_batches_tracked' for key in layout if key.endswith(suffix)
  ]


def _numpy(value: Any) -> np.ndarray:
  if hasattr(value, 'detach'):  # a torch tensor, possibly half precision
    value = value.detach().cpu()
    value = value.float() if value.is_floating_point() else value
    return value.numpy()
  return np.asarray(value)


def variables_from_state_dict(
  shapes: Mapping[str, Any], state_dict: Mapping[str, Any], *, buffers: Mapping[str, np.ndarray]
) -> dict[str, Any]:
  """PyTorch weights -> Flax variables of any module built from these layers.

  Args:
    shapes: the module's variables or their shapes (``jax.eval_shape`` of ``init``).
    state_dict: PyTorch key -> tensor or array.
    buffers: further PyTorch-only keys the state must hold, with the values
      they must have (up to ``rtol=1e-3``, half-precision storage).
      ``num_batches_tracked`` scalars are expected for every batch norm and
      need not be listed.

  Returns:
    ``{'params': ..., 'batch_stats': ...}`` (as present in ``shapes``), float32.

  Raises:
    ValueError: listing every missing or unexpected key, shape difference and
      buffer value difference.
  """
  layout = _layout(shapes)
  expected = {key: shape for key, (_, shape) in layout.items()}
  expected.update({key: () for key in _counters(layout)})
  expected.update({key: np.shape(value) for key, value in buffers.items()})
  arrays = {key: _numpy(value) for key, value in state_dict.items()}
  missing = [key for key in expected if key not in arrays]
  unexpected = [key for key in arrays if key not in expected]
  wrong = [
    f'{key}: expected {tuple(shape)}, got {arrays[key].shape}'
    for key, shape in expected.items()
    if key in arrays and tuple(arrays[key].shape) != tuple(shape)
  ]
  differing = [
    key
    for key, value in buffers.items()
    if key in arrays
    and arrays[key].shape == np.shape(value)
    and not np.allclose(arrays[key], value, rtol=1e-3, atol=1e-6)
  ]
  problems = []
  if missing:
    problems.append(f'missing keys: {missing}')
  if unexpected:
    problems.append(f'unexpected keys: {unexpected}')
  if wrong:
    problems.append(f'shape mismatches: {wrong}')
  if differing:
    problems.append(f"buffers differ from the model's: {differing}")
  if problems:
    raise ValueError('state dict does not fit the model: ' + '; '.join(problems))

  variables: dict[str, Any] = {}
  for key, (path, _) in layout.items():
    value = _to_flax_layout(path[-1], arrays[key].astype(np.float32))
    node = variables
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = jnp.asarray(value)
  return variables


def state_dict_from_variables(
  variables: Mapping[str, Any], *, buffers: Mapping[str, np.ndarray], dtype: Any = np.float32
) -> dict[str, np.ndarray]:
  """Flax variables of any module built from these layers -> PyTorch state dict arrays.

  Args:
    variables: ``{'params': ..., 'batch_stats': ...}``.
    buffers: further PyTorch-only entries to write as given.
    dtype: of the arrays written (``np.float64`` keeps float64 variables exact).

  Returns:
    PyTorch key -> ``dtype`` array in PyTorch layout, plus an ``int64`` zero
    ``num_batches_tracked`` per batch norm and ``buffers``; keys sorted with
    numbers compared as numbers (so by layer index).
  """
  layout = _layout(variables)
  state = {}
  for key, (path, _) in layout.items():
    node = variables
    for part in path:
      node = node[part]
    state[key] = _to_torch_layout(path[-1], np.array(node, dtype))
  state.update({key: np.array(0, np.int64) for key in _counters(layout)})
  state.update(buffers)
  return dict(sorted(state.items(), key=lambda item: _natural(item[0])))


def _model_shapes(model: YOLO) -> Any:
  if model.fused:
    raise ValueError('weights convert to and from the unfused model; fuse after importing')
  size = 2 * model.max_stride
  images = jax.ShapeDtypeStruct((1, size, size, model.in_channels), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=True), images)


def _anchor_buffers(model: YOLO) -> dict[str, np.ndarray]:
  head = f'model.{model.head.index}'
  pixels = np.asarray(model.anchors, np.float32)  # [L, A, 2]
  strides = np.asarray(model.strides, np.float32)[:, None, None]  # [L, 1, 1]
  return {
    f'{head}.anchors': pixels / strides,  # [L, A, 2]
    f'{head}.anchor_grid': pixels[:, None, :, None, None, :],  # [L, 1, A, 1, 1, 2]
  }


def import_state_dict(model: YOLO, state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Original PyTorch weights -> Flax variables.

  Args:
    model: the model the weights are for (same config, classes and anchors).
    state_dict: the original ``Model.state_dict()`` (torch tensors or arrays),
      e.g. from :func:`load_torch_state_dict`.

  Returns:
    ``{'params': ..., 'batch_stats': ...}`` in float32, for ``model.apply``.

  Raises:
    ValueError: listing every missing or unexpected key and shape difference,
      or naming anchors that differ from the model's.
  """
  anchors = _anchor_buffers(model)
  differing = [
    key
    for key, value in anchors.items()
    if key in state_dict
    and _numpy(state_dict[key]).shape == value.shape
    and not np.allclose(_numpy(state_dict[key]), value, rtol=1e-3, atol=1e-6)
  ]
  if differing:
    raise ValueError(
      f"anchors in {differing} differ from the model's; build the model with "
      'anchors=anchors_from_state_dict(state_dict)'
    )
  return variables_from_state_dict(_model_shapes(model), state_dict, buffers=anchors)


def export_state_dict(
  model: YOLO, variables: Mapping[str, Any], *, dtype: Any = np.float32
) -> dict[str, np.ndarray]:
  """Flax variables -> a state dict the original ``Model`` loads with ``strict=True``.

  Args:
    model: the model the variables belong to.
    variables: ``{'params': ..., 'batch_stats': ...}``.
    dtype: of the weights and statistics written (the anchors stay float32).

  Returns:
    PyTorch key -> ``dtype`` array in PyTorch layout (``int64`` zeros for
    ``num_batches_tracked``, the model's anchors for the head's buffers),
    ordered by layer index. Convert with ``torch.from_numpy`` or
    :func:`save_torch_state_dict`.

  Raises:
    ValueError: when ``variables`` do not have the model's structure.
  """
  wanted = _layout(_model_shapes(model))
  given = _layout(variables)
  missing = [key for key in wanted if key not in given]
  unexpected = [key for key in given if key not in wanted]
  wrong = [key for key in wanted if key in given and given[key][1] != wanted[key][1]]
  if missing or unexpected or wrong:
    raise ValueError(
      f'variables do not fit the model: missing {missing}, unexpected {unexpected}, '
      f'wrong shapes {wrong}'
    )
  return state_dict_from_variables(variables, buffers=_anchor_buffers(model), dtype=dtype)


def anchors_from_state_dict(state_dict: Mapping[str, Any]) -> list[list[float]]:
  """The anchors stored in an original state dict, per level ``[w0, h0, w1, h1, ...]`` in pixels.

  Pass them to :func:`reorg_jax.models.yolo.build_model` as ``anchors=`` for
  checkpoints whose anchors were re-fitted during training.
  """
  keys = [key for key in state_dict if key.endswith('.anchor_grid')]
  if len(keys) != 1:
    raise ValueError(f'expected one detection head anchor_grid in the state dict, found {keys}')
  grid = _numpy(state_dict[keys[0]]).astype(np.float32)
  if grid.ndim != 6 or grid.shape[-1] != 2:
    raise ValueError(f'{keys[0]} should be [L, 1, A, 1, 1, 2], got {grid.shape}')
  levels = grid.reshape(grid.shape[0], -1)  # [L, 2A]
  return [[float(v) for v in level] for level in levels]


def load_torch_state_dict(
  path: str | os.PathLike, *, entry: str = 'model', allow_pickle: bool = False
) -> dict[str, np.ndarray]:
  """Reads an original state dict or checkpoint with PyTorch, as float32 arrays.

  Args:
    path: a ``.pt`` file holding either a state dict, or an original training
      checkpoint (a mapping whose ``entry`` is the pickled model or its state dict).
    entry: which checkpoint entry holds the model (``'model'`` or ``'ema'``).
    allow_pickle: let PyTorch unpickle arbitrary objects. Original
      checkpoints pickle the model itself, which needs this and the original
      model classes importable; only use it on files you trust.

  Raises:
    ValueError: when the file holds neither form.
  """
  import torch

  try:
    content = torch.load(path, map_location='cpu', weights_only=not allow_pickle)
  except Exception as error:
    if allow_pickle:
      raise
    raise ValueError(
      f'{path} is not a plain state dict ({error}); for a full checkpoint you trust, '
      'pass allow_pickle=True with the original model classes importable'
    ) from error
  if isinstance(content, Mapping) and entry in content and not torch.is_tensor(content[entry]):
    content = content[entry]
    if hasattr(content, 'state_dict'):
      content = content.state_dict()
  if not isinstance(content, Mapping) or not all(torch.is_tensor(v) for v in content.values()):
    raise ValueError(f'{path}: found neither a state dict nor a checkpoint with {entry!r}')
  return {key: _numpy(value) for key, value in content.items()}


def save_torch_state_dict(state_dict: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
  """Writes arrays (e.g. from :func:`export_state_dict`) as a PyTorch state dict file."""
  import torch

  torch.save({key: torch.from_numpy(np.array(value)) for key, value in state_dict.items()}, path)
