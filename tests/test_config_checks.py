"""Every option is checked before anything is written or trained; errors are one line, exit 2.

Nothing here trains: :func:`reorg_jax.program.config.load` is called directly, and
:func:`reorg_jax.program.commands.train.main` only with inputs that must fail before the run
directory is created (each test checks that it was not).
"""

from __future__ import annotations

import copy
import re

import pytest
import yaml

from reorg_jax.data import synthetic
from reorg_jax.models import yolo
from reorg_jax.program import config as config_lib
from reorg_jax.program import loop
from reorg_jax.program.commands import train as main


def _load(overrides=None, path=None):
  return config_lib.load(config_path=path, overrides=overrides or {})


@pytest.mark.parametrize(
  ('key', 'value', 'message'),
  [
    # The silently wrong ones of issue 12 (case 3 and case 4).
    ('train.image_size', 64, 'p6_nano predicts 255 boxes per image there, fewer than'),
    ('recipe.lr0', -0.04, 'lr0 must be > 0, got -0.04'),
    ('recipe.momentum', 5, r'momentum must lie in \[0, 1\), got 5'),
    ('recipe.lrf', -1, r'lrf is a fraction of lr0 and must lie in \[0, 1\], got -1'),
    ('recipe.weight_decay', -1, 'weight_decay must be >= 0, got -1'),
    ('loss.label_smoothing', 2, r'label_smoothing must lie in \[0, 1\], got 2'),
    ('loss.anchor_t', 0, 'anchor_t is a side ratio and must be > 1, got 0'),
    ('loss.box', -1, 'box is a loss weight and must be >= 0, got -1'),
    ('eval.iou_threshold', 5, r'eval.iou_threshold must lie in \[0, 1\], got 5'),
    ('eval.score_threshold', -1, r'eval.score_threshold must lie in \[0, 1\], got -1'),
    # The weak ones (a traceback before).
    ('augment.mosaic', 2.0, r'augment.mosaic: mosaic is a probability .* got 2.0'),
    ('augment.scale', -1, r'augment.scale: scale must lie in \[0, 1\) .* got -1'),
    ('recipe.warmup_epochs', -1, 'warmup_epochs must be >= 0, got -1'),
    ('seed', -1, r'seed must be an integer in \[0, 2\*\*32\), got -1'),
    ('loss.box', 'a', "loss.box must be a finite number, got 'a'"),
    ('seed', 'abc', "seed must be an integer, got 'abc'"),
    # Further ranges and types.
    ('recipe.lr0', float('nan'), 'recipe.lr0 must be a finite number, got nan'),
    ('loss.cls_pw', 0, 'cls_pw is a BCE positive weight and must be > 0, got 0'),
    (
      'train.image_size',
      100,
      "train.image_size must be a multiple of p6_nano's stride 64, got 100",
    ),
    ('eval.max_detections', 2000, 'must not exceed eval.max_candidates = 1024, got 2000'),
    ('synthetic.num_train', 4, 'must be at least train.batch_size = 8'),
    ('train.max_steps', 0, 'train.max_steps must be null or >= 1, got 0'),
    ('train.loader_workers', -1, 'train.loader_workers must be a non-negative integer, got -1'),
    ('train.loader_workers', 2, 'set with train.loader_threads = 2: use one of them'),
    ('data.yaml', 5, 'data.yaml must be null or a str, got 5'),
    ('log.plots', 'yes', "log.plots must be true or false, got 'yes'"),
    ('loss.capacity_fractions', 0.5, 'loss.capacity_fractions must be a list of finite numbers'),
    (
      'loss.capacity_fractions',
      [0.5, 1],
      r'capacity_fractions must lie in \(0, 1\), got \[0.5, 1\]',
    ),
    ('loss.batch_groups', 0, 'batch_groups must be >= 1, got 0'),
    ('model.name', 'nope.yaml', "model.name must be 'p6_nano' or a model YAML file"),
  ],
)
def test_bad_values_name_origin_key_and_value(tmp_path, key, value, message):
  section, leaf = key.split('.') if '.' in key else (None, key)
  path = tmp_path / 'bad.yaml'
  path.write_text(yaml.safe_dump({section: {leaf: value}} if section else {leaf: value}))
  with pytest.raises(config_lib.ConfigError, match=message) as error:
    _load(path=path)
  assert str(error.value).startswith(f'{path}: {key}')
  assert '\n' not in str(error.value)
  with pytest.raises(config_lib.ConfigError, match=message) as error:
    _load({key: value})
  assert str(error.value).startswith(f'command line: {key}')


def test_defaults_load_and_loss_defaults_live_in_loss_config():
  config = _load()
  named = config_lib.read_yaml(config_lib.DEFAULT_PATH)['loss']
  assert set(named) == {'cls'}  # the demo's one departure, explained in the file
  upstream = config_lib.loss_lib.LossConfig.p6(1)
  assert dict(config.loss) == {
    name: named.get(name, getattr(upstream, name)) for name in config_lib.LOSS_OPTIONS
  }
  assert config.loss['cls'] != upstream.cls
  written = {k: tuple(v) if isinstance(v, list) else v for k, v in config.options['loss'].items()}
  assert written == dict(config.loss)  # config.yaml's lists are the loss's tuples
  # The resume check still sees the gains: a changed gain is a conflict. The speed settings
  # change no result, so a resumed run may change them.
  changed = copy.deepcopy(config.options)
  changed['loss']['box'] = 0.1
  changed['loss']['capacity_fractions'] = []
  changed['loss']['batch_groups'] = 1
  assert config_lib.resume_conflicts(config.options, changed) == ['loss.box: 0.05 -> 0.1']


def test_loss_speed_settings_reach_the_loss_as_tuples(tmp_path):
  path = tmp_path / 'flat.yaml'
  path.write_text(yaml.safe_dump({'loss': {'capacity_fractions': [0.25], 'batch_groups': 1}}))
  config = _load(path=path)
  assert config.loss['capacity_fractions'] == (0.25,) and config.loss['batch_groups'] == 1
  assert config.options['loss']['capacity_fractions'] == [0.25]  # as config.yaml writes it
  model = yolo.p6_nano(num_classes=6)
  built = config_lib.assembly.loss_config(model, image_size=256, gains=config.loss)
  assert built.capacity_fractions == (0.25,) and built.batch_groups == 1
  hash(built)  # a static argument of the jitted step
  defaults = _load().loss
  assert defaults['capacity_fractions'] == config_lib.loss_lib.LossConfig.p6(1).capacity_fractions


def test_unknown_keys_name_the_file(tmp_path):
  path = tmp_path / 'typo.yaml'
  path.write_text('loss:\n  boxx: 1\n')
  with pytest.raises(config_lib.ConfigError, match=f"{path}: unknown option 'loss.boxx'"):
    _load(path=path)


def test_smaller_image_fits_when_evaluation_keeps_fewer_detections():
  config = _load({'train.image_size': 64, 'eval.max_detections': 255})
  model = config_lib.build_model(config.model.name)
  assert config_lib.boxes_per_image(model, image_size=64) == 255


@pytest.fixture(scope='module')
def model_files(tmp_path_factory):
  """Broken copies of the nano model file, by name."""
  root = tmp_path_factory.mktemp('models')
  good = yaml.safe_load(yolo.NANO_CONFIG.read_text())
  files = {}

  def write(name, content):
    files[name] = root / f'{name}.yaml'
    files[name].write_text(content if isinstance(content, str) else yaml.safe_dump(content))

  unsupported = copy.deepcopy(good)
  unsupported['backbone'][3] = [-1, 1, 'RepConv', [64, 3, 1]]
  write('unsupported', unsupported)
  write('missing', {k: v for k, v in good.items() if k != 'anchors'})
  bad_argument = copy.deepcopy(good)
  bad_argument['backbone'][1][3] = ['wide', 3, 1]
  write('bad_argument', bad_argument)
  write('invalid', 'nc: 3\nbackbone: [[-1, 1, Conv\n')
  write('bad_depth', {**good, 'depth_multiple': 'deep'})
  return files


@pytest.mark.parametrize(
  ('name', 'message'),
  [
    ('unsupported', r"layer 3 .*module 'RepConv' is not supported"),
    ('missing', r"model config lacks \['anchors'\]"),
    ('bad_argument', r"layer 1 .*argument features='wide' must be"),
    ('invalid', r"expected ',' or ']', but got '<stream end>'"),
    ('bad_depth', "depth_multiple must be a positive number, got 'deep'"),
  ],
)
def test_model_file_errors_name_the_file(model_files, tmp_path, capsys, name, message):
  path = model_files[name]
  with pytest.raises(config_lib.ConfigError, match=message) as error:
    _load({'model.name': str(path)})
  assert str(error.value).startswith(f'command line: model.name: {path}:')
  workdir = tmp_path / 'run'
  assert main.main(['--model', str(path), '--workdir', str(workdir)]) == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and str(path) in err and 'Traceback' not in err
  assert not workdir.exists()


@pytest.fixture(scope='module')
def small_dataset(tmp_path_factory):
  """A dataset of 4 training images: fewer than the default batch of 8."""
  root = tmp_path_factory.mktemp('small')
  return synthetic.write_dataset(root / 'data', num_train=4, num_val=2, image_size=64, seed=0)


def test_dataset_smaller_than_a_batch_is_refused_before_writing(small_dataset, tmp_path, capsys):
  workdir = tmp_path / 'run'
  assert main.main(['--data', str(small_dataset), '--workdir', str(workdir)]) == 2
  err = capsys.readouterr().err.strip()
  assert err == (
    f'error: {small_dataset}: the train split has 4 images, fewer than train.batch_size = 8 '
    '(every batch is full); lower train.batch_size'
  )
  assert not workdir.exists()


@pytest.mark.parametrize(
  ('argv', 'message'),
  [
    (['--seed', '-1'], r'command line: seed must be an integer in \[0, 2\*\*32\), got -1'),
    (['--image-size', '64'], 'command line: train.image_size is too small for evaluation'),
    (['--batch-size', '0'], 'command line: train.batch_size must be a positive integer, got 0'),
  ],
)
def test_main_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, argv, message):
  workdir = tmp_path / 'run'
  assert main.main([*argv, '--workdir', str(workdir)]) == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and err.startswith('error: ')
  assert re.search(message, err)
  assert not workdir.exists()


def test_run_checks_the_dataset_size_itself(small_dataset, tmp_path):
  """``loop.run`` called without ``main`` refuses the small dataset before creating anything."""
  config = _load({'data.yaml': str(small_dataset)})
  with pytest.raises(config_lib.ConfigError, match='fewer than train.batch_size = 8'):
    loop.run(config, workdir=tmp_path / 'run', resume=False)
  assert not (tmp_path / 'run').exists()
