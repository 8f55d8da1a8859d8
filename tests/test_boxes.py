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
