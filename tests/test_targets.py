"""Packing upstream's flat label rows into padded, masked targets."""

import numpy as np
import pytest

import reorg_jax

ROWS = np.asarray(
  [
    [1, 3, 0.5, 0.5, 0.2, 0.1],
    [0, 0, 0.1, 0.2, 0.05, 0.05],
    [1, 2, 0.9, 0.9, 0.1, 0.3],
    [0, 1, 0.0, 1.0, 0.0, 0.4],
  ],
  np.float32,
)


def test_packs_in_row_order_with_mask():
  t = reorg_jax.Targets.from_yolo(ROWS, 3, 4, num_classes=5)
  assert t.boxes.shape == (3, 4, 4) and t.classes.dtype == np.int32 and t.valid.dtype == bool
  np.testing.assert_array_equal(t.valid.sum(axis=1), [2, 2, 0])
  np.testing.assert_array_equal(t.classes[0, :2], [0, 1])
  np.testing.assert_array_equal(t.classes[1, :2], [3, 2])
  np.testing.assert_allclose(t.boxes[1, 1], ROWS[2, 2:])
  back = t.to_yolo()
  order = np.argsort(ROWS[:, 0], kind='stable')
  np.testing.assert_array_equal(back, ROWS[order])


def test_empty_labels():
  t = reorg_jax.Targets.from_yolo(np.zeros((0, 6)), 2, 3, num_classes=1)
  assert not t.valid.any()
  assert t.to_yolo().shape == (0, 6)


@pytest.mark.parametrize(
  ('row', 'message'),
  [
    ([5, 0, 0.5, 0.5, 0.1, 0.1], r'image index outside \[0, 3\)'),
    ([-1, 0, 0.5, 0.5, 0.1, 0.1], 'image index outside'),
    ([0.5, 0, 0.5, 0.5, 0.1, 0.1], 'non-integer image index'),
    ([0, 5, 0.5, 0.5, 0.1, 0.1], r'class outside \[0, 5\)'),
    ([0, -1, 0.5, 0.5, 0.1, 0.1], 'class outside'),
    ([0, 1.5, 0.5, 0.5, 0.1, 0.1], 'non-integer class'),
    ([0, 0, np.nan, 0.5, 0.1, 0.1], 'NaN or inf'),
    ([0, 0, 0.5, np.inf, 0.1, 0.1], 'NaN or inf'),
    ([0, 0, 0.5, 0.5, -0.1, 0.1], 'negative width or height'),
    ([0, 0, 1.7, 0.5, 0.1, 0.1], 'centre outside'),
    ([0, 0, 0.5, -0.3, 0.1, 0.1], 'centre outside'),
    ([0, 0, 0.5, 0.5, 0.1, 2.5], 'width or height above'),
  ],
)
def test_rejects_bad_rows_naming_them(row, message):
  labels = np.concatenate([ROWS, np.asarray([row], np.float32)])
  with pytest.raises(ValueError, match=message) as info:
    reorg_jax.Targets.from_yolo(labels, 3, 8, num_classes=5)
  assert 'rows 4' in str(info.value)


def test_too_many_boxes_names_image_and_count():
  labels = np.asarray([[2, 0, 0.5, 0.5, 0.1, 0.1]] * 5 + [[0, 0, 0.5, 0.5, 0.1, 0.1]], np.float32)
  with pytest.raises(ValueError, match='image 2: 5 boxes') as info:
    reorg_jax.Targets.from_yolo(labels, 3, 4, num_classes=1)
  assert 'max_boxes=4' in str(info.value)


def test_wrong_shape():
  with pytest.raises(ValueError, match=r'\[N, 6\]'):
    reorg_jax.Targets.from_yolo(np.zeros((3, 5)), 1, 4, num_classes=1)
