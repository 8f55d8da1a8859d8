"""YAML-built models against the original ``Model``: outputs, running averages, parameter counts.

Every case imports a perturbed original model (see ``upstream_models``) and
compares, at a square and a non-square input:

* the ``2L`` training-mode head outputs ``[B, A, H, W, 5 + C]``;
* the evaluation-mode decoded boxes ``[B, N, 5 + C]``, each value divided by
  its scale (stride for centres, anchor for sizes, 1 for probabilities), so
  the tolerance means the same at every level;
* the running averages after the training step.

In float32 both sides must agree to 1e-4 (see ``upstream_models`` for why the
random batch-norm scales are small); in float64 to 1e-9, which checks the
arithmetic itself rather than rounding.
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from sas_yolov7.models.yolo import Model

from reorg_jax.models import convert, yolo
from reorg_jax.models import from_yaml as model_yaml
from reorg_jax.reference.models import perturbed_model, torch_outputs, upstream_config

# (config, height, width, also in float64): W6 at two shapes, the other P6 configs at one, and
# the small model. Float64 costs a second compile, so it runs on W6 and on the small model, which
# between them hold every module type (ReOrg, Conv, DownC, SPPCSPC, Concat, Shortcut, upsampling,
# IAuxDetect).
CASES = [
  ('w6', 256, 256, True),
  ('w6', 128, 320, False),
  ('e6', 192, 128, False),
  ('d6', 192, 128, False),
  ('e6e', 192, 128, False),
  ('nano', 256, 256, True),
  ('nano', 128, 192, False),
]
FLOAT32_TOLERANCE = 1e-4
FLOAT64_TOLERANCE = 1e-9


def _config(name: str) -> dict:
  return model_yaml.load_config(yolo.NANO_CONFIG) if name == 'nano' else upstream_config(name)


def _forward(model: yolo.YOLO):
  """One compiled step: training outputs, updated batch stats, decoded evaluation outputs."""

  @jax.jit
  def run(variables, images):
    heads, updates = model.apply(variables, images, train=True, mutable=['batch_stats'])
    decoded = model.apply(variables, images, train=False)
    return heads, updates['batch_stats'], decoded

  return run


def _decoded_scale(model: yolo.YOLO, height: int, width: int) -> np.ndarray:
  """``[N, 5 + C]``: stride for ``x, y``, anchor for ``w, h``, 1 for probabilities."""
  rows = []
  for anchors, stride in zip(model.anchors, model.strides, strict=True):
    cells = int(height // stride) * int(width // stride)
    for anchor_w, anchor_h in anchors:
      row = np.ones(5 + model.num_classes)
      row[:4] = stride, stride, anchor_w, anchor_h
      rows.append(np.broadcast_to(row, (cells, row.size)))
  return np.concatenate(rows)  # [N, K]


def _check(heads, decoded, reference, *, scale, tolerance):
  assert len(heads) == len(reference['heads'])
  for got, want in zip(heads, reference['heads'], strict=True):
    assert got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=tolerance)
  assert decoded.shape == reference['decoded'].shape
  np.testing.assert_allclose(
    np.asarray(decoded) / scale, reference['decoded'] / scale, rtol=0, atol=tolerance
  )


@pytest.mark.parametrize(('name', 'height', 'width', 'float64'), CASES)
def test_outputs_match_upstream(name, height, width, float64):
  config = _config(name)
  upstream = perturbed_model(config, seed=0)
  upstream64 = copy.deepcopy(upstream).double() if float64 else None
  images = np.random.default_rng(1).random((2, height, width, 3), dtype=np.float32)
  reference = torch_outputs(upstream, images)

  model = yolo.build_model(config)
  assert model.strides == tuple(upstream.stride.tolist())
  variables = convert.import_state_dict(model, reference['before'])
  count = sum(leaf.size for leaf in jax.tree.leaves(variables['params']))
  assert count == sum(p.numel() for p in upstream.parameters())
  exported = convert.export_state_dict(model, variables)
  assert set(exported) == set(reference['before'])
  for key, value in reference['before'].items():
    if not key.endswith('num_batches_tracked'):
      np.testing.assert_array_equal(exported[key], value, err_msg=key)
  upstream.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
  scale = _decoded_scale(model, height, width)
  run = _forward(model)

  heads, stats, decoded = run(variables, images)
  _check(heads, decoded, reference, scale=scale, tolerance=FLOAT32_TOLERANCE)
  after = convert.export_state_dict(model, {'params': variables['params'], 'batch_stats': stats})
  for key, value in after.items():
    if key.endswith(('running_mean', 'running_var')):
      np.testing.assert_allclose(value, reference['after'][key], rtol=1e-4, atol=1e-5, err_msg=key)

  if not float64:
    return
  reference64 = torch_outputs(upstream64, images.astype(np.float64))
  with jax.enable_x64(True):
    variables64 = jax.tree.map(lambda leaf: jnp.asarray(leaf, jnp.float64), variables)
    heads64, stats64, decoded64 = run(variables64, jnp.asarray(images, jnp.float64))
    _check(heads64, decoded64, reference64, scale=scale, tolerance=FLOAT64_TOLERANCE)
    stats64 = jax.tree.map(np.asarray, stats64)
  state64 = {k: v.double() for k, v in upstream64.state_dict().items()}
  after64 = convert.state_dict_from_variables({'batch_stats': stats64}, buffers={})
  for key, value in after64.items():
    if key.endswith(('running_mean', 'running_var')):
      np.testing.assert_allclose(value, state64[key].numpy(), rtol=1e-6, err_msg=key)


@pytest.mark.parametrize('name', ['w6', 'e6'])
@pytest.mark.parametrize(('depth', 'width'), [(0.33, 0.25), (0.5, 0.5)])
def test_multipliers_give_upstream_parameter_counts(name, depth, width):
  config = {**upstream_config(name), 'depth_multiple': depth, 'width_multiple': width, 'nc': 3}
  upstream = Model(copy.deepcopy(config))
  model = yolo.build_model(config)
  shapes = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros((1, 128, 128, 3)), train=True)
  )
  count = sum(leaf.size for leaf in jax.tree.leaves(shapes['params']))
  assert count == sum(p.numel() for p in upstream.parameters())
  assert set(
    convert.export_state_dict(model, jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes))
  ) == set(upstream.state_dict())


def test_init_in_eval_mode_creates_every_variable():
  model = yolo.p6_nano(num_classes=2)
  images = jnp.zeros((1, 128, 128, 3))
  init = jax.jit(model.init, static_argnames='train')
  train_vars = jax.eval_shape(lambda: init(jax.random.key(0), images, train=True))
  eval_vars = jax.eval_shape(lambda: init(jax.random.key(0), images, train=False))
  assert jax.tree.structure(train_vars) == jax.tree.structure(eval_vars)


def _random_variables(model: yolo.YOLO, *, seed: int) -> dict:
  """Variables of the model's shapes filled with NumPy noise (no compiled ``init``)."""
  shapes = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros((1, 128, 128, 3)), train=True)
  )
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == 'var':
      return jnp.asarray(rng.uniform(0.5, 2.0, leaf.shape), jnp.float32)
    base = 1.0 if name in ('scale', 'implicit') and 'ia_' not in str(path) else 0.0
    spread = 0.3 if name != 'kernel' else 1 / np.sqrt(np.prod(leaf.shape[:-1]))
    return jnp.asarray(base + spread * rng.standard_normal(leaf.shape), jnp.float32)

  return jax.tree.map_with_path(fill, shapes)


def test_fuse_keeps_evaluation_outputs():
  model = yolo.p6_nano(num_classes=3)
  variables = _random_variables(model, seed=0)
  images = jax.random.uniform(jax.random.key(1), (2, 128, 192, 3))
  fused_model, fused_variables = yolo.fuse(model, variables)
  head = f'model_{model.head.index}'
  assert not any(name.startswith(('ia_', 'im_')) for name in fused_variables['params'][head])
  plain = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
  fused = jax.jit(lambda v, x: fused_model.apply(v, x, train=False))(fused_variables, images)
  scale = _decoded_scale(model, 128, 192)
  np.testing.assert_allclose(np.asarray(fused) / scale, np.asarray(plain) / scale, atol=1e-5)
  with pytest.raises(ValueError, match='unfused'):
    convert.export_state_dict(fused_model, fused_variables)


def _rows(config: dict, index: int, row: list) -> dict:
  layers = [*config['backbone'], *config['head']]
  layers[index] = row
  split = len(config['backbone'])
  return {**config, 'backbone': layers[:split], 'head': layers[split:]}


@pytest.mark.parametrize(
  ('index', 'row', 'message'),
  [
    (3, [-1, 1, 'RepConv', [64, 3, 1]], r"layer 3 .*'RepConv' is not supported"),
    (3, [-9, 1, 'Conv', [64, 1, 1]], r'layer 3 .*from -9 does not name an earlier layer'),
    (3, [-1, 2, 'Conv', [64, 1, 1]], r'layer 3 .*repeated modules'),
    (3, [-1, 1, 'Conv', [64, 3, 1, None, 1, 'nn.ReLU()']], r'layer 3 .*activation'),
    (4, [-1, 1, 'nn.Upsample', [None, 2, 'bilinear']], r'layer 4 .*nearest'),
    (7, [[-1, -2], 1, 'Concat', [0]], r'layer 7 .*dimension 1'),
    (16, [[-1, -8], 1, 'Shortcut', [1]], r'layer 16 .*equal channels'),
  ],
)
def test_bad_layers_are_named(index, row, message):
  config = _rows(model_yaml.load_config(yolo.NANO_CONFIG), index, row)
  with pytest.raises(ValueError, match=message):
    yolo.build_model(config)


def test_bad_anchors_and_images_are_reported():
  config = model_yaml.load_config(yolo.NANO_CONFIG)
  with pytest.raises(ValueError, match='reverse the anchor list'):
    yolo.build_model(config, anchors=config['anchors'][::-1])
  with pytest.raises(ValueError, match='flat'):
    yolo.build_model(config, anchors=[[10, 13, 16]] * 4)
  model = yolo.build_model(config)
  with pytest.raises(ValueError, match='multiples of 64'):
    model.init(jax.random.key(0), jnp.zeros((1, 96, 128, 3)), train=True)
  with pytest.raises(ValueError, match='NHWC'):
    model.init(jax.random.key(0), jnp.zeros((1, 3, 128, 128)), train=True)


@pytest.mark.parametrize('jit', [False, True])
def test_unit_images_are_upstreams_inputs_to_the_bit(jit):
  """Every byte value becomes upstream's ``x.float() / 255``, also where XLA's division does not."""
  values = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
  convert_fn = jax.jit(yolo.unit_images) if jit else yolo.unit_images
  got = np.asarray(convert_fn(values))
  want = (torch.from_numpy(values).float() / 255.0).numpy()
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, want)
  divided = np.asarray(jax.jit(lambda v: v.astype(jnp.float32) / 255.0)(values))
  print(f'XLA division differs from upstream on {(divided != want).sum()} of 256 values')
  with pytest.raises(ValueError, match='uint8'):
    yolo.unit_images(values.astype(np.int32))
