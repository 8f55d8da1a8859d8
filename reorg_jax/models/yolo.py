"""YOLOv7 P6 models built from the original YAML layer lists.

Glossary: ``B`` batch, ``H``/``W`` image height/width, ``L`` levels, ``A``
anchors per level, ``C`` classes, ``F = 5 + C`` features of a head row,
``H_l``/``W_l`` grid of level ``l``, ``R = A * sum_l H_l * W_l`` decoded rows
(boxes) per image.

:func:`build_model` turns an original-format model file (see
:mod:`reorg_jax.models.from_yaml`), or its parsed mapping, into a :class:`YOLO`
Linen module whose ``model_i`` submodule is layer ``i``, so variable paths
mirror the original ``model.i`` names. :data:`p6_nano` builds this project's
small model.

:func:`apply_train` runs a model in training mode keeping, for the backward
pass, only what a :class:`Remat` policy says: everything, the inputs of each
block of layers (:func:`blocks`, one ELAN stage each), or also only the
inputs of each layer inside a block while it is recomputed. The variables
and the values are the same under every policy; the memory between the
forward and backward passes is not.
"""

from __future__ import annotations

import enum
import functools
import math
import os
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from reorg_jax.models import layers
from reorg_jax.models.detect import IAuxDetect, fuse_implicit
from reorg_jax.models.from_yaml import LayerSpec, Traversable, load_config, parse_config

__all__ = [
  'NANO_CONFIG',
  'YOLO',
  'Remat',
  'apply_train',
  'blocks',
  'build_model',
  'fuse',
  'p6_nano',
  'unit_images',
]

NANO_CONFIG = resources.files('reorg_jax.models') / 'configs' / 'yolov7-p6-nano.yaml'

# v / 255 for every byte value v, each correctly rounded to float32: upstream's
# ``img.float() / 255`` (and NumPy's), entry by entry.
_BYTE_TO_UNIT = np.arange(256, dtype=np.float32) / np.float32(255)


def unit_images(images: jax.Array | np.ndarray) -> jax.Array:
  """``uint8`` images (any shape) -> float32 in ``[0, 1]``, exactly upstream's ``x.float() / 255``.

  Not ``images.astype(jnp.float32) / 255``: XLA compiles a division by a
  constant into a multiplication by its reciprocal, which on XLA:CPU rounds
  126 of the 256 byte values to the neighbouring float32. The first layers'
  gradients are sensitive to that last bit: on the test scene of
  ``tests/test_trained_step.py`` it moved their updates by about 1% (rounding
  elsewhere in the step moves them by 1e-4). A lookup of the 256 correctly
  rounded quotients gives upstream's inputs on every backend.

  Raises:
    ValueError: ``images`` are not ``uint8``.
  """
  if images.dtype != np.uint8:
    raise ValueError(f'unit_images takes uint8 images (0..255), got dtype {images.dtype}')
  return jnp.take(jnp.asarray(_BYTE_TO_UNIT), jnp.asarray(images).astype(jnp.int32))


class YOLO(nn.Module):
  """A layer graph ending in :class:`~reorg_jax.models.detect.IAuxDetect`.

  ``__call__(images, *, train)`` takes ``[B, H, W, in_channels]`` float
  images scaled to ``[0, 1]`` (``H`` and ``W`` multiples of
  :attr:`max_stride`; integer images are an error) and returns, with
  ``train=True``, the ``2L`` raw head outputs ``[B, A, H_l, W_l, F]`` (lead
  levels, then auxiliary levels); with ``train=False``, the decoded boxes
  ``[B, R, F]``. Training updates ``batch_stats`` (``mutable=['batch_stats']``).

  Attributes:
    specs: the parsed layer list, head last (see :func:`parse_config`).
    in_channels: image channels.
    fused: the head's implicit layers are folded into its convs (see
      :func:`reorg_jax.models.detect.fuse_implicit`).
  """

  specs: tuple[LayerSpec, ...]
  in_channels: int
  fused: bool = False

  def setup(self):
    self.model = [_layer(spec, fused=self.fused) for spec in self.specs]

  @property
  def head(self) -> LayerSpec:
    return self.specs[-1]

  @property
  def num_classes(self) -> int:
    return dict(self.head.kwargs)['num_classes']

  @property
  def anchors(self) -> tuple[tuple[tuple[float, float], ...], ...]:
    """Per level, ``A`` anchor ``(width, height)`` pairs in pixels."""
    return dict(self.head.kwargs)['anchors']

  @property
  def strides(self) -> tuple[int, ...]:
    """Per level, input pixels per grid cell."""
    return dict(self.head.kwargs)['strides']

  @property
  def max_stride(self) -> int:
    """Image height and width must be multiples of this."""
    return math.lcm(*(spec.stride.numerator for spec in self.specs))

  def __call__(self, images: jax.Array, *, train: bool) -> tuple[jax.Array, ...] | jax.Array:
    _check_images(self, images)
    outputs: list[Any] = []
    for spec, module in zip(self.specs, self.model, strict=True):
      inputs = [images if source == -1 else outputs[source] for source in spec.sources]
      x = inputs if spec.gathers else inputs[0]
      outputs.append(module(x, train=train) if spec.takes_train else module(x))
    return outputs[-1]


def _layer(spec: LayerSpec, *, fused: bool) -> nn.Module:
  """The unbound module of layer ``spec``."""
  kwargs = dict(spec.kwargs)
  if spec.module is IAuxDetect:
    kwargs['fused'] = fused
  return spec.module(**kwargs)


def _check_images(model: YOLO, images: jax.Array) -> None:
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(
      f'expected float images scaled to [0, 1], got dtype {images.dtype}; convert uint8 '
      'images first with reorg_jax.models.yolo.unit_images'
    )
  if images.ndim != 4 or images.shape[-1] != model.in_channels:
    raise ValueError(
      f'expected images [B, H, W, {model.in_channels}] (NHWC), got shape {images.shape}'
    )
  _, height, width, _ = images.shape
  if height % model.max_stride or width % model.max_stride:
    raise ValueError(
      f'image height and width must be multiples of {model.max_stride}, got {height}x{width}'
    )


class Remat(enum.Enum):
  """What the backward pass of a training step recomputes rather than keeps (:func:`apply_train`).

  Outputs, gradients and new BatchNorm statistics are the same under every
  policy (the same operations on the same inputs, run again); what changes is
  the memory the step needs between its forward and backward passes, and the
  work it repeats.

  Attributes:
    NONE: keep every intermediate the backward pass reads; nothing is recomputed.
    BLOCKS: keep only the inputs of each block (:func:`blocks`; in the YOLOv7
      files, one ELAN stage each); the backward pass of a block first runs the
      block forward again, keeping that block's intermediates only while it
      goes back through it. Every layer runs forward twice.
    FULL: as ``BLOCKS``, and that second forward run of a block keeps only its
      layers' inputs; the backward pass of each layer runs the layer forward a
      third time. The least memory and the most work.
  """

  NONE = 'none'
  BLOCKS = 'blocks'
  FULL = 'full'


def blocks(specs: Sequence[LayerSpec]) -> tuple[tuple[int, ...], ...]:
  """The layer indices of ``specs`` in consecutive blocks, in order (the units of :class:`Remat`).

  A block ends at each layer that reads an ELAN aggregation (a ``Concat`` of
  more than two inputs: in the YOLOv7 files the 1x1 transition conv after
  it) and at the last layer; the next starts after it: one block per ELAN.
  YOLOv7-W6 thus has one block per backbone stage (its stride-2 conv, ELAN and
  transition), one per stage of the top-down and bottom-up paths (the
  upsampling or downsampling, the concatenation with the backbone or the
  earlier path, the ELAN) and a last one with the head's branch convs and
  ``IAuxDetect``: 12 blocks; E6E, with two ELANs per stage, has 23.
  """
  elan = {spec.index for spec in specs if spec.module is layers.Concat and len(spec.sources) > 2}
  ends = [spec.index for spec in specs if elan.intersection(spec.sources)]
  if not ends or ends[-1] != specs[-1].index:
    ends.append(specs[-1].index)
  starts = [specs[0].index, *(end + 1 for end in ends[:-1])]
  return tuple(tuple(range(start, end + 1)) for start, end in zip(starts, ends, strict=True))


def apply_train(
  model: YOLO, variables: Mapping[str, Any], images: jax.Array, *, remat: Remat
) -> tuple[Any, dict[str, Any]]:
  """``model`` in training mode, keeping for the backward pass what ``remat`` says.

  The result of ``model.apply(variables, images, train=True,
  mutable=['batch_stats'])``: the ``2L`` head outputs and the new
  ``batch_stats`` (the same tree as ``variables['batch_stats']``), with the
  same values under every :class:`Remat`. The variables keep their names:
  each layer ``i`` is applied with the subtrees ``model_i`` of ``variables``.

  Under ``BLOCKS`` and ``FULL`` each block (and under ``FULL`` each layer in
  it) is a ``jax.custom_vjp`` whose forward pass saves only its inputs and
  variables, and whose backward pass runs it again and differentiates that
  run. The rerun is made to read the cotangent of the block's outputs (its
  inputs less an exact zero computed from the cotangent), so no compiler can
  schedule it before the backward pass reaches the block. With
  ``jax.checkpoint`` alone (whose optimisation barriers XLA:CPU removes) XLA
  ran the recomputation beside the forward pass: the memory analysis of W6's
  forward and backward passes (bfloat16, 640 px, batch 4) went from 2.41 GiB
  only to 2.38 GiB, against 1.02 GiB here. The new statistics are not
  differentiated (the cotangent of the returned ``batch_stats`` is ignored).

  Raises:
    ValueError: as ``model.apply`` (integer images, wrong shape or side).
  """
  if remat is Remat.NONE:
    outputs, updates = model.apply(variables, images, train=True, mutable=['batch_stats'])
    return outputs, updates['batch_stats']
  _check_images(model, images)
  last = model.specs[-1].index
  results: dict[int, Any] = {-1: images}
  batch_stats: dict[str, Any] = {}
  for group in blocks(model.specs):
    inside = set(group)
    sources = tuple(sorted({s for i in group for s in model.specs[i].sources} - inside))
    read_later = {s for spec in model.specs if spec.index not in inside for s in spec.sources}
    kept = tuple(i for i in group if i in read_later or i == last)
    names = {f'model_{i}' for i in group}
    own = {
      collection: {name: tree[name] for name in tree if name in names}
      for collection, tree in variables.items()
    }
    run = functools.partial(
      _run_layers, model, group=group, sources=sources, kept=kept, nested=remat is Remat.FULL
    )
    outputs, updates = _recomputed(run)(own, tuple(results[s] for s in sources))
    results.update(zip(kept, outputs, strict=True))
    batch_stats.update(updates)
  return results[last], batch_stats


def _run_layers(
  model: YOLO,
  variables: Mapping[str, Any],
  inputs: tuple[jax.Array, ...],
  *,
  group: tuple[int, ...],
  sources: tuple[int, ...],
  kept: tuple[int, ...],
  nested: bool,
) -> tuple[tuple[Any, ...], dict[str, Any]]:
  """Layers ``group`` of ``model`` in training mode, from the outputs ``inputs`` of ``sources``.

  Returns the outputs of the layers ``kept`` and the new ``batch_stats`` of
  the group's layers (by layer name).
  """
  results = dict(zip(sources, inputs, strict=True))
  batch_stats = {}
  for i in group:
    spec, name = model.specs[i], f'model_{i}'
    xs = [results[s] for s in spec.sources]
    own = {collection: tree[name] for collection, tree in variables.items() if name in tree}
    run = functools.partial(_run_layer, _layer(spec, fused=model.fused), spec.takes_train)
    if nested:
      run = _recomputed(run)
    results[i], updates = run(own, xs if spec.gathers else xs[0])
    if updates:
      batch_stats[name] = updates
  return tuple(results[i] for i in kept), batch_stats


def _run_layer(
  module: nn.Module, takes_train: bool, variables: Mapping[str, Any], x: Any
) -> tuple[Any, Any]:
  """One layer in training mode: its output and its new ``batch_stats`` (``{}`` if none)."""
  if not takes_train:
    return module.apply(variables, x), {}
  y, updates = module.apply(variables, x, train=True, mutable=['batch_stats'])
  return y, updates.get('batch_stats', {})


def _recomputed(
  fn: Callable[[Any, Any], tuple[Any, Any]],
) -> Callable[[Any, Any], tuple[Any, Any]]:
  """``fn(variables, inputs) -> (outputs, batch_stats)`` whose backward pass runs ``fn`` again.

  The forward pass saves ``variables`` and ``inputs`` only. The backward
  pass makes the inputs depend on the outputs' cotangent (:func:`_after`),
  then differentiates a second run of ``fn``; the cotangent of
  ``batch_stats`` is ignored.
  """

  @jax.custom_vjp
  def run(variables: Any, inputs: Any) -> tuple[Any, Any]:
    return fn(variables, inputs)

  def forward(variables: Any, inputs: Any) -> tuple[tuple[Any, Any], Any]:
    return fn(variables, inputs), (variables, inputs)

  def backward(saved: Any, cotangents: tuple[Any, Any]) -> tuple[Any, Any]:
    variables, inputs = saved
    outputs_cotangent, _ = cotangents
    inputs = _after(inputs, outputs_cotangent)
    _, pullback = jax.vjp(lambda v, x: fn(v, x)[0], variables, inputs)
    return pullback(outputs_cotangent)

  run.defvjp(forward, backward)
  return run


def _after(tree: Any, cotangents: Any) -> Any:
  """``tree``'s arrays, bit for bit, computed from ``cotangents`` (so only once they exist).

  Both hold ``[B, ...]`` arrays. Each array of ``tree`` less, per image ``b``,
  ``0 * |g_b|`` summed over the first element ``g_b`` of image ``b`` in each
  cotangent: an exact ``+0`` (``x - (+0)`` is ``x``, signed zeros included)
  unless the cotangent is not finite, when the gradient is not finite either
  way. Per image, so a batch split over devices needs no communication; XLA
  does not fold ``0 * y`` for floats (``y`` might be a NaN).
  """

  def first(g: jax.Array) -> jax.Array:
    return jnp.abs(g[(slice(None),) + (0,) * (g.ndim - 1)].astype(jnp.float32))

  zero = functools.reduce(jnp.add, [first(g) for g in jax.tree.leaves(cotangents)]) * 0

  def tied(x: jax.Array) -> jax.Array:
    return x - zero.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)

  return jax.tree.map(tied, tree)


def build_model(
  config: Mapping[str, Any] | str | os.PathLike | Traversable,
  *,
  num_classes: int | None = None,
  anchors: Sequence[Sequence[float]] | None = None,
  in_channels: int | None = None,
) -> YOLO:
  """Builds a :class:`YOLO` from a model YAML file or its parsed mapping.

  Args:
    config: path of an upstream-format model file, or its content.
    num_classes: overrides the file's ``nc``.
    anchors: overrides the file's anchors (per level ``[w0, h0, w1, h1, ...]``
      in pixels), e.g. with :func:`reorg_jax.models.convert.anchors_from_state_dict`
      for a checkpoint whose anchors were re-fitted during training.
    in_channels: overrides the file's ``ch`` (3 if absent).

  Raises:
    ValueError: an unreadable or invalid file, an unsupported module, a bad
      argument, ... (the message names the file, when given one, and the layer).
  """
  source = None
  if not isinstance(config, Mapping):
    source, config = config, load_config(config)
  try:
    specs, channels = parse_config(
      config, num_classes=num_classes, anchors=anchors, in_channels=in_channels
    )
  except ValueError as error:
    if source is None:
      raise
    raise ValueError(f'{source}: {error}') from None
  return YOLO(specs=specs, in_channels=channels)


def fuse(model: YOLO, variables: Mapping[str, Any]) -> tuple[YOLO, dict[str, Any]]:
  """Folds the head's implicit layers into its lead convs, for deployment.

  Returns:
    The model with ``fused=True`` and its variables; in evaluation mode it
    gives the outputs of ``model`` with ``variables`` up to float rounding.
  """
  if model.fused:
    raise ValueError('the model is already fused')
  head = f'model_{model.head.index}'
  params = dict(variables['params'])
  params[head] = fuse_implicit(params[head], num_levels=len(model.anchors))
  return model.clone(fused=True), {**variables, 'params': params}


# The small model of this project: ReOrg stem, ELAN stages, 4 levels, IAuxDetect.
p6_nano = functools.partial(build_model, NANO_CONFIG)
