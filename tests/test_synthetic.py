"""The built-in synthetic dataset: determinism, exact labels, the written layout."""

import cv2
import numpy as np
import pytest
import yaml

from reorg_jax.data import augment, synthetic


def _chroma(image):
  """``[H, W]`` bool: strongly coloured pixels (shapes; backgrounds are greyish)."""
  wide = image.astype(np.int16)
  return wide.max(axis=-1) - wide.min(axis=-1) > 100


def test_same_seed_and_index_give_the_same_image():
  a = synthetic.make_image(4, 11, image_size=96)
  b = synthetic.make_image(4, 11, image_size=96)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert not np.array_equal(a[0], synthetic.make_image(5, 11, image_size=96)[0])
  assert not np.array_equal(a[0], synthetic.make_image(4, 12, image_size=96)[0])


@pytest.mark.parametrize('index', range(12))
def test_labels_are_the_tight_boxes_of_the_drawn_shapes(index):
  image, labels = synthetic.make_image(0, index, image_size=(256, 320))
  assert image.shape == (256, 320, 3) and image.dtype == np.uint8
  assert labels.dtype == np.float32 and labels.shape[1] == 5 and 1 <= len(labels) <= 6
  assert set(labels[:, 0].astype(int)) <= set(range(len(synthetic.CLASS_NAMES)))
  coloured = _chroma(image)
  covered = np.zeros_like(coloured)
  pixels = augment.normalized_to_pixels(labels, width=320, height=256)
  for x1, y1, x2, y2 in np.rint(pixels[:, 1:]).astype(int):
    assert min(x2 - x1, y2 - y1) >= 10  # Learnable: at least ~10 pixels a side.
    inside = coloured[y1:y2, x1:x2]
    assert inside[:, 0].any() and inside[:, -1].any() and inside[0].any() and inside[-1].any()
    covered[y1:y2, x1:x2] = True
  assert not (coloured & ~covered).any()  # No coloured pixel outside a labelled box.
  np.testing.assert_allclose(pixels[:, 1:], np.rint(pixels[:, 1:]), atol=1e-3)


def test_all_classes_appear():
  seen = set()
  for index in range(30):
    seen |= set(synthetic.make_image(1, index, image_size=64)[1][:, 0].astype(int).tolist())
  assert seen == set(range(len(synthetic.CLASS_NAMES)))


def test_rejects_bad_arguments():
  with pytest.raises(ValueError, match='at least 32'):
    synthetic.make_image(0, 0, image_size=16)
  with pytest.raises(ValueError, match='non-negative'):
    synthetic.make_image(-1, 0, image_size=64)
  with pytest.raises(ValueError, match='min_size'):
    synthetic.make_image(0, 0, image_size=64, min_size=0.5, max_size=0.2)


def test_write_dataset_layout(tmp_path):
  path = synthetic.write_dataset(tmp_path, num_train=3, num_val=2, image_size=64, seed=9)
  assert path == tmp_path / 'data.yaml'
  config = yaml.safe_load(path.read_text())
  assert config == {
    'train': 'images/train',
    'val': 'images/val',
    'nc': len(synthetic.CLASS_NAMES),
    'names': list(synthetic.CLASS_NAMES),
  }
  assert sorted(p.name for p in (tmp_path / 'images' / 'val').iterdir()) == [
    '000003.png',
    '000004.png',
  ]
  image, labels = synthetic.make_image(9, 4, image_size=64)
  stored = cv2.imread(str(tmp_path / 'images' / 'val' / '000004.png'))[..., ::-1]
  np.testing.assert_array_equal(stored, image)
  text = (tmp_path / 'labels' / 'val' / '000004.txt').read_text()
  rows = np.asarray([line.split() for line in text.splitlines()], np.float64)
  np.testing.assert_allclose(rows, labels, atol=1e-6)
  assert text == synthetic.format_labels(labels)
  with pytest.raises(ValueError, match='at least one image'):
    synthetic.write_dataset(tmp_path, num_train=0, num_val=1, image_size=64, seed=0)
