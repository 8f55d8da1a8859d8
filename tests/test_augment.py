"""Augmentations on hand-made images and boxes whose results are known in advance."""

import dataclasses

import numpy as np
import pytest

from reorg_jax.data import augment, geometry, mosaic


def _rows(*boxes):
  return np.asarray(boxes, np.float32).reshape(-1, 5)


def test_config_defaults_are_hyp_scratch_p6():
  config = augment.AugmentConfig()
  expected = dict(hsv_h=0.015, hsv_s=0.7, hsv_v=0.4, degrees=0.0, translate=0.2, scale=0.9)
  expected.update(shear=0.0, perspective=0.0, flipud=0.0, fliplr=0.5, mosaic=1.0, mixup=0.15)
  expected.update(paste_in=0.15, mosaic9=0.0)  # mosaic9 is no hyp key (upstream's code: 0.2).
  assert dataclasses.asdict(config) == expected


@pytest.mark.parametrize(
  ('field', 'value', 'message'),
  [('fliplr', 1.5, 'probability'), ('hsv_s', -0.1, 'hsv_s must be >= 0'), ('scale', 1.0, 'scale')],
)
def test_config_rejects_bad_values(field, value, message):
  with pytest.raises(ValueError, match=message):
    augment.AugmentConfig(**{field: value})


def test_normalized_pixels_round_trip():
  labels = _rows([3, 0.5, 0.25, 0.2, 0.1], [0, 0.1, 0.9, 0.05, 0.2])
  pixels = augment.normalized_to_pixels(labels, width=200, height=100, offset_x=10, offset_y=5)
  np.testing.assert_allclose(pixels[0], [3, 90, 25, 130, 35])
  back = augment.pixels_to_normalized(pixels - [0, 10, 5, 10, 5], width=200, height=100)
  np.testing.assert_allclose(back, labels, atol=1e-6)


def test_flips_mirror_image_and_boxes():
  image = np.zeros((20, 40, 3), np.uint8)
  image[2:6, 4:12] = 255  # The box below, in pixels.
  labels = _rows([1, 4, 2, 12, 6])
  flipped, out = augment.flip_lr(image, labels)
  np.testing.assert_allclose(out, [[1, 28, 2, 36, 6]])
  assert flipped[2:6, 28:36].min() == 255 and flipped.sum() == image.sum()
  cx = augment.pixels_to_normalized(labels, width=40, height=20)[0, 1]
  assert augment.pixels_to_normalized(out, width=40, height=20)[0, 1] == pytest.approx(1 - cx)
  flipped, out = augment.flip_ud(image, labels)
  np.testing.assert_allclose(out, [[1, 4, 14, 12, 18]])
  assert flipped[14:18, 4:12].min() == 255
  np.testing.assert_array_equal(augment.flip_lr(*augment.flip_lr(image, labels))[0], image)


def test_letterbox_scales_and_centres():
  image = np.full((100, 200, 3), 7, np.uint8)
  out, labels, ratio, pad = augment.letterbox(
    image, _rows([2, 20, 10, 60, 50]), size=(64, 64), scaleup=True
  )
  assert out.shape == (64, 64, 3) and ratio == pytest.approx(0.32) and pad == (0, 16)
  assert (out[:16] == augment.PAD_VALUE).all() and (out[48:] == augment.PAD_VALUE).all()
  assert (out[16:48] == 7).all()
  np.testing.assert_allclose(labels, [[2, 6.4, 19.2, 19.2, 32]], rtol=1e-6)


def test_letterbox_odd_padding_and_no_scaleup():
  image = np.full((10, 30, 3), 9, np.uint8)
  out, _, ratio, pad = augment.letterbox(image, _rows(), size=(20, 20), scaleup=True)
  assert pad == (0, 6) and (out[6:13] == 9).all() and (out[13:] == augment.PAD_VALUE).all()
  out, labels, ratio, pad = augment.letterbox(
    image, _rows([0, 0, 0, 30, 10]), size=(40, 40), scaleup=False
  )
  assert ratio == 1 and pad == (5, 15) and (out[15:25, 5:35] == 9).all()
  np.testing.assert_allclose(labels, [[0, 5, 15, 35, 25]])


def test_fit_long_side():
  image = np.zeros((50, 100, 3), np.uint8)
  assert augment.fit_long_side(image, size=40, antialias=True).shape == (20, 40, 3)
  assert augment.fit_long_side(image, size=200, antialias=False).shape == (100, 200, 3)
  assert augment.fit_long_side(image, size=100, antialias=True) is image


def test_warp_moves_boxes_by_a_known_affine():
  image = np.zeros((40, 40, 3), np.uint8)
  image[5:10, 5:15] = 200
  matrix = np.asarray([[2, 0, 10], [0, 2, 20], [0, 0, 1]], np.float64)
  out, labels = geometry.warp(
    image, _rows([4, 5, 5, 15, 10]), matrix=matrix, out_size=(60, 80), area_scale=4.0
  )
  assert out.shape == (60, 80, 3)
  np.testing.assert_allclose(labels, [[4, 20, 30, 40, 40]])
  assert (out[31:39, 21:39] == 200).all() and (out[:, :, 0] == augment.PAD_VALUE).sum() > 0


def test_warp_clips_and_drops_degenerate_boxes():
  image = np.zeros((100, 100, 3), np.uint8)
  shift = np.asarray([[1, 0, -50], [0, 1, 0], [0, 0, 1]], np.float64)
  labels = _rows(
    [0, 40, 10, 80, 50],  # Half visible after the shift: kept, clipped at x = 0.
    [1, 10, 10, 54, 50],  # Only 4 of 44 pixels of width left: area ratio < 0.1, dropped.
    [2, 60, 60, 61.5, 90],  # 1.5 pixels wide: dropped.
    [3, 60, 10, 99, 11.9],  # 39 x 1.9: too thin, dropped.
    [4, 55, 60, 97, 62.5],  # 42 x 2.5: aspect ratio 16.8, kept.
    [5, 55, 70, 97, 72.05],  # 42 x 2.05: aspect ratio > 20, dropped.
  )
  _, out = geometry.warp(image, labels, matrix=shift, out_size=(100, 100), area_scale=1.0)
  np.testing.assert_allclose(out, [[0, 0, 10, 30, 50], [4, 5, 60, 47, 62.5]])


def test_box_candidates_area_ratio_uses_the_zoom():
  before = np.asarray([[0, 0, 10, 10]], np.float64)
  after = np.asarray([[0, 0, 6, 6]], np.float64)  # 36 of a zoomed area of 400: 9 %.
  assert not geometry.box_candidates(before, after, area_scale=4.0)[0]
  assert geometry.box_candidates(before, after, area_scale=1.0)[0]


def test_affine_matrix_maps_centre_to_jittered_centre():
  rng = np.random.default_rng(3)
  matrix, zoom = geometry.affine_matrix(
    rng=rng,
    in_size=(200, 100),
    out_size=(50, 60),
    degrees=0,
    translate=0.2,
    scale=0.5,
    shear=0,
    perspective=0,
  )
  assert 0.5 <= zoom <= 1.6
  np.testing.assert_allclose(matrix[:2, :2], np.eye(2) * zoom)
  np.testing.assert_allclose(matrix[2], [0, 0, 1])
  centre = matrix @ [50, 100, 1]
  assert 0.3 * 60 <= centre[0] <= 0.7 * 60 and 0.3 * 50 <= centre[1] <= 0.7 * 50


def test_rotation_keeps_boxes_around_the_object():
  image = np.zeros((64, 64, 3), np.uint8)
  image[24:40, 16:48] = 255
  rng = np.random.default_rng(0)
  out, labels = geometry.random_affine(
    image,
    _rows([1, 16, 24, 48, 40]),
    rng=rng,
    out_size=(64, 64),
    degrees=30,
    translate=0.0,
    scale=0.0,
    shear=5,
    perspective=0,
  )
  ys, xs = np.nonzero(out[..., 0] > 128)
  x1, y1, x2, y2 = labels[0, 1:]
  assert x1 <= xs.min() + 1 and y1 <= ys.min() + 1 and x2 >= xs.max() and y2 >= ys.max()


def test_mosaic_places_tiles_around_the_centre():
  colours = [10, 20, 30, 40]
  tiles = [
    (np.full((30, 40, 3), c, np.uint8), _rows([k, 0.5, 0.5, 0.5, 0.5]))
    for k, c in enumerate(colours)
  ]
  canvas, labels, segments = mosaic.mosaic(tiles, size=32, center=(45, 20))
  assert segments is None
  assert canvas.shape == (64, 64, 3)
  assert canvas[0, 5, 0] == 10 and canvas[19, 44, 0] == 10  # Top left, cut at y = 0.
  assert canvas[0, 45, 0] == 20 and canvas[19, 63, 0] == 20  # Top right, cut at x = 64.
  assert canvas[20, 5, 0] == 30 and canvas[49, 44, 0] == 30
  assert canvas[20, 45, 0] == 40 and canvas[50, 45, 0] == augment.PAD_VALUE
  np.testing.assert_allclose(
    labels,
    [[0, 15, 0, 35, 12.5], [1, 55, 0, 64, 12.5], [2, 15, 27.5, 35, 42.5], [3, 55, 27.5, 64, 42.5]],
  )


def test_random_mosaic_is_reproducible_and_inside_the_image():
  tiles = [
    (np.full((32, 24, 3), 60 * k, np.uint8), _rows([k, 0.5, 0.5, 0.6, 0.4])) for k in range(4)
  ]
  config = augment.AugmentConfig()
  a = mosaic.random_mosaic(tiles, rng=np.random.default_rng(5), size=32, config=config)
  b = mosaic.random_mosaic(tiles, rng=np.random.default_rng(5), size=32, config=config)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert a[0].shape == (32, 32, 3)
  assert (a[1][:, 1:] >= 0).all() and (a[1][:, 1:] <= 32).all()


def test_hsv_jitter_is_reproducible_and_identity_without_gain():
  image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
  same = augment.augment_hsv(image, rng=np.random.default_rng(1), hgain=0, sgain=0, vgain=0)
  error = np.abs(same.astype(int) - image)
  assert error.max() <= 6 and error.mean() < 1  # 8-bit HSV round trip (hue has 180 steps).
  a = augment.augment_hsv(image, rng=np.random.default_rng(1), hgain=0.1, sgain=0.7, vgain=0.4)
  b = augment.augment_hsv(image, rng=np.random.default_rng(1), hgain=0.1, sgain=0.7, vgain=0.4)
  np.testing.assert_array_equal(a, b)
  assert a.dtype == np.uint8 and a.shape == image.shape and not np.array_equal(a, same)


def test_mixup_blends_and_keeps_all_boxes():
  first = (np.full((8, 8, 3), 200, np.uint8), _rows([0, 1, 1, 4, 4]))
  second = (np.full((8, 8, 3), 100, np.uint8), _rows([1, 2, 2, 6, 6], [2, 0, 0, 3, 3]))
  image, labels = mosaic.mixup(first, second, rng=np.random.default_rng(0))
  assert 100 < image[0, 0, 0] < 200 and len(labels) == 3
  with pytest.raises(ValueError, match='one shape'):
    mosaic.mixup(first, (np.zeros((4, 8, 3), np.uint8), _rows()), rng=np.random.default_rng(0))
