"""Weight import and export against the original ``Model``: files, checkpoints, errors.

Output parity after import, and the exact export -> import round trip of every
P6 config, are in ``test_models``; these tests use the small model.
"""

from __future__ import annotations

import copy

import jax
import numpy as np
import pytest
import torch
from sas_yolov7.models.yolo import Model

from reorg_jax.models import convert, yolo
from reorg_jax.models import from_yaml as model_yaml
from reorg_jax.reference.models import perturbed_model


@pytest.fixture(scope='module')
def config():
  return model_yaml.load_config(yolo.NANO_CONFIG)


@pytest.fixture(scope='module')
def upstream(config):
  return perturbed_model(config, seed=3, calibration_size=128)


@pytest.fixture(scope='module')
def state(upstream):
  return {key: value.detach().clone() for key, value in upstream.state_dict().items()}


def _assert_state_equal(got, wanted):
  assert set(got) == set(wanted)
  for key, value in wanted.items():
    if not key.endswith('num_batches_tracked'):
      np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(value), err_msg=key)


def test_round_trip_through_files(tmp_path, config, state):
  source = tmp_path / 'upstream.pt'
  torch.save(state, source)
  model = yolo.build_model(config)
  variables = convert.import_state_dict(model, convert.load_torch_state_dict(source))
  assert jax.tree.structure(variables['params']) == jax.tree.structure(
    jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, 128, 128, 3)), train=True))[
      'params'
    ]
  )
  target = tmp_path / 'exported.pt'
  convert.save_torch_state_dict(convert.export_state_dict(model, variables), target)
  fresh = Model(copy.deepcopy(config))
  fresh.load_state_dict(torch.load(target), strict=True)
  _assert_state_equal({k: v.numpy() for k, v in fresh.state_dict().items()}, state)


@pytest.mark.parametrize('entry', ['model', 'ema'])
def test_full_checkpoints_need_allow_pickle(tmp_path, config, upstream, state, entry):
  path = tmp_path / 'checkpoint.pt'
  model_copy = copy.deepcopy(upstream).half()
  torch.save({'epoch': 3, entry: model_copy, 'optimizer': None}, path)
  with pytest.raises(ValueError, match='allow_pickle=True'):
    convert.load_torch_state_dict(path, entry=entry)
  loaded = convert.load_torch_state_dict(path, entry=entry, allow_pickle=True)
  assert all(v.dtype in (np.float32, np.int64) for v in loaded.values())
  halved = {k: v.half().float() if v.is_floating_point() else v for k, v in state.items()}
  model = yolo.build_model(config)
  variables = convert.import_state_dict(model, loaded)
  _assert_state_equal(convert.export_state_dict(model, variables), halved)


def test_checkpoint_holding_a_state_dict(tmp_path, state):
  path = tmp_path / 'checkpoint.pt'
  torch.save({'model': state, 'epoch': 1}, path)
  _assert_state_equal(convert.load_torch_state_dict(path), state)
  with pytest.raises(ValueError, match="'ema'"):
    convert.load_torch_state_dict(path, entry='ema')


def test_mismatches_are_listed(config, state):
  model = yolo.build_model(config)
  broken = dict(state)
  del broken['model.1.conv.weight']
  del broken['model.62.im.2.implicit']
  broken['model.99.conv.weight'] = torch.zeros(1)
  broken['model.3.bn.running_var'] = torch.ones(7)
  with pytest.raises(ValueError) as error:
    convert.import_state_dict(model, broken)
  message = str(error.value)
  for key in ('model.1.conv.weight', 'model.62.im.2.implicit', 'model.99.conv.weight'):
    assert key in message
  assert 'model.3.bn.running_var: expected (16,), got (7,)' in message


def test_other_classes_do_not_fit(config, state):
  model = yolo.build_model(config, num_classes=3)
  with pytest.raises(ValueError, match=r'model\.62\.m\.0\.weight: expected \(24, 32, 1, 1\)'):
    convert.import_state_dict(model, state)


def test_refitted_anchors(config, state):
  refitted = dict(state)
  grid = state['model.62.anchor_grid'] * 1.1
  refitted['model.62.anchor_grid'] = grid
  strides = torch.tensor([8.0, 16.0, 32.0, 64.0]).view(-1, 1, 1)
  refitted['model.62.anchors'] = grid.view(4, 3, 2) / strides
  with pytest.raises(ValueError, match='anchors_from_state_dict'):
    convert.import_state_dict(yolo.build_model(config), refitted)
  anchors = convert.anchors_from_state_dict(refitted)
  np.testing.assert_allclose(anchors[0], np.asarray(config['anchors'][0]) * 1.1, rtol=1e-6)
  model = yolo.build_model(config, anchors=anchors)
  variables = convert.import_state_dict(model, refitted)
  exported = convert.export_state_dict(model, variables)
  np.testing.assert_allclose(exported['model.62.anchor_grid'], grid.numpy(), rtol=1e-6)
  np.testing.assert_allclose(exported['model.62.anchors'], refitted['model.62.anchors'], rtol=1e-6)


def test_export_checks_the_variables(config, state):
  model = yolo.build_model(config)
  variables = convert.import_state_dict(model, state)
  params = dict(variables['params'])
  del params['model_5']
  with pytest.raises(ValueError, match='model.5.conv.weight'):
    convert.export_state_dict(model, {**variables, 'params': params})
