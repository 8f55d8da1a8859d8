"""The model's convolutions (matrix products, gradients by kernel tap) against XLA's own.

:func:`reorg_jax.models.convolution.conv_nhwc` must be
``lax.conv_general_dilated`` with other operations: the same outputs and the
same gradients by input and by kernel, to float rounding, on shapes chosen to
break index arithmetic (odd sides, strides that do not divide them, one-sided
and wide padding, one-pixel outputs, kernels wider than the input, a single
channel), in float64, float32 and bfloat16, under ``jit`` and not; and the
small model's gradients in training mode must not move. The tap gradients are
XLA:CPU's: a step lowered for a GPU or TPU keeps XLA's convolution gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reorg_jax.models import convolution, detect, layers, yolo
from reorg_jax.models.convolution import conv_nhwc, reference_conv, weight_gradient_by_taps

# (input [B, H, W, I], kernel [k, k, I, O] sides, strides, padding)
CASES = [
  ((2, 7, 5, 3), (3, 3, 3, 4), (1, 1), ((1, 1), (1, 1))),
  ((2, 7, 5, 3), (3, 3, 3, 4), (2, 2), ((1, 1), (1, 1))),
  ((1, 9, 8, 2), (3, 3, 2, 5), (2, 3), ((0, 2), (1, 0))),  # uneven strides and padding
  ((3, 4, 4, 1), (5, 5, 1, 2), (1, 1), ((2, 2), (2, 2))),  # kernel wider than the input's half
  ((1, 3, 3, 4), (3, 3, 4, 3), (3, 3), ((0, 0), (0, 0))),  # one output pixel
  ((2, 6, 6, 5), (1, 1, 5, 7), (1, 1), ((0, 0), (0, 0))),  # the matrix-product path
  ((2, 6, 6, 5), (1, 1, 5, 7), (2, 2), ((0, 0), (0, 0))),  # 1x1 strided: a convolution
  ((2, 5, 5, 3), (1, 1, 3, 2), (1, 1), ((1, 1), (1, 1))),  # 1x1 padded: a convolution
  ((1, 6, 7, 2), (4, 2, 2, 3), (1, 2), ((2, 1), (0, 1))),  # non-square kernel
]


def _random(shape, dtype, seed):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _outputs_and_gradients(conv, x, kernel, strides, padding, cotangent):
  def apply(x, kernel):
    return conv(x, kernel, strides, padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  out, vjp = jax.vjp(apply, x, kernel)
  return (out, *vjp(cotangent))


def _lax(x, kernel, strides, padding, dimension_numbers):
  return jax.lax.conv_general_dilated(
    x, kernel, strides, padding, dimension_numbers=dimension_numbers
  )


@pytest.fixture(autouse=True, scope='module')
def _x64():
  with jax.enable_x64(True):
    yield


@pytest.mark.parametrize(
  'dtype,tolerance', [('float64', 1e-12), ('float32', 2e-5), ('bfloat16', 3e-2)]
)
@pytest.mark.parametrize('jitted', [False, True], ids=['eager', 'jit'])
@pytest.mark.parametrize('case', CASES, ids=[str(i) for i in range(len(CASES))])
@pytest.mark.parametrize('force_taps', [False, True], ids=['rule', 'taps'])
def test_values_and_gradients_equal_xla(case, dtype, tolerance, jitted, force_taps, monkeypatch):
  if force_taps:  # every k x k convolution through the tap gradient, whatever its channels
    monkeypatch.setattr(convolution, 'weight_gradient_by_taps_wins', lambda **_: True)
  x_shape, kernel_shape, strides, padding = case
  x = _random(x_shape, dtype, 0)
  kernel = _random(kernel_shape, dtype, 1)
  expected_out = _lax(x, kernel, strides, padding, ('NHWC', 'HWIO', 'NHWC'))
  cotangent = _random(expected_out.shape, dtype, 2)

  def both(x, kernel, cotangent):
    ours = _outputs_and_gradients(conv_nhwc, x, kernel, strides, padding, cotangent)
    xla = _outputs_and_gradients(_lax, x, kernel, strides, padding, cotangent)
    return ours, xla

  run = jax.jit(both) if jitted else both
  ours, xla = run(x, kernel, cotangent)
  for name, got, want in zip(('output', 'by input', 'by kernel'), ours, xla, strict=True):
    assert got.shape == want.shape and got.dtype == want.dtype, name
    scale = float(jnp.max(jnp.abs(want))) or 1.0
    error = float(jnp.max(jnp.abs(got - want))) / scale
    assert error < tolerance, f'{name}: relative error {error:.2e}'


def test_tap_gradient_is_the_kernel_gradient_of_a_direct_sum():
  """The taps against the definition, summed in NumPy float64 (no XLA convolution)."""
  x = np.random.default_rng(3).standard_normal((2, 7, 6, 3))
  strides, padding, k = (2, 3), ((1, 0), (2, 1)), (3, 2)
  padded = np.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
  out_h = (padded.shape[1] - k[0]) // strides[0] + 1
  out_w = (padded.shape[2] - k[1]) // strides[1] + 1
  g = np.random.default_rng(4).standard_normal((2, out_h, out_w, 5))
  want = np.zeros((*k, 3, 5))
  for i in range(k[0]):
    for j in range(k[1]):
      for y in range(out_h):
        for z in range(out_w):
          row = padded[:, y * strides[0] + i, z * strides[1] + j]  # [B, I]
          want[i, j] += row.T @ g[:, y, z]
  got = weight_gradient_by_taps(
    jnp.asarray(x), jnp.asarray(g), kernel_size=k, strides=strides, padding=padding
  )
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-12)


def test_other_calls_pass_through_unchanged():
  """Grouped and dilated convolutions and other layouts are lax's, bit for bit."""
  x = _random((2, 8, 8, 4), 'float32', 5)
  grouped = _random((3, 3, 2, 6), 'float32', 6)
  nhwc = ('NHWC', 'HWIO', 'NHWC')
  pads = ((1, 1), (1, 1))
  cases = [
    (x, grouped, {'dimension_numbers': nhwc, 'feature_group_count': 2}),
    (x, _random((3, 3, 4, 6), 'float32', 7), {'dimension_numbers': nhwc, 'rhs_dilation': (2, 2)}),
    (jnp.moveaxis(x, 3, 1), _random((6, 4, 3, 3), 'float32', 8), {}),  # NCHW / OIHW
  ]
  for lhs, rhs, kwargs in cases:
    got = conv_nhwc(lhs, rhs, (1, 1), pads, **kwargs)
    want = jax.lax.conv_general_dilated(lhs, rhs, (1, 1), pads, **kwargs)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize(
  'platform,loops,convolutions', [('cpu', 2, 0), ('cuda', 0, 2), ('tpu', 0, 2)]
)
def test_each_platform_compiles_only_its_own_gradients(platform, loops, convolutions):
  """The CPU's step holds the two tap loops and no convolution gradient; the others the reverse."""
  x = _random((1, 8, 8, 4), 'float32', 12)
  kernel = _random((3, 3, 4, 5), 'float32', 13)

  def loss(x, kernel):  # strided: both gradients by taps on the CPU; the forward is unused
    return conv_nhwc(
      x, kernel, (2, 2), ((1, 1), (1, 1)), dimension_numbers=('NHWC', 'HWIO', 'NHWC')
    ).sum()

  traced = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(x, kernel)
  text = traced.lower(lowering_platforms=(platform,)).as_text()
  assert text.count('stablehlo.while') == loops
  assert text.count('stablehlo.convolution') == convolutions


@pytest.mark.parametrize('gradients', [convolution.gradients_by_taps, convolution.xla_gradients])
@pytest.mark.parametrize('case', CASES[:5] + CASES[8:], ids=[str(i) for i in (0, 1, 2, 3, 4, 8)])
def test_both_platforms_gradients_are_xlas(case, gradients):
  """The CPU branch and the other platforms' branch, called directly, in float64."""
  x_shape, kernel_shape, strides, padding = case
  x, kernel = _random(x_shape, 'float64', 14), _random(kernel_shape, 'float64', 15)
  out, vjp = jax.vjp(lambda x, k: reference_conv(x, k, strides=strides, padding=padding), x, kernel)
  cotangent = _random(out.shape, 'float64', 16)
  got = gradients(x, kernel, cotangent, strides=strides, padding=padding)
  for name, g, w in zip(('by input', 'by kernel'), got, vjp(cotangent), strict=True):
    assert g.shape == w.shape and g.dtype == w.dtype, name
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-12, atol=1e-12, err_msg=name)


def test_rule_takes_taps_for_strided_and_wide_convolutions():
  wins = convolution.weight_gradient_by_taps_wins
  assert wins(in_features=16, out_features=16, strides=(2, 2))
  assert wins(in_features=128, out_features=256, strides=(1, 1))
  assert not wins(in_features=128, out_features=128, strides=(1, 1))


def test_model_gradients_do_not_move(monkeypatch):
  """The small model's training-mode gradients, with our convolutions and with lax's."""
  model = yolo.p6_nano(num_classes=3)
  images = _random((2, 64, 64, 3), 'float64', 9)
  variables = jax.tree.map(
    lambda v: v.astype(jnp.float64), model.init(jax.random.key(0), images, train=True)
  )

  def loss(params):
    outputs, _ = model.apply(
      {**variables, 'params': params}, images, train=True, mutable=['batch_stats']
    )
    return sum(jnp.sum(jnp.sin(o)) for o in jax.tree.leaves(outputs))

  ours = jax.jit(jax.grad(loss))(variables['params'])
  monkeypatch.setattr(layers, 'conv_nhwc', jax.lax.conv_general_dilated)
  monkeypatch.setattr(detect, 'conv_nhwc', jax.lax.conv_general_dilated)
  xla = jax.jit(jax.grad(loss))(variables['params'])
  # Training-mode batch normalisation over 2 images of the deepest maps (1 x 1 at 64 px)
  # amplifies float64 rounding: sums in another order differ by up to about 4e-10 of a
  # leaf's largest entry (measured, with this loss and a linear one). A wrong tap moves a
  # leaf by the size of its entries; one float32 rounding on the way by about 6e-8.
  for path, got in jax.tree_util.tree_leaves_with_path(ours):
    want = _leaf(xla, path)
    scale = float(jnp.max(jnp.abs(want))) or 1.0
    assert float(jnp.max(jnp.abs(got - want))) / scale < 1e-8, jax.tree_util.keystr(path)


def _leaf(tree, path):
  for key in path:
    tree = tree[key.key]
  return tree


def test_reference_conv_is_lax():
  x = _random((1, 5, 5, 2), 'float32', 10)
  kernel = _random((3, 3, 2, 2), 'float32', 11)
  pads = ((1, 1), (1, 1))
  np.testing.assert_array_equal(
    np.asarray(reference_conv(x, kernel, strides=(1, 1), padding=pads)),
    np.asarray(_lax(x, kernel, (1, 1), pads, ('NHWC', 'HWIO', 'NHWC'))),
  )
