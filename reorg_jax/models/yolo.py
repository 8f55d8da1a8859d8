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
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from reorg_jax.models.detect import IAuxDetect, fuse_implicit
from reorg_jax.models.from_yaml import LayerSpec, Traversable, load_config, parse_config

__all__ = ['NANO_CONFIG', 'YOLO', 'build_model', 'fuse', 'p6_nano', 'unit_images']

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
    modules = []
    for spec in self.specs:
      kwargs = dict(spec.kwargs)
      if spec.module is IAuxDetect:
        kwargs['fused'] = self.fused
      modules.append(spec.module(**kwargs))
    self.model = modules

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
    if not jnp.issubdtype(images.dtype, jnp.floating):
      raise ValueError(
        f'expected float images scaled to [0, 1], got dtype {images.dtype}; convert uint8 '
        'images first with reorg_jax.models.yolo.unit_images'
      )
    if images.ndim != 4 or images.shape[-1] != self.in_channels:
      raise ValueError(
        f'expected images [B, H, W, {self.in_channels}] (NHWC), got shape {images.shape}'
      )
    _, height, width, _ = images.shape
    if height % self.max_stride or width % self.max_stride:
      raise ValueError(
        f'image height and width must be multiples of {self.max_stride}, got {height}x{width}'
      )
    outputs: list[Any] = []
    for spec, module in zip(self.specs, self.model, strict=True):
      inputs = [images if source == -1 else outputs[source] for source in spec.sources]
      x = inputs if spec.gathers else inputs[0]
      outputs.append(module(x, train=train) if spec.takes_train else module(x))
    return outputs[-1]


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
