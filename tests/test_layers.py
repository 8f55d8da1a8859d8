"""Layers and the IAuxDetect head against the original PyTorch modules, one module at a time.

Each original module gets random weights and batch-norm state, its state dict
is imported with :func:`reorg_jax.models.convert.variables_from_state_dict`, and the
outputs are compared in training mode (with the running-average update) and
in evaluation mode, in float32.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from sas_yolov7.models import common
from sas_yolov7.models.yolo import IAuxDetect as TorchIAuxDetect

from reorg_jax.models import convert, detect, layers
from reorg_jax.reference.models import flushed_denormals

ATOL = 1e-5
ANCHORS = ((19, 27, 44, 40, 38, 94), (96, 68, 86, 152, 180, 137), (140, 301, 303, 264, 238, 542))
STRIDES = (8, 16, 32)


def _randomise(module: torch.nn.Module, *, seed: int) -> torch.nn.Module:
  """Random batch-norm state (with the original's eps and momentum) and implicit tensors."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for sub in module.modules():
      if isinstance(sub, torch.nn.BatchNorm2d):
        sub.eps, sub.momentum = 1e-3, 0.03
        size = sub.num_features
        sub.weight.copy_(torch.rand(size, generator=generator) + 0.5)
        sub.bias.copy_(0.2 * torch.randn(size, generator=generator))
        sub.running_mean.copy_(0.2 * torch.randn(size, generator=generator))
        sub.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
      elif isinstance(sub, (common.ImplicitA, common.ImplicitM)):
        sub.implicit.add_(0.2 * torch.randn(sub.implicit.shape, generator=generator))
  return module


def _nchw(x: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _nhwc(x: torch.Tensor) -> np.ndarray:
  return x.detach().numpy().transpose(0, 2, 3, 1)


def _images(shape: tuple[int, ...], *, seed: int) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _compare_stateful(module: nn.Module, reference: torch.nn.Module, x: np.ndarray) -> None:
  """Training output, running averages after the step, and evaluation output."""
  _randomise(reference, seed=0)
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), x, train=True))
  variables = convert.variables_from_state_dict(shapes, reference.state_dict(), buffers={})

  @jax.jit
  def run(variables, x):
    trained, updates = module.apply(variables, x, train=True, mutable=['batch_stats'])
    return trained, updates['batch_stats'], module.apply(variables, x, train=False)

  trained, stats, evaluated = run(variables, x)
  with torch.no_grad(), flushed_denormals():
    reference.eval()
    want_eval = _nhwc(reference(_nchw(x)))
    reference.train()
    want_train = _nhwc(reference(_nchw(x)))
  np.testing.assert_allclose(np.asarray(trained), want_train, rtol=0, atol=ATOL)
  np.testing.assert_allclose(np.asarray(evaluated), want_eval, rtol=0, atol=ATOL)
  after = convert.state_dict_from_variables({'batch_stats': stats}, buffers={})
  state = reference.state_dict()
  for key, value in after.items():
    if key.endswith(('running_mean', 'running_var')):
      np.testing.assert_allclose(value, state[key].numpy(), rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.mark.parametrize(
  ('kernel', 'stride', 'groups', 'size'),
  [(1, 1, 1, (8, 8)), (3, 1, 1, (8, 6)), (3, 2, 1, (9, 7)), (3, 2, 2, (8, 8)), (5, 1, 1, (7, 9))],
)
def test_conv(kernel, stride, groups, size):
  x = _images((2, *size, 4), seed=1)
  module = layers.Conv(6, kernel, stride, groups=groups)
  _compare_stateful(module, common.Conv(4, 6, kernel, stride, g=groups), x)


def test_conv_without_activation_and_with_explicit_padding():
  x = _images((2, 6, 6, 3), seed=2)
  module = layers.Conv(5, 3, 1, padding=0, activation=False)
  _compare_stateful(module, common.Conv(3, 5, 3, 1, p=0, act=False), x)


def test_down_c():
  x = _images((2, 8, 12, 6), seed=3)
  _compare_stateful(layers.DownC(10), common.DownC(6, 10), x)


def test_sppcspc():
  x = _images((2, 10, 6, 8), seed=4)
  _compare_stateful(layers.SPPCSPC(12), common.SPPCSPC(8, 12), x)


@pytest.mark.parametrize(
  ('module', 'reference'),
  [
    (layers.MaxPool(2, 2, 0), common.MP(2)),
    (layers.MaxPool(3, 1, 1), common.SP(3, 1)),
    (layers.MaxPool(5, 1, 2), torch.nn.MaxPool2d(5, 1, 2)),
    (layers.MaxPool(3, 2, 1), common.SP(3, 2)),
    (layers.Upsample(2), torch.nn.Upsample(None, 2, 'nearest')),
    (layers.Upsample(3), torch.nn.Upsample(None, 3, 'nearest')),
  ],
)
def test_parameter_free_single_input(module, reference):
  x = _images((2, 7, 9, 3), seed=5) - 3.0  # mostly negative: padding must not win the max
  got = jax.jit(module.apply)({}, x)
  np.testing.assert_array_equal(np.asarray(got), _nhwc(reference(_nchw(x))))


def test_concat_and_shortcut():
  a, b = _images((2, 4, 4, 3), seed=6), _images((2, 4, 4, 3), seed=7)
  concat = layers.Concat().apply({}, [a, b])
  np.testing.assert_array_equal(np.asarray(concat), _nhwc(common.Concat(1)([_nchw(a), _nchw(b)])))
  total = layers.Shortcut().apply({}, [a, b])
  np.testing.assert_array_equal(np.asarray(total), _nhwc(common.Shortcut(1)([_nchw(a), _nchw(b)])))
  with pytest.raises(ValueError, match='differ in shape'):
    layers.Shortcut().apply({}, [a, a[:, :2]])


@pytest.mark.parametrize(('module', 'mean'), [(layers.ImplicitA(), 0.0), (layers.ImplicitM(), 1.0)])
def test_implicit_initialisation(module, mean):
  variables = module.init(jax.random.key(0), jnp.zeros((1, 1, 1, 20000)))
  implicit = np.asarray(variables['params']['implicit'])
  assert implicit.shape == (20000,)
  assert abs(implicit.mean() - mean) < 1e-3
  assert abs(implicit.std() - 0.02) < 1e-3


def test_batch_norm_statistics_across_a_mapped_axis():
  x = _images((4, 3, 5, 6), seed=8)
  norm = layers.BatchNorm(axis_name='devices')
  variables = layers.BatchNorm().init(jax.random.key(0), x, train=True)
  whole, whole_stats = layers.BatchNorm().apply(variables, x, train=True, mutable=['batch_stats'])
  split, split_stats = jax.vmap(
    lambda part: norm.apply(variables, part, train=True, mutable=['batch_stats']),
    axis_name='devices',
  )(x.reshape(2, 2, 3, 5, 6))
  np.testing.assert_allclose(np.asarray(split).reshape(x.shape), whole, atol=1e-6)
  for name in ('mean', 'var'):
    np.testing.assert_allclose(
      split_stats['batch_stats'][name][0], whole_stats['batch_stats'][name], rtol=1e-6
    )


def test_batch_norm_needs_two_values_per_channel():
  norm = layers.BatchNorm()
  x = jnp.ones((1, 1, 1, 3))
  variables = norm.init(jax.random.key(0), jnp.ones((2, 1, 1, 3)), train=True)
  with pytest.raises(ValueError, match='more than one value per channel'):
    norm.apply(variables, x, train=True, mutable=['batch_stats'])


def _head_pair(num_classes: int, channels: tuple[int, ...]):
  anchors = tuple(tuple(zip(level[0::2], level[1::2], strict=True)) for level in ANCHORS)
  module = detect.IAuxDetect(num_classes=num_classes, anchors=anchors, strides=STRIDES)
  reference = TorchIAuxDetect(num_classes, [list(level) for level in ANCHORS], channels)
  reference.stride = torch.tensor(STRIDES, dtype=torch.float32)
  return module, _randomise(reference, seed=9)


def _head_inputs(channels: tuple[int, ...], *, height: int, width: int) -> list[np.ndarray]:
  sizes = [(height // int(s), width // int(s)) for s in STRIDES] * 2  # lead, then auxiliary
  return [
    _images((2, h, w, c), seed=10 + i)
    for i, ((h, w), c) in enumerate(zip(sizes, channels, strict=True))
  ]


def _head_buffers(reference) -> dict[str, np.ndarray]:
  return {name: buffer.numpy() for name, buffer in reference.named_buffers()}


def test_iauxdetect_matches_upstream_and_fuses():
  channels = (8, 16, 24, 6, 10, 12)
  module, reference = _head_pair(5, channels)
  features = _head_inputs(channels, height=64, width=96)
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), features, train=True))
  variables = convert.variables_from_state_dict(
    shapes, reference.state_dict(), buffers=_head_buffers(reference)
  )
  heads = jax.jit(lambda v, f: module.apply(v, f, train=True))(variables, features)
  decoded = jax.jit(lambda v, f: module.apply(v, f, train=False))(variables, features)
  with torch.no_grad():
    reference.train()
    want_heads = reference([_nchw(f) for f in features])
    reference.eval()
    want_decoded, _ = reference([_nchw(f) for f in features])
  assert len(heads) == 6
  for got, want in zip(heads, want_heads, strict=True):
    assert got.shape == tuple(want.shape)  # [B, A, H, W, K]
    np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=0, atol=ATOL)
  np.testing.assert_allclose(np.asarray(decoded), want_decoded.numpy(), rtol=1e-6, atol=ATOL)

  fused_params = detect.fuse_implicit(variables['params'], num_levels=3)
  fused = detect.IAuxDetect(
    num_classes=5, anchors=module.anchors, strides=module.strides, fused=True
  )
  fused_decoded = jax.jit(lambda v, f: fused.apply(v, f, train=False))(
    {'params': fused_params}, features
  )
  with torch.no_grad():
    reference.fuse()
    want_fused, _ = reference.fuseforward([_nchw(f) for f in features])
  np.testing.assert_allclose(np.asarray(fused_decoded), want_fused.numpy(), rtol=1e-5, atol=ATOL)
  np.testing.assert_allclose(np.asarray(fused_decoded), np.asarray(decoded), rtol=1e-5, atol=ATOL)


def test_iauxdetect_checks_its_inputs():
  channels = (8, 16, 24, 6, 10, 12)
  module, _ = _head_pair(2, channels)
  features = _head_inputs(channels, height=64, width=64)
  with pytest.raises(ValueError, match='takes 6 feature maps'):
    module.init(jax.random.key(0), features[:5], train=True)
  bad = [*features[:3], features[4], features[3], features[5]]
  with pytest.raises(ValueError, match='level 0'):
    module.init(jax.random.key(0), bad, train=True)


def test_iauxdetect_bias_priors():
  num_classes = 4
  channels = (8, 16, 24, 6, 10, 12)
  module, _ = _head_pair(num_classes, channels)
  features = _head_inputs(channels, height=64, width=64)
  params = jax.jit(lambda f: module.init(jax.random.key(0), f, train=True))(features)['params']
  for level, stride in enumerate(STRIDES):
    for prefix, fan_in in (('m', channels[level]), ('m2', channels[3 + level])):
      bias = np.asarray(params[f'{prefix}_{level}']['bias']).reshape(3, 5 + num_classes)
      bound = 1 / math.sqrt(fan_in)
      objectness = math.log(8 / (640 / stride) ** 2)
      classes = math.log(0.6 / (num_classes - 0.99))
      assert np.all(np.abs(bias[:, :4]) <= bound)
      assert np.all(np.abs(bias[:, 4] - objectness) <= bound)
      assert np.all(np.abs(bias[:, 5:] - classes) <= bound)
