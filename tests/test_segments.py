"""Segment labels and the augmentations that use them, against upstream's own functions.

Where upstream's function can be called on the same inputs, it is, and the
results must agree: resampling, box-from-segment, the segment-aware warp, the
4- and 9-image mosaics with segments, cutting objects out and pasting them in.
Upstream draws from Python's ``random``; ours from a ``np.random.Generator``.
Both are given a scripted stand-in that maps one shared list of uniforms
``u`` to each call the same way (``uniform(a, b) = a + u (b - a)``,
``randint(a, b) = a + floor(u (b - a + 1))``, ``integers(lo, hi) = lo +
floor(u (hi - lo))``), so identical logic consumes identical values and a
divergence shows as a different result. Index choices (upstream's
``random.choices``/``random.sample``) are scripted lists.
"""

import copy
import math
import types

import cv2
import numpy as np
import pytest
from sas_yolov7.utils import datasets as reference
from sas_yolov7.utils import general as reference_general

from reorg_jax.data import augment, dataset, geometry, loader, mosaic, synthetic

SIZE = 64


class _Script:
  """Scripted draws: ``us`` uniforms in ``[0, 1)`` and ``picks``, lists of indices."""

  def __init__(self, us, picks=()):
    self.us, self.picks = list(us), list(picks)

  def _u(self):
    return self.us.pop(0)

  # Python's random (upstream).
  def random(self):
    return self._u()

  def uniform(self, a, b, size=None):
    if size is None:
      return a + (b - a) * self._u()
    return np.asarray([a + (b - a) * self._u() for _ in range(size)])

  def randint(self, a, b):
    return a + math.floor(self._u() * (b - a + 1))

  def choices(self, population, k):
    picked = self.picks.pop(0)
    assert len(picked) == k
    return [population[i] for i in picked]

  def sample(self, population, k):
    picked = self.picks.pop(0)
    assert len(picked) == k and len(set(picked)) == k
    return [population[i] for i in picked]

  # np.random.Generator (ours).
  def integers(self, low, high=None, size=None):
    if high is None:
      low, high = 0, low
    if size is None:
      return low + math.floor(self._u() * (high - low))
    return np.asarray([low + math.floor(self._u() * (high - low)) for _ in range(size)])

  def choice(self, n, size, replace):
    assert not replace
    picked = self.picks.pop(0)
    assert len(picked) == size
    return np.asarray(picked)


def _polygon(rng, cx, cy, radius, points):
  angles = np.sort(rng.uniform(0, 2 * np.pi, points))
  r = radius * rng.uniform(0.6, 1.0, points)
  return np.stack([cx + r * np.cos(angles), cy + r * np.sin(angles)], axis=1).astype(np.float32)


def _scene(seed, *, height, width, count, spread=1.0):
  """A random image with ``count`` polygons (some reaching outside) and their box rows."""
  rng = np.random.default_rng(seed)
  image = rng.integers(1, 256, (height, width, 3), dtype=np.uint8)
  segments, rows = [], []
  for k in range(count):
    cx, cy = rng.uniform(-0.1, 1.1, 2) * [width, height] * spread
    polygon = _polygon(
      rng, cx, cy, rng.uniform(4, 0.4 * min(height, width)), int(rng.integers(4, 9))
    )
    polygon = polygon.clip(0, [width, height])
    segments.append(polygon)
    rows.append([k % 3, *polygon.min(axis=0), *polygon.max(axis=0)])
  return image, np.asarray(rows, np.float32), segments


def _assert_images_agree(ours, theirs):
  """Identical but for rare one-step differences (a matrix entry's last bit can differ)."""
  assert ours.shape == theirs.shape
  difference = np.abs(ours.astype(int) - theirs.astype(int))
  assert difference.max() <= 1 and (difference > 0).mean() < 1e-3


def test_resample_and_segment_box_match_upstream():
  rng = np.random.default_rng(0)
  segments = [_polygon(rng, 30, 40, 20, n) for n in (3, 4, 9)]
  ours = geometry.resample_segments(segments)
  theirs = reference_general.resample_segments(copy.deepcopy(segments))
  for a, b in zip(ours, theirs, strict=True):
    assert a.shape == (geometry.RESAMPLE_POINTS, 2)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-9)
  points = np.stack(ours)
  boxes = geometry.segment_boxes(points, width=45, height=50)  # Some points lie outside.
  for box, segment in zip(boxes, ours, strict=True):
    np.testing.assert_allclose(box, reference_general.segment2box(segment, 45, 50), atol=1e-9)
  outside = geometry.segment_boxes(points + 100, width=45, height=50)
  np.testing.assert_array_equal(outside, 0)  # Upstream: zeros, removed by box_candidates.


@pytest.mark.parametrize('perspective', [0.0, 0.0007])
@pytest.mark.parametrize('with_segments', [True, False])
def test_warp_matches_upstream_random_perspective(monkeypatch, perspective, with_segments):
  image, rows, segments = _scene(1, height=90, width=120, count=12)
  us = np.random.default_rng(2).uniform(0, 1, 8).tolist()
  hyp = dict(degrees=20.0, translate=0.2, scale=0.5, shear=6.0, perspective=perspective)
  monkeypatch.setattr(reference, 'random', _Script(us))
  out_theirs, boxes_theirs = reference.random_perspective(
    image.copy(),
    rows.astype(np.float64),
    copy.deepcopy(segments) if with_segments else (),
    border=(-15, -20),
    **hyp,
  )
  out_ours, boxes_ours = geometry.random_affine(
    image,
    rows,
    rng=_Script(us),
    out_size=(60, 80),
    segments=segments if with_segments else None,
    **hyp,
  )
  _assert_images_agree(out_ours, out_theirs)
  assert 0 < len(boxes_ours) < len(rows)  # Some boxes are removed, some kept.
  np.testing.assert_allclose(boxes_ours, boxes_theirs, rtol=0, atol=2e-3)


def _fake_upstream_dataset(tiles, *, hyp):
  """What upstream's mosaic functions read of a ``LoadImagesAndLabels``, with cached images."""
  return types.SimpleNamespace(
    img_size=SIZE,
    mosaic_border=[-SIZE // 2, -SIZE // 2],
    indices=range(len(tiles)),
    labels=[t[1] for t in tiles],
    segments=[list(t[2]) for t in tiles],
    imgs=[t[0] for t in tiles],
    img_hw0=[t[0].shape[:2] for t in tiles],
    img_hw=[t[0].shape[:2] for t in tiles],
    hyp=hyp,
  )


def _tiles(shapes, seed):
  """Tiles ``(image, normalised labels, normalised segments)`` of the given ``(h, w)``."""
  tiles = []
  for k, (h, w) in enumerate(shapes):
    image, rows, segments = _scene(seed + k, height=h, width=w, count=3, spread=0.8)
    scale = np.float32([w, h])
    normalised = [s / scale for s in segments]
    labels = augment.pixels_to_normalized(rows, width=w, height=h)
    tiles.append((image, labels, normalised))
  return tiles


HYP = dict(degrees=5.0, translate=0.2, scale=0.5, shear=2.0, perspective=0.0, copy_paste=0.0)


@pytest.mark.parametrize('nine', [False, True])
def test_mosaics_with_segments_match_upstream(monkeypatch, nine):
  # Small first tile and wide/tall neighbours: the 9-image layout reaches past its top/left edge.
  shapes = [
    (20, 22),
    (64, 40),
    (30, 64),
    (64, 50),
    (40, 64),
    (64, 64),
    (50, 64),
    (64, 30),
    (64, 64),
  ]
  tiles = _tiles(shapes if nine else [(64, 48), (40, 64), (64, 64), (56, 32)], seed=10)
  count = len(tiles)
  us = np.random.default_rng(3).uniform(0, 1, 10).tolist()
  fake = _fake_upstream_dataset(tiles, hyp=HYP)
  # Upstream draws the centre/offset as (y, x), we as (x, y); upstream also picks the others.
  monkeypatch.setattr(reference, 'random', _Script([us[1], us[0], *us[2:]], [range(1, count)]))
  function = reference.load_mosaic9 if nine else reference.load_mosaic
  image_theirs, boxes_theirs = function(fake, 0)
  config = augment.AugmentConfig(**{k: v for k, v in HYP.items() if k != 'copy_paste'})
  image_ours, boxes_ours = mosaic.random_mosaic(tiles, rng=_Script(us), size=SIZE, config=config)
  _assert_images_agree(image_ours, image_theirs)
  assert len(boxes_ours) > 3
  np.testing.assert_allclose(boxes_ours, boxes_theirs, rtol=0, atol=2e-3)


def test_cut_objects_matches_upstream_sample_segments(monkeypatch):
  image, rows, segments = _scene(4, height=80, width=96, count=7)
  rows[2, 1:] = [10, 10, 10.5, 30]  # Empty once truncated to whole pixels: skipped by both.
  picks = [[2, 5, 0, 3]]  # round(0.5 * 7) = 4 of them.
  monkeypatch.setattr(reference, 'random', _Script([], copy.deepcopy(picks)))
  classes, patches, masks = reference.sample_segments(image, rows, copy.deepcopy(segments))
  ours = mosaic.cut_objects(image, rows, segments, rng=_Script([], picks))
  assert [o[0] for o in ours] == classes and len(ours) == 3
  for (_, patch, mask), theirs_patch, theirs_mask in zip(ours, patches, masks, strict=True):
    np.testing.assert_array_equal(mask, theirs_mask[..., 0] > 0)
    np.testing.assert_array_equal(patch, theirs_patch)


def test_paste_in_matches_upstream_pastein(monkeypatch):
  image, rows, segments = _scene(5, height=96, width=112, count=3)
  source, source_rows, source_segments = _scene(6, height=128, width=128, count=8)
  objects = mosaic.cut_objects(
    source, source_rows, source_segments, rng=_Script([], [list(range(8))]), fraction=1.0
  )
  us = np.random.default_rng(8).uniform(0, 1, 200).tolist()
  monkeypatch.setattr(reference, 'random', _Script(us))
  canvas_theirs = image.copy()
  labels_theirs = reference.pastein(
    canvas_theirs,
    rows.astype(np.float64),
    [o[0] for o in objects],
    [o[1] for o in objects],
    [np.repeat(o[2][..., None].astype(np.uint8) * 255, 3, axis=2) for o in objects],
  )
  script = _Script(us)
  canvas_ours, labels_ours = mosaic.paste_in(image, rows, objects, rng=script)
  assert len(script.us) == len(reference.random.us)  # The same number of draws.
  assert len(labels_ours) == len(rows) + 3  # Three pasted.
  np.testing.assert_array_equal(canvas_ours, canvas_theirs)
  np.testing.assert_allclose(labels_ours, labels_theirs, rtol=0, atol=1e-4)
  np.testing.assert_array_equal(image, _scene(5, height=96, width=112, count=3)[0])  # Input kept.


def test_label_files_keep_polygons(tmp_path):
  path = tmp_path / 'a.txt'
  path.write_text('1 0.1 0.2 0.5 0.2 0.3 0.6\n0 0.5 0.5 0.2 0.4\n')
  labels, segments, problems = dataset.read_label_file(path, num_classes=2)
  assert not problems and len(segments) == 2
  np.testing.assert_allclose(labels[0], [1, 0.3, 0.4, 0.4, 0.4], atol=1e-6)
  np.testing.assert_allclose(segments[0], [[0.1, 0.2], [0.5, 0.2], [0.3, 0.6]], atol=1e-7)
  np.testing.assert_allclose(segments[1], [[0.4, 0.3], [0.6, 0.3], [0.6, 0.7], [0.4, 0.7]])
  path.write_text('0 0.5 0.5 0.2 0.4\n')
  assert dataset.read_label_file(path, num_classes=2)[1] == ()
  path.write_text('0 0.1 0.2 0.5 0.2 0.3\n0 0.1 0.2 0.5 0.2 0.3 1.5\n')
  _, _, problems = dataset.read_label_file(path, num_classes=2)
  assert len(problems) == 2
  assert 'a.txt:1: expected' in problems[0] and 'got 6 fields' in problems[0]
  assert 'a.txt:2: coordinates must lie in [0, 1]' in problems[1]


def test_synthetic_polygons_outline_the_shapes():
  for index in range(8):
    image, labels, polygons = synthetic.make_image(2, index, image_size=96, with_polygons=True)
    again = synthetic.make_image(2, index, image_size=96)
    np.testing.assert_array_equal(image, again[0])
    np.testing.assert_array_equal(labels, again[1])
    pixels = augment.normalized_to_pixels(labels, width=96, height=96)
    for row, polygon in zip(pixels, polygons, strict=True):
      assert len(polygon) >= 4  # Upstream reads a file as segments only with >= 4 points.
      box = np.concatenate([polygon.min(axis=0), polygon.max(axis=0)]) * 96
      np.testing.assert_allclose(box, row[1:], atol=1e-3)
      x1, y1, x2, y2 = np.rint(row[1:]).astype(int)
      coloured = np.ptp(image.astype(int), axis=-1) > 100
      ys, xs = np.nonzero(coloured[y1:y2, x1:x2])
      outline = (polygon * 96).astype(np.float32)
      for x, y in zip(xs + x1 + 0.5, ys + y1 + 0.5, strict=True):  # Pixel centres of the shape.
        assert cv2.pointPolygonTest(outline, (float(x), float(y)), True) >= -1.0


def test_polygon_dataset_trains_with_every_option(tmp_path):
  path = synthetic.write_dataset(
    tmp_path, num_train=6, num_val=1, image_size=SIZE, seed=3, polygons=True
  )
  first = (tmp_path / 'labels' / 'train' / '000000.txt').read_text().splitlines()[0].split()
  assert len(first) >= 9 and len(first) % 2 == 1  # Polygon rows.
  data = dataset.load_dataset(path, split='train')
  boxes = dataset.load_dataset(
    synthetic.write_dataset(tmp_path / 'b', num_train=6, num_val=1, image_size=SIZE, seed=3),
    split='train',
  )
  assert data.has_segments and not boxes.has_segments
  for a, b in zip(data.labels, boxes.labels, strict=True):
    np.testing.assert_allclose(a, b, atol=2e-6)  # The same boxes, read from polygons.
  config = augment.AugmentConfig(paste_in=1.0, mosaic9=0.5, mixup=0.5, degrees=10.0)
  bound = loader.max_boxes_bound(data, config)
  assert bound == 18 * data.max_labels + len(mosaic.PASTE_SCALES)
  assert loader.max_boxes_bound(boxes, config) == 18 * data.max_labels
  feed = loader.BatchLoader(
    data, batch_size=3, image_size=SIZE, max_boxes=bound, seed=1, config=config, shuffle=True,
    drop_last=True,
  )  # fmt: skip
  a, b = feed.batch(1, 1), feed.batch(1, 1)
  np.testing.assert_array_equal(a.images, b.images)
  np.testing.assert_array_equal(a.labels, b.labels)
  assert (a.labels[:, 2:] >= 0).all() and (a.labels[:, 2:] <= 1).all()
  assert loader.augment_notes(data, config) == []
  (note,) = loader.augment_notes(boxes, config)
  assert note.startswith('note: augment.paste_in = 1.0 has no effect') and '\n' not in note


def test_options_that_cannot_matter_leave_box_datasets_unchanged(tmp_path):
  path = synthetic.write_dataset(tmp_path, num_train=4, num_val=1, image_size=SIZE, seed=4)
  data = dataset.load_dataset(path, split='train')
  plain = augment.AugmentConfig(paste_in=0.0, mosaic9=0.0)
  for config in (augment.AugmentConfig(paste_in=1.0), augment.AugmentConfig(mosaic9=0.0)):
    for index in range(4):
      rngs = [np.random.default_rng([9, index]) for _ in range(2)]
      a = loader.load_sample(data, index, image_size=SIZE, config=plain, rng=rngs[0])
      b = loader.load_sample(data, index, image_size=SIZE, config=config, rng=rngs[1])
      np.testing.assert_array_equal(a[0], b[0])
      np.testing.assert_array_equal(a[1], b[1])


@pytest.mark.parametrize(('field', 'value'), [('paste_in', 1.2), ('mosaic9', -0.1)])
def test_new_options_are_probabilities(field, value):
  with pytest.raises(ValueError, match=f'{field} is a probability .* got {value}'):
    augment.AugmentConfig(**{field: value})
