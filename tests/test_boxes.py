"""Box formats, pairwise IoU and CIoU against upstream's general utilities."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from sas_yolov7.utils.general import bbox_iou, box_iou, xywh2xyxy

from reorg_jax import boxes


def _random_cxcywh(rng, n, scale=100.0):
  xy = rng.uniform(0, scale, size=(n, 2))
  wh = np.exp(rng.uniform(np.log(0.5), np.log(scale), size=(n, 2)))
  return np.concatenate([xy, wh], axis=1).astype(np.float32)


def test_format_round_trip_and_upstream_conversion():
  b = _random_cxcywh(np.random.default_rng(0), 50)
  xyxy = boxes.cxcywh_to_xyxy(jnp.asarray(b))
  np.testing.assert_array_equal(xyxy, xywh2xyxy(torch.from_numpy(b)).numpy())
  np.testing.assert_allclose(boxes.xyxy_to_cxcywh(xyxy), b, rtol=1e-5, atol=1e-4)


def test_pairwise_iou_equals_upstream():
  rng = np.random.default_rng(1)
  a = xywh2xyxy(torch.from_numpy(_random_cxcywh(rng, 7))).numpy()
  b = xywh2xyxy(torch.from_numpy(_random_cxcywh(rng, 11))).numpy()
  expected = box_iou(torch.from_numpy(a), torch.from_numpy(b)).numpy()
  got = boxes.iou_xyxy(jnp.asarray(a), jnp.asarray(b))
  assert got.shape == (7, 11)
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
  elementwise = boxes.iou_xyxy(jnp.asarray(a), jnp.asarray(a), all_pairs=False)
  np.testing.assert_allclose(elementwise, np.ones(7), rtol=1e-6)


def test_ciou_value_and_gradient_equal_upstream():
  rng = np.random.default_rng(2)
  pred = _random_cxcywh(rng, 64, scale=20.0)
  target = pred + rng.normal(0, 2.0, size=pred.shape).astype(np.float32)
  target[:, 2:] = np.abs(target[:, 2:]) + 0.1
  pred_t = torch.from_numpy(pred).requires_grad_(True)
  expected = bbox_iou(pred_t.T, torch.from_numpy(target), x1y1x2y2=False, CIoU=True)
  expected.sum().backward()
  value, grad = jax.value_and_grad(lambda p: boxes.ciou_cxcywh(p, jnp.asarray(target)).sum())(
    jnp.asarray(pred)
  )
  np.testing.assert_allclose(
    boxes.ciou_cxcywh(jnp.asarray(pred), jnp.asarray(target)),
    expected.detach().numpy(),
    rtol=1e-5,
    atol=1e-6,
  )
  np.testing.assert_allclose(value, expected.sum().item(), rtol=1e-5)
  np.testing.assert_allclose(grad, pred_t.grad.numpy(), rtol=1e-4, atol=1e-6)


def test_ciou_alpha_carries_no_gradient():
  """With alpha differentiated the gradient would change; upstream holds it constant."""
  pred = jnp.asarray([[5.0, 5.0, 4.0, 9.0]])
  target = jnp.asarray([[6.0, 4.0, 8.0, 3.0]])
  grad = jax.grad(lambda p: boxes.ciou_cxcywh(p, target).sum())(pred)

  def ciou_alpha_differentiated(p):
    with jax.disable_jit():
      original = jax.lax.stop_gradient
      try:
        jax.lax.stop_gradient = lambda x: x
        return boxes.ciou_cxcywh(p, target).sum()
      finally:
        jax.lax.stop_gradient = original

  other = jax.grad(ciou_alpha_differentiated)(pred)
  assert not np.allclose(grad, other)


@pytest.mark.parametrize('box', [[1.0, 1.0, 2.0, 2.0], [0.0, 0.0, 0.0, 0.0]])
def test_ciou_of_identical_boxes(box):
  b = jnp.asarray([box])
  value = boxes.ciou_cxcywh(b, b)
  assert np.isfinite(value).all()
  if box[2] > 0:
    np.testing.assert_allclose(value, [1.0], atol=1e-6)


# One box per format, the same box: centre (5, 4), size 4 x 2.
CXCYWH = [5.0, 4.0, 4.0, 2.0]
XYXY = [3.0, 3.0, 7.0, 5.0]
XYWH = [3.0, 3.0, 4.0, 2.0]
CONVERSIONS = [
  ('cxcywh_to_xyxy', CXCYWH, XYXY),
  ('xyxy_to_cxcywh', XYXY, CXCYWH),
  ('xyxy_to_xywh', XYXY, XYWH),
  ('xywh_to_xyxy', XYWH, XYXY),
  ('cxcywh_to_xywh', CXCYWH, XYWH),
  ('xywh_to_cxcywh', XYWH, CXCYWH),
]


def _is_backend_array(array, xp):
  return isinstance(array, np.ndarray) if xp is np else isinstance(array, jax.Array)


@pytest.mark.parametrize('xp', [np, jnp])
@pytest.mark.parametrize(('name', 'given', 'expected'), CONVERSIONS)
def test_conversions_known_values(xp, name, given, expected):
  got = getattr(boxes, name)(xp.asarray([given, given], xp.float32), xp=xp)
  assert _is_backend_array(got, xp) and got.shape == (2, 4) and got.dtype == np.float32
  np.testing.assert_array_equal(np.asarray(got), [expected, expected])


ROUND_TRIPS = [
  ('cxcywh_to_xyxy', 'xyxy_to_cxcywh'),
  ('xyxy_to_xywh', 'xywh_to_xyxy'),
  ('cxcywh_to_xywh', 'xywh_to_cxcywh'),
]


@pytest.mark.parametrize('xp', [np, jnp])
@pytest.mark.parametrize(('there', 'back'), ROUND_TRIPS)
def test_conversions_round_trip(xp, there, back):
  b = xp.asarray(_random_cxcywh(np.random.default_rng(3), 40).reshape(2, 20, 4))
  if there.startswith('xyxy'):
    b = boxes.cxcywh_to_xyxy(b, xp=xp)
  out = getattr(boxes, back)(getattr(boxes, there)(b, xp=xp), xp=xp)
  assert out.shape == (2, 20, 4)
  np.testing.assert_allclose(np.asarray(out), np.asarray(b), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize('xp', [np, jnp])
def test_normalized_pixel_round_trip_and_known_values(xp):
  b = xp.asarray([[0.5, 0.25, 0.2, 0.1], [0.1, 0.9, 0.05, 0.2]], xp.float32)
  pixels = boxes.normalized_cxcywh_to_pixel_xyxy(
    b, width=200, height=100, offset_x=10, offset_y=5, xp=xp
  )
  assert _is_backend_array(pixels, xp) and pixels.dtype == np.float32
  np.testing.assert_allclose(np.asarray(pixels[0]), [90, 25, 130, 35])
  shifted = boxes.scale_xyxy(pixels, sx=1, sy=1, dx=-10, dy=-5, xp=xp)
  back = boxes.pixel_xyxy_to_normalized_cxcywh(shifted, width=200, height=100, xp=xp)
  np.testing.assert_allclose(np.asarray(back), np.asarray(b), atol=1e-6)
  xywh = boxes.normalized_cxcywh_to_pixel_xywh(b, width=200, height=100, xp=xp)
  np.testing.assert_allclose(np.asarray(xywh[0]), [80, 20, 40, 10])


@pytest.mark.parametrize('xp', [np, jnp])
def test_integer_pixel_corners_normalise_to_floats(xp):
  got = boxes.pixel_xyxy_to_normalized_cxcywh(xp.asarray([2, 4, 6, 12]), width=8, height=16, xp=xp)
  np.testing.assert_array_equal(np.asarray(got), [0.5, 0.5, 0.5, 0.5])


@pytest.mark.parametrize('xp', [np, jnp])
def test_clip_polygon_and_area_known_values(xp):
  b = xp.asarray([[-5.0, 2.0, 30.0, 12.0], [1.0, -1.0, 4.0, 50.0]], xp.float32)
  clipped = boxes.clip_xyxy(b, width=20, height=10, xp=xp)
  np.testing.assert_array_equal(np.asarray(clipped), [[0, 2, 20, 10], [1, 0, 4, 10]])
  np.testing.assert_array_equal(np.asarray(boxes.box_area_xyxy(clipped)), [160, 30])
  polygon = boxes.xyxy_to_polygon(xp.asarray(XYXY), xp=xp)
  np.testing.assert_array_equal(np.asarray(polygon), [[3, 3], [7, 3], [7, 5], [3, 5]])
  assert boxes.xyxy_to_polygon(b, xp=xp).shape == (2, 4, 2)


@pytest.mark.parametrize('xp', [np, jnp])
def test_iou_and_ioa_known_values(xp):
  a = xp.asarray([[0.0, 0.0, 2.0, 2.0]])
  b = xp.asarray([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [5.0, 5.0, 6.0, 9.0]])
  iou = boxes.iou_xyxy(a, b, xp=xp)
  assert iou.shape == (1, 3)
  np.testing.assert_allclose(np.asarray(iou), [[1 / 7, 1, 0]], rtol=1e-6)
  ioa = boxes.ioa_xyxy(a[0], b, xp=xp)  # How much of each of b the box a covers.
  np.testing.assert_allclose(np.asarray(ioa), [1 / 4, 1, 0], rtol=1e-6)
  empty = xp.asarray([[1.0, 1.0, 1.0, 1.0]])
  assert np.asarray(boxes.ioa_xyxy(a[0], empty, xp=xp)) == 0  # eps: no NaN.


def _every_function(xp, b):
  """Each box function of ``b`` (``[..., 4]`` centre/size, positive sizes), by name."""
  xyxy = boxes.cxcywh_to_xyxy(b, xp=xp)
  return {
    'cxcywh_to_xyxy': xyxy,
    'xyxy_to_cxcywh': boxes.xyxy_to_cxcywh(xyxy, xp=xp),
    'xyxy_to_xywh': boxes.xyxy_to_xywh(xyxy, xp=xp),
    'xywh_to_xyxy': boxes.xywh_to_xyxy(b, xp=xp),
    'cxcywh_to_xywh': boxes.cxcywh_to_xywh(b, xp=xp),
    'xywh_to_cxcywh': boxes.xywh_to_cxcywh(b, xp=xp),
    'scale_xyxy': boxes.scale_xyxy(xyxy, sx=0.3, sy=1.7, dx=5, dy=-2.5, xp=xp),
    'normalized_to_pixel_xyxy': boxes.normalized_cxcywh_to_pixel_xyxy(
      b / 100, width=640, height=480, offset_x=-3, offset_y=7, xp=xp
    ),
    'pixel_xyxy_to_normalized': boxes.pixel_xyxy_to_normalized_cxcywh(
      xyxy, width=640, height=480, xp=xp
    ),
    'normalized_to_pixel_xywh': boxes.normalized_cxcywh_to_pixel_xywh(
      b / 100, width=640, height=480, xp=xp
    ),
    'clip_xyxy': boxes.clip_xyxy(xyxy, width=60, height=40, xp=xp),
    'xyxy_to_polygon': boxes.xyxy_to_polygon(xyxy, xp=xp),
    'box_area_xyxy': boxes.box_area_xyxy(xyxy),
    'iou_xyxy': boxes.iou_xyxy(xyxy, xyxy[..., ::-1, :], xp=xp),
    'iou_xyxy_elementwise': boxes.iou_xyxy(xyxy, xyxy[..., ::-1, :], all_pairs=False, xp=xp),
    'ioa_xyxy': boxes.ioa_xyxy(xyxy[..., :1, :], xyxy, xp=xp),
  }


def test_numpy_and_jnp_backends_agree():
  b = _random_cxcywh(np.random.default_rng(4), 60).reshape(3, 20, 4)
  ours, theirs = _every_function(np, b), _every_function(jnp, jnp.asarray(b))
  for name, value in ours.items():
    assert isinstance(value, np.ndarray) and isinstance(theirs[name], jax.Array), name
    assert value.shape == theirs[name].shape and value.dtype == theirs[name].dtype, name
    np.testing.assert_allclose(value, theirs[name], rtol=1e-6, atol=1e-5, err_msg=name)


def test_numpy_backend_does_the_hand_written_arithmetic():
  """In NumPy the functions do the data code's own float32 operations, bit for bit."""
  labels = np.random.default_rng(5).uniform(0, 1, (50, 4)).astype(np.float32)
  cx, cy, w, h = labels.T
  got = boxes.normalized_cxcywh_to_pixel_xyxy(
    labels, width=81, height=37.5, offset_x=3, offset_y=0.25, xp=np
  )
  expected = [(cx - w / 2) * 81 + 3, (cy - h / 2) * 37.5 + 0.25]
  expected += [(cx + w / 2) * 81 + 3, (cy + h / 2) * 37.5 + 0.25]
  np.testing.assert_array_equal(got, np.stack(expected, axis=1))
  x1, y1, x2, y2 = got.T
  back = boxes.pixel_xyxy_to_normalized_cxcywh(got, width=81, height=37.5, xp=np)
  expected = [(x1 + x2) / 2 / 81, (y1 + y2) / 2 / 37.5, (x2 - x1) / 81, (y2 - y1) / 37.5]
  np.testing.assert_array_equal(back, np.stack(expected, axis=1))
  assert got.dtype == back.dtype == np.float32
