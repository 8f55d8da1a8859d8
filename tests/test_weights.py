"""``train --weights`` and ``--freeze``: what is transferred, and the inputs refused before any write.

Every refusal is one line on stderr with exit status 2 and leaves no run
directory behind. The transfers themselves are checked on upstream's nano
model: a deploy checkpoint (no aux head) and a plain state dict.
"""

from __future__ import annotations

import copy
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch
from sas_yolov7.models.yolo import Model

from reorg_jax.models import convert, yolo
from reorg_jax.program import cli, weights
from reorg_jax.training import assembly


@pytest.fixture(scope='module')
def nano_state():
  """Upstream's nano model (6 classes): its state dict as float32 arrays."""
  torch.manual_seed(1)
  model = Model(copy.deepcopy(yolo.load_config(yolo.NANO_CONFIG)), nc=6)
  return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def _refused(tmp_path, capsys, *argv: str) -> str:
  workdir = tmp_path / 'run'
  argv = (*argv, '--img-size', '128', '--workdir', str(workdir), '--no-compile-cache')
  status = cli.main(['train', *argv])
  err = capsys.readouterr().err.strip()
  assert status == 2, err
  assert len(err.splitlines()) == 1 and err.startswith('error: '), err
  assert not workdir.exists()
  return err


def test_missing_file(tmp_path, capsys):
  err = _refused(tmp_path, capsys, '--weights', str(tmp_path / 'none.pt'))
  assert 'none.pt: no such file or directory' in err


def test_not_a_checkpoint(tmp_path, capsys):
  path = tmp_path / 'notes.pt'
  path.write_text('not a checkpoint\n')
  err = _refused(tmp_path, capsys, '--weights', str(path))
  assert str(path) in err


def test_pickle_naming_another_class_is_refused_unrun(tmp_path, capsys):
  marker = tmp_path / 'ran'

  class Payload:
    def __reduce__(self):
      return (os.system, (f'touch {marker}',))

  path = tmp_path / 'evil.pt'
  with zipfile.ZipFile(path, 'w') as archive:
    archive.writestr('evil/data.pkl', pickle.dumps({'model': Payload()}, protocol=2))
    archive.writestr('evil/version', '3\n')
  err = _refused(tmp_path, capsys, '--weights', str(path))
  assert 'system' in err and str(path) in err
  assert not marker.exists()


def test_another_architecture_names_the_tensors(tmp_path, capsys):
  path = tmp_path / 'other.pt'
  torch.save({'backbone.conv1.weight': torch.zeros(8, 3, 3, 3)}, path)
  err = _refused(tmp_path, capsys, '--weights', str(path))
  assert 'only 0/' in err and '(not in the file)' in err and 'begin backbone.conv1.weight' in err


def test_partial_transfer_needs_allow_partial(tmp_path, capsys, nano_state):
  path = tmp_path / 'half.pt'
  kept = list(nano_state)[: len(nano_state) // 3]
  torch.save({k: torch.from_numpy(nano_state[k]) for k in kept}, path)
  err = _refused(tmp_path, capsys, '--weights', str(path))
  assert f'only {len(kept)}/{len(nano_state)} tensors fit' in err and '--allow-partial' in err


def test_freeze_beyond_the_layers(tmp_path, capsys):
  layers = len(yolo.p6_nano(num_classes=6).specs)
  err = _refused(tmp_path, capsys, '--freeze', str(layers + 1))
  assert f'train.freeze = {layers + 1} (--freeze) exceeds the {layers} layers of p6_nano' in err


def test_weights_and_resume_exclude_each_other(tmp_path, capsys):
  with pytest.raises(SystemExit) as stop:
    cli.main(['train', '--weights', 'x.pt', '--resume', '--workdir', str(tmp_path / 'run')])
  assert stop.value.code == 2
  assert '--weights starts a new run' in capsys.readouterr().err


def _nano(num_classes: int = 6):
  model = yolo.p6_nano(num_classes=num_classes)
  return model, assembly.zero_variables(model)  # what is not transferred stays zero


def test_state_dict_file_transfers_everything(tmp_path, nano_state):
  path = tmp_path / 'state.pt'
  torch.save({k: torch.from_numpy(v) for k, v in nano_state.items()}, path)
  source = weights.read(path)
  assert source.kind == 'PyTorch state_dict' and source.model_yaml is None
  model, fresh = _nano()
  moved = weights.transfer(source, model, fresh)
  assert len(moved.transferred) == moved.total == len(nano_state) and not moved.skipped
  kernel = np.asarray(moved.variables['params']['model_1']['conv']['kernel'])
  np.testing.assert_array_equal(kernel, nano_state['model.1.conv.weight'].transpose(2, 3, 1, 0))


def test_deploy_checkpoint_leaves_the_aux_head_fresh(nano_state):
  deploy = {k: v for k, v in nano_state.items() if '.m2.' not in k}
  source = weights.Weights(
    path=weights.Path('yolov7-nano.pt'),
    kind='upstream deploy checkpoint',
    state_dict=deploy,
    model_yaml=None,
    class_names=None,
    entry='model',
    deploy=True,
  )
  model, fresh = _nano()
  moved = weights.transfer(source, model, fresh)
  aux = sorted(k for k in nano_state if '.m2.' in k)
  assert len(aux) == 8  # weight and bias of the aux 1x1 convolution of each of the 4 levels
  assert sorted(k for k, _ in moved.skipped) == aux
  assert len(moved.transferred) == moved.total - len(aux)
  assert any('aux head starts fresh' in line for line in moved.lines(source))
  after, before = (convert.export_state_dict(model, v) for v in (moved.variables, fresh))
  for key in aux:
    np.testing.assert_array_equal(after[key], before[key], err_msg=key)
  lead = next(k for k in deploy if '.m.0.weight' in k)
  np.testing.assert_array_equal(after[lead], deploy[lead])


def test_deploy_checkpoint_needs_the_training_model(tmp_path, capsys, nano_state):
  path = tmp_path / 'deploy.pt'
  deploy = {k: torch.from_numpy(v) for k, v in nano_state.items() if '.m2.' not in k}
  torch.save({'model': deploy, 'optimizer': None, 'epoch': -1}, path)
  assert weights.read(path).deploy
  err = _refused(tmp_path, capsys, '--weights', str(path))
  assert 'is a deploy checkpoint (IDetect head, no aux head): give --model' in err
