"""``reorg-jax export`` against the original: the deploy model and its files, ONNX, StableHLO.

One upstream nano model (3 classes, perturbed weights, anchors re-fitted as
autoanchor leaves them: the buffers differ from the pickled model file's) is
saved as an upstream training checkpoint and exported once, at 64 px, in all
three formats (a module fixture). Then:

* upstream's ``Model`` built from the written deploy model file loads the
  written ``state_dict`` with ``strict=True``, and its evaluation outputs equal
  the training model's (the re-fitted anchors kept, which upstream's notebook
  loses for P6 models);
* our deploy checkpoint reads back as ``--weights`` (as ``val`` and ``detect``
  read it) and gives the training model's decoded outputs;
* onnxruntime on the ONNX file, and a process that imports only jax and numpy
  on the StableHLO file, give the same outputs, at any batch size;
* the derived deploy model files of W6, E6, D6 and E6E equal upstream's
  ``cfg/deploy`` files; the W6 one builds in upstream's ``Model`` with our
  state dict's keys;
* bad input gets one line, status 2, and nothing written.

Decoded outputs are compared divided by their scale (stride for centres,
anchor for sizes, 1 for probabilities), to 1e-4.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
import torch
import yaml
from sas_yolov7.models.common import ImplicitA, ImplicitM
from sas_yolov7.models.yolo import Model

from reorg_jax.models import convert, deploy, layers, yolo
from reorg_jax.models import from_yaml as model_yaml
from reorg_jax.program import cli, exporting, network, weights
from reorg_jax.reference.detect_check import decoded_scale, largest_difference, torch_decoded
from reorg_jax.reference.models import CONFIG_DIR, perturbed_model
from reorg_jax.training import assembly

SIZE = 64
TOLERANCE = 1e-4
ROUNDING = 1e-5  # what folding ImplicitA/M into the convolutions may change in float32
NAMES = ('disc', 'square', 'triangle')
FORMATS = 'deploy,onnx,stablehlo'


def _scale(model: yolo.YOLO) -> np.ndarray:
  """``[R, F]``: stride for ``x, y``, anchor for ``w, h``, 1 for probabilities."""
  return decoded_scale(model, (SIZE, SIZE))


@pytest.fixture(scope='module')
def config():
  config = model_yaml.load_config(yolo.NANO_CONFIG)
  config['nc'] = len(NAMES)
  return config


@pytest.fixture(scope='module')
def upstream(config):
  """The original training model, anchors re-fitted after it was built (as autoanchor does)."""
  model = perturbed_model(config, seed=5, calibration_size=SIZE)
  head = model.model[-1]
  with torch.no_grad():
    refit = head.anchor_grid * torch.linspace(0.6, 1.4, head.anchor_grid.numel() // 2).view(
      head.anchor_grid.shape[:-1] + (1,)
    )
    head.anchor_grid.copy_(refit)
    head.anchors.copy_(refit.view(head.anchors.shape) / head.stride.view(-1, 1, 1))
  model.names = list(NAMES)
  return model.eval()


@pytest.fixture(scope='module')
def images():
  return np.random.default_rng(0).random((2, SIZE, SIZE, 3), dtype=np.float32)


@pytest.fixture(scope='module')
def reference(upstream, images):
  """Upstream's training model's decoded outputs."""
  return torch_decoded(upstream, images)


@pytest.fixture(scope='module')
def workdir(tmp_path_factory, upstream):
  """``reorg-jax export`` of the upstream training checkpoint, every format."""
  folder = tmp_path_factory.mktemp('export')
  path = folder / 'last.pt'
  torch.save({'model': upstream, 'ema': copy.deepcopy(upstream), 'optimizer': None}, path)
  out = folder / 'out'
  argv = ['export', '--weights', str(path), '--include', FORMATS, '--img-size', str(SIZE)]
  assert cli.main([*argv, '--workdir', str(out)]) == 0
  return out


@pytest.fixture(scope='module')
def refit_anchors(upstream):
  state = {k: v.numpy() for k, v in upstream.state_dict().items()}
  return convert.anchors_from_state_dict(state)


@pytest.fixture(scope='module')
def ours(upstream, config, refit_anchors, images, workdir):
  """Our decoded outputs: the training model with upstream's weights, and the deploy checkpoint."""
  state = {k: v.numpy() for k, v in upstream.state_dict().items()}
  training = yolo.build_model(config, anchors=refit_anchors)
  variables = convert.import_state_dict(training, state)
  read = weights.read(workdir / 'deploy')
  model, name = network.build_model(read, model=None, num_classes=len(NAMES))
  filled = network.fill(read, model, model_name=name)
  run = jax.jit(lambda m, v, x: m.apply(v, x, train=False), static_argnums=0)
  return {
    'read': read,
    'model': model,
    'variables': filled,
    'training_model': training,
    'training_variables': variables,
    'training': np.asarray(run(training, variables, images)),
    'deploy': np.asarray(run(model, filled, images)),
  }


@pytest.fixture(scope='module')
def upstream_deploy(workdir):
  """Upstream's ``Model`` of the written deploy model file, loading the written state dict."""
  files = workdir / 'deploy'
  model = Model(str(files / weights.DEPLOY_MODEL))
  model.load_state_dict(torch.load(files / weights.DEPLOY_STATE), strict=True)
  return model


def test_deploy_files_load_in_upstream_and_agree(
  workdir, upstream_deploy, reference, refit_anchors, images
):
  written = yaml.safe_load((workdir / 'deploy' / weights.DEPLOY_MODEL).read_text())
  assert written['anchors'] == refit_anchors  # the trained anchors, not the file's defaults
  assert written['anchors'] != model_yaml.load_config(yolo.NANO_CONFIG)['anchors']
  assert written['head'][-1][2] == 'Detect'
  model = upstream_deploy
  assert not any('.m2.' in key or '.ia.' in key or '.im.' in key for key in model.state_dict())
  built = yolo.build_model(written)
  largest = largest_difference(torch_decoded(model, images), reference, _scale(built))
  assert largest < TOLERANCE, largest


def test_deploy_checkpoint_reads_back_with_the_training_outputs(ours, reference):
  read, model = ours['read'], ours['model']
  assert read.deploy and read.class_names == NAMES and read.kind == 'deploy checkpoint of ours'
  assert model.head.name == 'Detect' and len(model.specs) == 59  # nano: 4 auxiliary convs gone
  scale = _scale(model)
  # Within one framework the folding moves the outputs by float32 rounding only.
  assert largest_difference(ours['deploy'], ours['training'], scale) < ROUNDING
  # Against upstream, the deploy model is as close as our training model is: the two
  # frameworks' float32 parity (which depends on the machine's convolution kernels).
  parity = largest_difference(ours['training'], reference, scale)
  assert parity < TOLERANCE * 5, parity
  assert largest_difference(ours['deploy'], reference, scale) < parity + ROUNDING


def test_a_fused_training_model_deploys_alike(ours):
  training, variables = ours['training_model'], ours['training_variables']
  plain = deploy.deploy(training, variables)
  fused = deploy.deploy(*yolo.fuse(training, variables))
  assert fused[0] == plain[0]
  for got, want in zip(jax.tree.leaves(fused[1]), jax.tree.leaves(plain[1]), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert jax.tree.structure(plain[1]) == jax.tree.structure(ours['variables'])


def test_upstream_deploy_checkpoint_carries_its_idetect_model(tmp_path, upstream_deploy):
  """An upstream deploy file pickles its model (here IDetect with implicit layers): it builds."""
  model = copy.deepcopy(upstream_deploy)  # made an IDetect model as upstream's Model would
  model.yaml['head'][-1][2] = 'IDetect'
  head = model.model[-1]
  head.ia = torch.nn.ModuleList(ImplicitA(conv.in_channels) for conv in head.m)
  head.im = torch.nn.ModuleList(ImplicitM(conv.out_channels) for conv in head.m)
  model.names = list(NAMES)
  path = tmp_path / 'deploy.pt'
  torch.save({'model': model, 'optimizer': None, 'epoch': -1}, path)
  read = weights.read(path)
  assert read.deploy and read.model_yaml['head'][-1][2] == 'IDetect'
  built, name = network.build_model(read, model=None, num_classes=len(NAMES))
  network.fill(read, built, model_name=name)  # every tensor, the implicit layers included
  assert dict(built.head.kwargs)['implicit']


@pytest.mark.parametrize(
  ('change', 'message'),
  [
    (lambda d: (d / weights.DEPLOY_STATE).unlink(), 'the deploy checkpoint lacks weights.pt'),
    (lambda d: (d / weights.DEPLOY_META).write_text('{"format": "x"}'), 'not a deploy checkpoint'),
    (lambda d: (d / weights.DEPLOY_META).write_text('{'), 'cannot be read as JSON'),
  ],
)
def test_damaged_deploy_checkpoints_are_named(tmp_path, workdir, change, message):
  folder = tmp_path / 'deploy'
  shutil.copytree(workdir / 'deploy', folder)
  change(folder)
  with pytest.raises(weights.WeightsError, match=message) as caught:
    weights.read(folder)
  assert str(folder) in str(caught.value) and '\n' not in str(caught.value)


def test_onnx_gives_the_decoded_outputs_at_any_batch(workdir, ours, images):
  import onnx
  import onnxruntime

  proto = onnx.load(str(workdir / 'model.onnx'))
  dims = [
    [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
    for value in (*proto.graph.input, *proto.graph.output)
  ]
  rows = ours['deploy'].shape[1]
  assert dims == [['B', SIZE, SIZE, 3], ['B', rows, 5 + len(NAMES)]]
  metadata = {prop.key: json.loads(prop.value) for prop in proto.metadata_props}
  assert metadata['class_names'] == list(NAMES)
  options = onnxruntime.SessionOptions()
  options.log_severity_level = 3
  session = onnxruntime.InferenceSession(
    str(workdir / 'model.onnx'), options, providers=['CPUExecutionProvider']
  )
  scale = _scale(ours['model'])
  (two,) = session.run(None, {'images': images})
  (one,) = session.run(None, {'images': images[:1]})
  assert largest_difference(two, ours['deploy'], scale) < TOLERANCE
  assert largest_difference(one[0], ours['deploy'][0], scale) < TOLERANCE


def test_nearest_upsampling_equals_pytorch_pixel_for_pixel():
  import jax2onnx
  import onnxruntime

  maps = np.random.default_rng(1).normal(size=(2, 5, 7, 4)).astype(np.float32)
  want = torch.nn.Upsample(scale_factor=2, mode='nearest')(
    torch.from_numpy(maps.transpose(0, 3, 1, 2))
  ).numpy()  # [B, C, 2H, 2W]
  upsample = layers.Upsample(scale=2)
  ours = np.asarray(upsample.apply({}, maps)).transpose(0, 3, 1, 2)
  proto = jax2onnx.to_onnx(lambda x: upsample.apply({}, x), inputs=[maps.shape])
  session = onnxruntime.InferenceSession(
    proto.SerializeToString(), providers=['CPUExecutionProvider']
  )
  (graph,) = session.run(None, {session.get_inputs()[0].name: maps})
  np.testing.assert_array_equal(ours, want)
  np.testing.assert_array_equal(graph.transpose(0, 3, 1, 2), want)


RELOAD = textwrap.dedent(
  """
  import sys
  import numpy as np
  from jax import export

  exported = export.deserialize(bytearray(open(sys.argv[1], 'rb').read()))
  images = np.load(sys.argv[2])
  np.save(sys.argv[3], np.asarray(exported.call(images)))
  print(exported.platforms, exported.in_avals[0].shape, exported.out_avals[0].shape)
  assert not any(name.startswith('reorg_jax') for name in sys.modules)
  """
)


def test_stablehlo_reloads_without_the_model_code(workdir, ours, images, tmp_path):
  np.save(tmp_path / 'images.npy', images)
  done = subprocess.run(
    [
      sys.executable,
      '-c',
      RELOAD,
      str(workdir / 'model.stablehlo'),
      str(tmp_path / 'images.npy'),
      str(tmp_path / 'out.npy'),
    ],
    capture_output=True,
    text=True,
    cwd=tmp_path,
    check=False,
  )
  assert done.returncode == 0, done.stderr
  rows = ours['deploy'].shape[1]
  assert done.stdout.split('\n')[0] == (
    f"('cpu', 'cuda', 'tpu') (B, {SIZE}, {SIZE}, 3) (B, {rows}, {5 + len(NAMES)})"
  )
  got = np.load(tmp_path / 'out.npy')
  assert largest_difference(got, ours['deploy'], _scale(ours['model'])) < TOLERANCE


def test_summary_names_the_files_and_programs(workdir, ours):
  summary = json.loads((workdir / exporting.SUMMARY_FILE).read_text())
  assert summary['files'] == {
    'deploy': 'deploy',
    'onnx': 'model.onnx',
    'stablehlo': 'model.stablehlo',
  }
  assert summary['output']['shape'] == ['B', ours['deploy'].shape[1], 5 + len(NAMES)]
  assert summary['source']['entry'] == 'ema' and summary['class_names'] == list(NAMES)
  assert not [p for p in workdir.iterdir() if p.name.startswith('.export-')]


@pytest.mark.parametrize('name', ['w6', 'e6', 'd6', 'e6e'])
def test_deploy_model_files_equal_upstreams(name):
  training = model_yaml.load_config(CONFIG_DIR / f'yolov7-{name}.yaml')
  wanted = model_yaml.load_config(CONFIG_DIR.parent / 'deploy' / f'yolov7-{name}.yaml')
  derived = deploy.deploy_config(training)
  assert derived == wanted
  assert yaml.safe_load(deploy.config_text(derived)) == derived
  assert len(derived['backbone']) + len(derived['head']) == (
    len(training['backbone']) + len(training['head']) - 4
  )


def test_w6_deploy_model_builds_in_upstream_with_our_keys():
  training = yolo.build_model(model_yaml.load_config(CONFIG_DIR / 'yolov7-w6.yaml'))
  model, variables = deploy.deploy(training, assembly.zero_variables(training))
  derived = deploy.deploy_config(model_yaml.load_config(CONFIG_DIR / 'yolov7-w6.yaml'))
  assert yolo.build_model(derived).specs == model.specs
  state = convert.export_state_dict(model, variables)
  reference = Model(copy.deepcopy(derived)).state_dict()
  assert {k: tuple(v.shape) for k, v in reference.items()} == {
    k: tuple(np.shape(v)) for k, v in state.items()
  }


def _refused(capsys, argv, *, workdir) -> str:
  status = cli.main([*argv, '--workdir', str(workdir)])
  err = capsys.readouterr().err.strip()
  assert status == 2, err
  assert len(err.splitlines()) == 1 and err.startswith('error: '), err
  assert not workdir.exists()
  return err


@pytest.mark.parametrize(
  ('extra', 'message'),
  [
    (['--include', 'deploy,tflite'], "unknown format 'tflite'; known: deploy, onnx, stablehlo"),
    (['--include', 'stablehlo', '--platforms', 'cpu,metal'], "unknown platform 'metal'"),
    (['--img-size', '96'], '--img-size 96 is not a positive multiple of the model of --weights'),
  ],
)
def test_bad_options_are_refused(tmp_path, capsys, workdir, extra, message):
  argv = ['export', '--weights', str(workdir.parent / 'last.pt'), *extra]
  assert message in _refused(capsys, argv, workdir=tmp_path / 'out')


def test_deploy_weights_are_not_exported_again(tmp_path, capsys, workdir):
  argv = ['export', '--weights', str(workdir / 'deploy')]
  err = _refused(capsys, argv, workdir=tmp_path / 'out')
  assert '(deploy checkpoint of ours) has no auxiliary head, its model ends in Detect' in err


def test_missing_converter_names_what_to_install(tmp_path, capsys, monkeypatch, workdir):
  monkeypatch.setitem(sys.modules, 'jax2onnx', None)  # import jax2onnx raises ImportError
  argv = ['export', '--weights', str(workdir.parent / 'last.pt'), '--include', 'deploy,onnx']
  err = _refused(capsys, argv, workdir=tmp_path / 'out')
  assert '--include onnx needs jax2onnx and onnx' in err
  assert err.endswith("pip install 'reorg-jax[export]'")


def test_a_failed_export_leaves_nothing(tmp_path, capsys, monkeypatch, workdir):
  def fail(plan, path):
    raise RuntimeError('converter gave up')

  monkeypatch.setitem(exporting._WRITERS, exporting.Format.STABLEHLO, fail)
  out = tmp_path / 'out'
  argv = ['export', '--weights', str(workdir.parent / 'last.pt'), '--include', 'deploy,stablehlo']
  assert cli.main([*argv, '--workdir', str(out)]) == 1
  err = capsys.readouterr().err.strip()
  assert err == 'error: stablehlo: RuntimeError: converter gave up'
  assert not out.exists()


def test_training_a_deploy_model_is_refused(tmp_path, capsys, workdir):
  deploy_file = workdir / 'deploy' / weights.DEPLOY_MODEL
  common = ['--img-size', '128', '--no-compile-cache']
  err = _refused(capsys, ['train', '--model', str(deploy_file), *common], workdir=tmp_path / 'a')
  assert 'model.name is a deploy model (its last layer is Detect' in err
  err = _refused(
    capsys, ['train', '--weights', str(workdir / 'deploy'), *common], workdir=tmp_path / 'b'
  )
  assert 'is a deploy checkpoint' in err
