"""Detection selection against the original ``non_max_suppression``, and the jitted ``predict``.

The original calls ``torchvision.ops.nms``, which the test environment only
has as a stand-in; the tests install a plain greedy suppression in its place
(keep the best remaining box, drop every box whose IoU with it exceeds the
threshold), which is the documented behaviour of that function.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from sas_yolov7.utils.general import box_iou, non_max_suppression

from reorg_jax.models import inference, yolo


def _greedy_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
  order = torch.argsort(scores, descending=True)
  overlaps = box_iou(boxes, boxes) > iou_threshold
  suppressed = torch.zeros(len(boxes), dtype=torch.bool)
  kept = []
  for index in order.tolist():
    if suppressed[index]:
      continue
    kept.append(index)
    suppressed |= overlaps[index]
  return torch.tensor(kept, dtype=torch.long)


@pytest.fixture
def upstream_nms(monkeypatch):
  monkeypatch.setattr(sys.modules['torchvision'].ops, 'nms', _greedy_nms, raising=False)
  return non_max_suppression


def _decoded(*, batch: int, boxes: int, num_classes: int, seed: int) -> np.ndarray:
  """``[B, N, 5 + C]`` boxes in clusters (so suppression has work), random scores."""
  rng = np.random.default_rng(seed)
  centres = rng.uniform(50, 590, (batch, 12, 2))
  cluster = rng.integers(0, 12, (batch, boxes))
  xy = np.take_along_axis(centres, cluster[..., None], axis=1) + rng.normal(0, 8, (batch, boxes, 2))
  wh = rng.uniform(20, 120, (batch, boxes, 2))
  objectness = rng.uniform(0, 1, (batch, boxes, 1))
  classes = rng.uniform(0, 1, (batch, boxes, num_classes))
  return np.concatenate([xy, wh, objectness, classes], axis=-1).astype(np.float32)


def _select(decoded, **kwargs):
  settings = {'max_candidates': decoded.shape[1], 'class_agnostic': False, **kwargs}
  return jax.jit(
    lambda d, s, i: inference.select_detections(d, score_threshold=s, iou_threshold=i, **settings)
  )


@pytest.mark.parametrize(
  ('num_classes', 'agnostic', 'score', 'iou', 'max_detections'),
  [
    (4, False, 0.25, 0.45, 300),
    (4, True, 0.25, 0.45, 300),
    (1, False, 0.3, 0.6, 300),
    (3, False, 0.1, 0.5, 7),
  ],
)
def test_selection_matches_upstream(
  upstream_nms, num_classes, agnostic, score, iou, max_detections
):
  decoded = _decoded(batch=3, boxes=600, num_classes=num_classes, seed=num_classes)
  select = _select(decoded, max_detections=max_detections, class_agnostic=agnostic)
  got = jax.tree.map(np.asarray, select(decoded, score, iou))
  wanted = upstream_nms(torch.from_numpy(decoded.copy()), score, iou, agnostic=agnostic)
  for image, rows in enumerate(wanted):
    rows = rows[:max_detections].numpy()
    count = len(rows)
    assert count > 0
    assert got.valid[image].sum() == count
    assert got.valid[image, :count].all()
    np.testing.assert_allclose(got.boxes[image, :count], rows[:, :4], atol=1e-4)
    np.testing.assert_allclose(got.scores[image, :count], rows[:, 4], rtol=1e-6)
    np.testing.assert_array_equal(got.classes[image, :count], rows[:, 5].astype(np.int32))
    assert (got.classes[image, count:] == -1).all() and (got.scores[image, count:] == 0).all()


def test_candidate_count_reports_a_short_candidate_budget():
  decoded = _decoded(batch=2, boxes=400, num_classes=2, seed=5)
  select = _select(decoded, max_detections=10, max_candidates=20)
  got = select(decoded, 0.05, 0.45)
  passed = (decoded[..., 4] > 0.05) & ((decoded[..., 5:] * decoded[..., 4:5]).max(-1) > 0.05)
  np.testing.assert_array_equal(np.asarray(got.num_candidates), passed.sum(-1))
  assert (np.asarray(got.num_candidates) > 20).all()


def test_selection_rejects_bad_sizes():
  decoded = jnp.zeros((1, 50, 7))
  with pytest.raises(ValueError, match='max_detections'):
    inference.select_detections(
      decoded,
      max_detections=60,
      max_candidates=50,
      score_threshold=0.1,
      iou_threshold=0.5,
      class_agnostic=False,
    )
  with pytest.raises(ValueError, match=r'\[B, N, 5 \+ C\]'):
    inference.select_detections(
      decoded[0],
      max_detections=5,
      max_candidates=50,
      score_threshold=0.1,
      iou_threshold=0.5,
      class_agnostic=False,
    )


def test_predict_is_the_model_then_the_selection():
  model = yolo.p6_nano(num_classes=3)
  shapes = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros((1, 128, 128, 3)), train=True)
  )
  rng = np.random.default_rng(0)
  variables = jax.tree.map(
    lambda s: jnp.asarray(
      rng.uniform(0.5, 1.5, s.shape) if len(s.shape) == 1 else 0.1 * rng.standard_normal(s.shape),
      jnp.float32,
    ),
    shapes,
  )
  images = jax.random.uniform(jax.random.key(1), (2, 128, 192, 3))
  got = inference.predict(model, variables, images, max_detections=20, score_threshold=0.3)
  assert got.boxes.shape == (2, 20, 4) and got.classes.dtype == jnp.int32
  decoded = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
  wanted = _select(decoded, max_detections=20, max_candidates=1024)(decoded, 0.3, 0.45)
  assert int(got.valid.sum()) > 0
  for name in inference.Detections._fields:
    np.testing.assert_allclose(
      np.asarray(getattr(got, name), np.float64),
      np.asarray(getattr(wanted, name), np.float64),
      rtol=1e-5,
      atol=1e-3,
      err_msg=name,
    )
