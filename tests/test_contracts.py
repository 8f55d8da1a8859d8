"""Library contracts: the loss and the model refuse inputs that would give silent garbage.

The loss checks run at trace time (``jax.eval_shape``, nothing compiled);
one jitted evaluation on a 64-pixel scene checks the NaN that an
out-of-range class makes when it cannot be seen at trace time.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reorg_jax
from reorg_jax import testing
from reorg_jax.models import yolo
from reorg_jax.models.inference import predict

HW = (64, 64)


def _scene(*, batch: int, num_classes: int, max_boxes: int = 3, seed: int = 0):
  """``(config, targets, outputs)``: a P6 loss config and a random scene of ``batch`` images."""
  return testing.random_scene(
    seed, [2] * batch, num_classes=num_classes, max_boxes=max_boxes, image_hw=HW
  )


def _trace(outputs, targets, config, image_hw=HW):
  return jax.eval_shape(
    lambda o, t: reorg_jax.aux_ota_loss(o, t, image_hw, config), outputs, targets
  )


def test_matching_inputs_trace():
  config, targets, outputs = _scene(batch=2, num_classes=3)
  loss, parts = _trace(outputs, targets, config)
  losses, statistics = {'box', 'obj', 'cls', 'total'}, {'lead_positives', 'aux_positives'}
  assert loss.shape == () and set(parts) == losses | statistics
  assert all(parts[key].shape == () and parts[key].dtype == jnp.float32 for key in parts)
  assert targets.num_classes == 3


def test_targets_of_another_batch_size_are_refused():
  """Silent case 5: targets of 3 images with outputs of 2 gave the loss of the first 2."""
  config, targets, _ = _scene(batch=3, num_classes=3)
  _, _, outputs = _scene(batch=2, num_classes=3)
  with pytest.raises(
    ValueError, match=r'targets hold 3 images \(boxes \(3, 3, 4\)\) but the outputs 2'
  ):
    _trace(outputs, targets, config)
  # The other way round (which raised `vmap got inconsistent sizes`) names the mismatch too.
  with pytest.raises(ValueError, match='targets hold 2 images .* but the outputs 3'):
    _trace(_scene(batch=3, num_classes=3)[2], _scene(batch=2, num_classes=3)[1], config)


def test_targets_for_another_class_count_are_refused():
  """Silent case 6: targets with class 5 and a 3-class loss gave a finite loss."""
  _, targets, _ = _scene(batch=2, num_classes=6)
  config, _, outputs = _scene(batch=2, num_classes=3)
  with pytest.raises(ValueError, match='targets were built for 6 classes, the loss config has 3'):
    _trace(outputs, targets, config)


def test_outputs_for_another_class_count_or_grid_are_refused():
  config, targets, outputs = _scene(batch=2, num_classes=3)
  wider = reorg_jax.LossConfig.p6(4)
  with pytest.raises(ValueError, match=r'level 0 output must be \[B, A=3, H, W, 5\+C=9\], got'):
    _trace(outputs, targets, wider)
  with pytest.raises(ValueError, match='does not cover an image of 128x128'):
    _trace(outputs, targets, config, image_hw=(128, 128))
  lead, aux = outputs[:4], outputs[4:]
  with pytest.raises(ValueError, match='lead and auxiliary outputs must have the same shapes'):
    _trace(lead + [x[:1] for x in aux], targets, config)


def test_malformed_targets_are_refused():
  config, targets, outputs = _scene(batch=2, num_classes=3)
  bad = targets.replace(classes=targets.classes[:, :2])
  with pytest.raises(ValueError, match=r'classes \[B, M\].*\(2, 3, 4\), \(2, 2\) and \(2, 3\)'):
    _trace(outputs, bad, config)


def test_a_class_the_trace_cannot_see_makes_the_loss_nan():
  """Targets built directly (no ``num_classes``) with a class beyond ``C``: NaN, not a number."""
  # One level with one anchor: the smallest loss to compile (about 5 s here, 20 s for P6).
  config = reorg_jax.LossConfig(
    num_classes=3, anchors=(((20.0, 30.0),),), strides=(64,), balance=(1.0,), batch_groups=1
  )
  rng = np.random.default_rng(0)
  labels = testing.random_labels(rng, boxes_per_image=[2], num_classes=3, image_hw=HW)
  targets = reorg_jax.Targets.from_yolo(labels, 1, 3, num_classes=3)
  outputs = [
    jnp.asarray(x) for x in testing.random_head_outputs(rng, config, batch_size=1, image_hw=HW)
  ]
  direct = reorg_jax.Targets(boxes=targets.boxes, classes=targets.classes, valid=targets.valid)
  foreign = direct.replace(classes=direct.classes.at[0, 0].set(5))
  loss = jax.jit(lambda o, t: reorg_jax.aux_ota_loss(o, t, HW, config))
  good, parts = loss(outputs, direct)
  assert np.isfinite(good) and np.isfinite(parts['total'])
  bad, parts = loss(outputs, foreign)
  assert np.isnan(bad) and np.isnan(parts['total'])
  # A foreign class in a padding row is never read.
  padded = direct.replace(classes=direct.classes.at[0, 2].set(99))
  assert not bool(direct.valid[0, 2])
  assert loss(outputs, padded)[0] == good


@pytest.fixture(scope='module')
def nano():
  model = yolo.p6_nano(num_classes=3)
  variables = jax.eval_shape(
    functools.partial(model.init, train=False), jax.random.key(0), jnp.zeros((1, 64, 64, 3))
  )
  return model, variables


@pytest.mark.parametrize('dtype', [jnp.uint8, jnp.int32])
def test_integer_images_are_refused(nano, dtype):
  """Silent case 7: uint8 images (0..255) ran and returned garbage."""
  model, variables = nano
  images = jax.ShapeDtypeStruct((1, 64, 64, 3), dtype)
  with pytest.raises(ValueError, match=f'predict needs float images .* got dtype {dtype.__name__}'):
    jax.eval_shape(functools.partial(predict, model), variables, images)
  with pytest.raises(ValueError, match='expected float images scaled to \\[0, 1\\]'):
    jax.eval_shape(functools.partial(model.apply, train=False), variables, images)
  floats = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  detections = jax.eval_shape(
    functools.partial(predict, model, max_detections=10), variables, floats
  )
  assert detections.boxes.shape == (1, 10, 4)
