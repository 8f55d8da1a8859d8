"""Reading ``.pt`` files without PyTorch: upstream checkpoints, state dicts, refused pickles.

Files are written here with ``torch.save`` the way upstream's ``train_aux.py``
and ``strip_optimizer`` write them (small P6 model), and what
:mod:`reorg_jax.models.torch_file` reads is compared with
``torch.load(weights_only=False)`` key for key, dtype for dtype, value for value.
"""

from __future__ import annotations

import copy
import io
import os
import pathlib
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from sas_yolov7.models.yolo import Model
from sas_yolov7.utils.torch_utils import ModelEMA

from reorg_jax.models import from_yaml as model_yaml
from reorg_jax.models import torch_file, yolo
from reorg_jax.models.torch_checkpoint import load_checkpoint, module_state_dict
from reorg_jax.models.torch_file import TorchFileError, read_pt


@pytest.fixture(scope='module')
def trained():
  """The nano model and its EMA after one SGD step, set up as ``train_aux.py`` does."""
  torch.manual_seed(0)
  model = Model(model_yaml.load_config(yolo.NANO_CONFIG))
  model.nc, model.hyp, model.gr = 80, {'lr0': 0.01, 'momentum': 0.937}, 1.0
  model.class_weights = torch.rand(80) * 80
  model.names = [f'class{i}' for i in range(80)]
  ema = ModelEMA(model)
  norms, weights, biases = [], [], []  # upstream's pg0, pg1, pg2
  for module in model.modules():
    if isinstance(getattr(module, 'bias', None), torch.nn.Parameter):
      biases.append(module.bias)
    if isinstance(module, torch.nn.BatchNorm2d):
      norms.append(module.weight)
    elif isinstance(getattr(module, 'weight', None), torch.nn.Parameter):
      weights.append(module.weight)
    for name in ('im', 'ia'):
      norms.extend(implicit.implicit for implicit in getattr(module, name, []))
  optimizer = torch.optim.SGD(norms, lr=0.01, momentum=0.937, nesterov=True)
  optimizer.add_param_group({'params': weights, 'weight_decay': 5e-4})
  optimizer.add_param_group({'params': biases})
  torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=lambda epoch: 1.0)  # adds initial_lr
  sum(output.sum() for output in model(torch.rand(2, 3, 64, 64))).backward()
  optimizer.step()
  ema.update(model)
  return model, ema.ema, optimizer


@pytest.fixture(scope='module')
def training_file(trained, tmp_path_factory):
  model, ema, optimizer = trained
  path = tmp_path_factory.mktemp('pt') / 'last.pt'
  checkpoint = {
    'epoch': 7,
    'best_fitness': np.array([0.4375]),
    'training_results': '    0/299  1.2G  0.05\n',
    'model': copy.deepcopy(model).half(),
    'ema': copy.deepcopy(ema).half(),
    'updates': 12,
    'optimizer': optimizer.state_dict(),
    'wandb_id': None,
  }
  torch.save(checkpoint, path)
  return path


def _assert_same_state(got, wanted):
  """Same keys in the same order, same dtypes and shapes, equal values."""
  assert list(got) == list(wanted)
  for key, value in wanted.items():
    value = value.detach().numpy() if isinstance(value, torch.Tensor) else value
    assert got[key].dtype == value.dtype, key
    assert got[key].shape == value.shape, key
    np.testing.assert_array_equal(got[key], value, err_msg=key)


def _assert_one_line_naming(error, path):
  message = str(error.value)
  assert '\n' not in message and str(path) in message, message


def test_training_checkpoint_matches_torch_load(training_file, trained):
  wanted = torch.load(training_file, map_location='cpu', weights_only=False)
  checkpoint = load_checkpoint(training_file)
  assert checkpoint.kind == 'training'
  assert checkpoint.path == training_file
  _assert_same_state(checkpoint.model, wanted['model'].state_dict())
  _assert_same_state(checkpoint.ema, wanted['ema'].state_dict())
  assert checkpoint.model['model.1.conv.weight'].dtype == np.float16
  assert 'model.62.anchor_grid' in checkpoint.model
  assert 'model.1.bn.num_batches_tracked' in checkpoint.model
  assert checkpoint.yaml == trained[0].yaml
  assert checkpoint.class_names == trained[0].names
  assert checkpoint.epoch == 7


def test_training_checkpoint_other_entries(training_file):
  wanted = torch.load(training_file, map_location='cpu', weights_only=False)
  content = read_pt(training_file)
  assert content['epoch'] == 7 and content['updates'] == 12 and content['wandb_id'] is None
  assert content['training_results'] == wanted['training_results']
  assert isinstance(content['best_fitness'], np.ndarray)
  np.testing.assert_array_equal(content['best_fitness'], wanted['best_fitness'])
  optimizer, wanted_optimizer = content['optimizer'], wanted['optimizer']
  assert optimizer['param_groups'] == wanted_optimizer['param_groups']
  assert list(optimizer['state']) == list(wanted_optimizer['state'])
  for index, state in wanted_optimizer['state'].items():
    _assert_same_state(optimizer['state'][index], state)
  model = content['model']
  assert isinstance(model, torch_file.StandIn)
  assert model.qualname == 'sas_yolov7.models.yolo.Model'
  assert model.attributes['hyp'] == wanted['model'].hyp
  np.testing.assert_array_equal(
    model.attributes['class_weights'], wanted['model'].class_weights.numpy()
  )
  _assert_same_state(module_state_dict(model), wanted['model'].state_dict())


def test_deploy_checkpoint(trained, tmp_path):
  """``strip_optimizer``'s output: the model in half precision, no optimizer and no EMA."""
  model = copy.deepcopy(trained[1]).half()
  for parameter in model.parameters():
    parameter.requires_grad = False
  path = tmp_path / 'best.pt'
  torch.save({'epoch': -1, 'training_results': None, 'model': model, 'optimizer': None}, path)
  checkpoint = load_checkpoint(path)
  assert (checkpoint.kind, checkpoint.ema, checkpoint.epoch) == ('deploy', None, -1)
  _assert_same_state(checkpoint.model, model.state_dict())
  assert checkpoint.yaml == model.yaml


@pytest.mark.parametrize('wrapped', [False, True], ids=['state_dict', 'model_entry'])
def test_state_dict_files(trained, tmp_path, wrapped):
  state = trained[0].state_dict()
  path = tmp_path / 'weights.pt'
  torch.save({'model': state} if wrapped else state, path)
  checkpoint = load_checkpoint(path)
  assert checkpoint.kind == ('deploy' if wrapped else 'state_dict')
  assert (checkpoint.ema, checkpoint.yaml, checkpoint.class_names) == (None, None, None)
  _assert_same_state(checkpoint.model, state)


def test_module_state_dict_skips_none_and_non_persistent(tmp_path):
  norm = torch.nn.BatchNorm2d(4)
  norm.register_buffer('scratch', torch.ones(4), persistent=False)
  norm.register_buffer('kept', torch.arange(4.0))
  network = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), norm, torch.nn.SiLU())
  path = tmp_path / 'module.pt'
  torch.save(network, path)
  checkpoint = load_checkpoint(path)
  assert checkpoint.kind == 'deploy'
  _assert_same_state(checkpoint.model, network.state_dict())


def test_tensor_layouts(tmp_path):
  base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
  complex_values = torch.randn(3, 2, dtype=torch.complex64)
  tensors = {
    'transposed': base.t(),
    'window': base[1:, 2:5],
    'row': base[2],
    'broadcast': torch.ones(1, 3).expand(4, 3),
    'scalar': torch.tensor(3.5, dtype=torch.float64),
    'empty': torch.zeros(0, 3),
    'bool': torch.tensor([True, False, True]),
    'int8': torch.arange(-3, 3, dtype=torch.int8),
    'int64': torch.arange(5),
    'bfloat16': torch.randn(5).bfloat16(),
    'uint16': torch.tensor([1, 2, 60000], dtype=torch.int32).to(torch.uint16),
    'conj': complex_values.conj(),
    'neg': torch.randn(4)._neg_view(),
  }
  path = tmp_path / 'tensors.pt'
  torch.save(tensors, path)
  content = read_pt(path)
  for key, tensor in tensors.items():
    tensor = tensor.resolve_conj().resolve_neg()
    wanted = tensor.float().numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
    got = content[key].astype(np.float32) if key == 'bfloat16' else content[key]
    assert got.dtype == wanted.dtype and got.shape == wanted.shape, key
    np.testing.assert_array_equal(got, wanted, err_msg=key)
  assert str(content['bfloat16'].dtype) == 'bfloat16'


def _rewrite(source, target, change):
  """Copies a ``.pt`` zip, passing each record's name and bytes through ``change``."""
  with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, 'w') as new:
    for name in old.namelist():
      new.writestr(name, change(name, old.read(name)))


def test_storages_saved_from_a_gpu(trained, tmp_path):
  """Files saved from CUDA name ``torch.cuda.HalfStorage``, as upstream's releases do."""
  source, target = tmp_path / 'cpu.pt', tmp_path / 'cuda.pt'
  torch.save({'model': copy.deepcopy(trained[0]).half(), 'optimizer': None}, source)

  def to_cuda(name, data):
    return data.replace(b'ctorch\nHalfStorage\n', b'ctorch.cuda\nHalfStorage\n')

  _rewrite(source, target, to_cuda)
  assert b'torch.cuda' in zipfile.ZipFile(target).read('cpu/data.pkl')
  _assert_same_state(load_checkpoint(target).model, load_checkpoint(source).model)


def test_big_endian_file(tmp_path):
  values = torch.randn(2, 3)
  source, target = tmp_path / 'little.pt', tmp_path / 'big.pt'
  torch.save({'values': values}, source)

  def to_big(name, data):
    if name.endswith('/byteorder'):
      return b'big'
    if '/data/' in name:
      return np.frombuffer(data, '<f4').astype('>f4').tobytes()
    return data

  _rewrite(source, target, to_big)
  got = read_pt(target)['values']
  assert got.dtype == np.float32 and got.dtype.isnative
  np.testing.assert_array_equal(got, values.numpy())


class _Shell:
  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return os.system, (self.command,)


def test_refuses_os_system(tmp_path):
  marker = tmp_path / 'pwned'
  path = tmp_path / 'evil.pt'
  torch.save({'model': _Shell(f'echo pwned > {marker}'), 'optimizer': None}, path)
  with pytest.raises(TorchFileError, match=rf'{os.system.__module__}\.system') as error:
    load_checkpoint(path)
  _assert_one_line_naming(error, path)
  assert not marker.exists()


def _pickle_zip(path, data):
  with zipfile.ZipFile(path, 'w') as archive:
    archive.writestr('archive/data.pkl', data)
    archive.writestr('archive/version', b'3\n')
  return path


@pytest.mark.parametrize(
  'module,name',
  [
    ('os', 'system'),
    ('builtins', 'eval'),
    ('__builtin__', 'getattr'),
    ('subprocess', 'Popen'),
    ('torch', 'load'),
    ('torch._utils', '_rebuild_qtensor'),
    ('copyreg', '_reconstructor'),
    ('numpy', 'load'),
  ],
)
def test_refuses_names_outside_the_allowed_set(tmp_path, module, name):
  """A protocol-2 pickle ``module.name('x')``, by hand."""
  data = b'\x80\x02c%s\n%s\nX\x01\x00\x00\x00x\x85R.' % (module.encode(), name.encode())
  path = _pickle_zip(tmp_path / 'named.pt', data)
  with pytest.raises(TorchFileError, match=rf'{module.replace("__builtin__", "builtins")}\.{name}'):
    read_pt(path)


def test_stand_ins_only_record(tmp_path):
  """Allowed classes are recorded: called, built with state, never run."""
  data = pickle.dumps(0, protocol=2)[:2] + (
    b'cmodels.common\nConv\nK\x03K\x10\x86R'  # Conv(3, 16)
    b'}X\x01\x00\x00\x00aK\x01sb'  # BUILD {'a': 1}
    b'.'
  )
  stand_in = read_pt(_pickle_zip(tmp_path / 'conv.pt', data))
  assert isinstance(stand_in, torch_file.StandIn)
  assert (stand_in.qualname, stand_in.args, stand_in.attributes) == (
    'models.common.Conv',
    (3, 16),
    {'a': 1},
  )
  assert repr(stand_in) == '<stand-in models.common.Conv>'


def test_malformed_files(training_file, tmp_path):
  cases = {}
  cases['missing.pt'] = None
  cases['garbage.pt'] = b'not a checkpoint at all'
  cases['truncated.pt'] = training_file.read_bytes()[: training_file.stat().st_size // 2]
  legacy = io.BytesIO()
  torch.save({'a': torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
  cases['legacy.pt'] = legacy.getvalue()
  for name, data in cases.items():
    path = tmp_path / name
    if data is not None:
      path.write_bytes(data)
    with pytest.raises(TorchFileError) as error:
      load_checkpoint(path)
    _assert_one_line_naming(error, path)
  assert 'legacy' in str(error.value)


def test_short_storage_record(tmp_path):
  source, target = tmp_path / 'full.pt', tmp_path / 'short.pt'
  torch.save({'values': torch.randn(100)}, source)
  _rewrite(source, target, lambda name, data: data[:40] if '/data/' in name else data)
  with pytest.raises(TorchFileError, match='shorter than 100 elements') as error:
    read_pt(target)
  _assert_one_line_naming(error, target)


@pytest.mark.parametrize(
  'content,message',
  [
    ({}, 'empty mapping'),
    ({'model': {}}, 'empty state dict'),
    ([torch.ones(2)], 'neither a state dict nor a model'),
    ({'model': 'weights.bin'}, 'neither a module nor a state dict'),
  ],
  ids=['empty', 'empty_model', 'list', 'model_string'],
)
def test_content_without_weights(tmp_path, content, message):
  path = tmp_path / 'odd.pt'
  torch.save(content, path)
  with pytest.raises(TorchFileError, match=message) as error:
    load_checkpoint(path)
  _assert_one_line_naming(error, path)


def test_zip_without_pickle(tmp_path):
  path = tmp_path / 'empty.zip'
  with zipfile.ZipFile(path, 'w') as archive:
    archive.writestr('archive/version', b'3\n')
  with pytest.raises(TorchFileError, match='data.pkl') as error:
    read_pt(path)
  _assert_one_line_naming(error, path)


def test_reads_without_torch_or_upstream(training_file):
  """In a process where importing torch or the upstream package fails."""
  script = (
    'import sys\n'
    "sys.modules['torch'] = sys.modules['sas_yolov7'] = sys.modules['models'] = None\n"
    'from reorg_jax.models.torch_checkpoint import load_checkpoint\n'
    f'checkpoint = load_checkpoint({str(training_file)!r})\n'
    "loaded = [m for m in ('torch', 'sas_yolov7') if sys.modules.get(m) is not None]\n"
    'print(checkpoint.kind, len(checkpoint.model), len(checkpoint.ema), loaded)\n'
  )
  result = subprocess.run(
    [sys.executable, '-c', script],
    capture_output=True,
    text=True,
    check=False,
    cwd=pathlib.Path(__file__).parent,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr
  count = len(torch.load(training_file, weights_only=False)['model'].state_dict())
  assert result.stdout.split() == ['training', str(count), str(count), '[]']
