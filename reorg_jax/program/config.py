"""The program's configuration: the default file, overrides, and checks.

Defaults live in exactly one place: ``configs/default.yaml`` (package data of
:mod:`reorg_jax.program`) for the program's options, :class:`reorg_jax.LossConfig`
for the loss gains (the ``loss`` section, :data:`LOSS_OPTIONS`, is filled from
its field defaults, upstream's values; ``default.yaml`` names only the gains
the demo changes, each with its reason). A run's configuration is those
defaults (on ``--resume``, the run's own options that may not change over them),
deep-merged with an optional override file and then with command-line overrides given as dotted keys
(``train.epochs``). Every key an override names must exist in the defaults,
so a typo is an error rather than a silently ignored option.

:func:`load` checks every value before anything runs: its type (that of its
default), its range (the ``recipe``, ``augment`` and ``loss`` sections are
built into :class:`reorg_jax.training.optim.RecipeConfig`,
:class:`reorg_jax.data.augment.AugmentConfig` and :class:`reorg_jax.LossConfig`,
whose own checks apply), and the constraints between options that the
configuration alone decides. A failure is one :class:`ConfigError` line
naming where the value came from (a file, or the command line), the dotted
key and the value. The checked mapping is then resolved once into typed
sections (:class:`reorg_jax.program.sections.RunConfig`), file paths made
absolute.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from reorg_jax import loss as loss_lib
from reorg_jax import yaml_file
from reorg_jax.data import augment
from reorg_jax.models import yolo
from reorg_jax.models.detect import IAuxDetect
from reorg_jax.program.sections import RunConfig, resolve
from reorg_jax.training import assembly, optim

__all__ = [
  'DEFAULT_PATH',
  'FIXED_ON_RESUME',
  'LOSS_OPTIONS',
  'LOSS_SPEED_OPTIONS',
  'NULLABLE',
  'ConfigError',
  'boxes_per_image',
  'build_model',
  'check',
  'check_model',
  'defaults',
  'dotted',
  'dump',
  'flatten',
  'get',
  'load',
  'merge',
  'read_yaml',
  'resume_conflicts',
]

DEFAULT_PATH = Path(__file__).resolve().parent / 'configs' / 'default.yaml'

# The LossConfig fields that are options of the program (the ``loss`` section): the gains,
# and the two speed settings of the loss, which trade the step's compile time against its
# run time and change no result.
LOSS_SPEED_OPTIONS = ('capacity_fractions', 'batch_groups')
LOSS_OPTIONS = (*assembly.GAIN_FIELDS, *LOSS_SPEED_OPTIONS)

# Options whose value must not change when a run is resumed.
FIXED_ON_RESUME = (
  'seed',
  'data.yaml',
  'synthetic',
  'model.name',
  'train.epochs',
  'train.batch_size',
  'train.image_size',
  'train.freeze',
  'recipe',
  'augment',
  *(f'loss.{name}' for name in assembly.GAIN_FIELDS),  # the speed settings may change
)

# Options that name files (made absolute by :func:`load`).
_PATHS = ('data.yaml', 'model.name')

# Options whose default is null, and the type they take otherwise.
NULLABLE = {'data.yaml': str, 'train.max_steps': int}


class ConfigError(ValueError):
  """A configuration file or override is malformed or names an unknown option."""


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
  """A YAML mapping from ``path`` (an empty file gives ``{}``)."""
  path = Path(path)
  try:
    content = yaml_file.read(path)
  except yaml_file.YamlFileError as error:
    raise ConfigError(str(error)) from None
  if content is None:
    return {}
  if not isinstance(content, dict):
    raise ConfigError(f'config {path} must be a mapping of options, got {type(content).__name__}')
  return content


def merge(base: dict[str, Any], override: dict[str, Any], *, where: str = '') -> dict[str, Any]:
  """``base`` with ``override``'s values, recursively; unknown keys raise :class:`ConfigError`."""
  merged = copy.deepcopy(base)
  for key, value in override.items():
    name = f'{where}{key}'
    if key not in base:
      known = ', '.join(sorted(base))
      raise ConfigError(f'unknown option {name!r} (known here: {known})')
    if isinstance(base[key], dict):
      if not isinstance(value, dict):
        raise ConfigError(f'option {name!r} is a section and needs a mapping, got {value!r}')
      merged[key] = merge(base[key], value, where=f'{name}.')
    else:
      merged[key] = value
  return merged


def dotted(overrides: dict[str, Any]) -> dict[str, Any]:
  """``{'train.epochs': 3}`` as the nested ``{'train': {'epochs': 3}}``."""
  nested: dict[str, Any] = {}
  for key, value in overrides.items():
    *sections, leaf = key.split('.')
    target = nested
    for section in sections:
      target = target.setdefault(section, {})
    target[leaf] = value
  return nested


def defaults() -> dict[str, Any]:
  """Every option with its default: ``default.yaml``, its ``loss`` options over LossConfig's.

  A tuple default of LossConfig is a list here, as YAML writes and reads it.
  """
  config = read_yaml(DEFAULT_PATH)
  fields = {
    field.name: list(field.default) if isinstance(field.default, tuple) else field.default
    for field in dataclasses.fields(loss_lib.LossConfig)
  }
  changed = config.pop('loss', None) or {}
  unknown = sorted(set(changed) - set(LOSS_OPTIONS))
  if unknown:
    raise ConfigError(f'{DEFAULT_PATH}: loss.{unknown[0]} is not an option')
  config['loss'] = {name: changed.get(name, fields[name]) for name in LOSS_OPTIONS}
  return config


def flatten(tree: dict[str, Any], *, where: str = '') -> dict[str, Any]:
  """``{'train': {'epochs': 3}}`` as ``{'train.epochs': 3}``."""
  flat: dict[str, Any] = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(flatten(value, where=f'{where}{key}.'))
    else:
      flat[f'{where}{key}'] = value
  return flat


def load(
  *,
  config_path: str | os.PathLike | None,
  overrides: dict[str, Any] | None,
  saved: str | os.PathLike | None = None,
) -> RunConfig:
  """The defaults, then ``saved``, then the file at ``config_path``, then ``overrides``.

  Checked, then resolved into typed sections.

  Args:
    config_path: an override YAML file, or ``None``.
    saved: the ``config.yaml`` of a run being resumed, or ``None``: its
      :data:`FIXED_ON_RESUME` options become the base, so a resume needs none
      of them repeated (the others, such as ``train.max_steps``, are the
      invocation's own).
    overrides: dotted keys to values (``None`` values are skipped: an
      option not given on the command line).

  Raises:
    ConfigError: unreadable files, unknown keys, values of the wrong type or
      out of range (see :func:`check`).
  """
  config = defaults()
  origins = dict.fromkeys(flatten(config), 'the defaults')
  if saved is not None:  # the options a resume may not change; the others are per invocation
    content = dotted(
      {
        key: value
        for key, value in flatten(read_yaml(saved)).items()
        if any(key == fixed or key.startswith(f'{fixed}.') for fixed in FIXED_ON_RESUME)
      }
    )
    try:
      config = merge(config, content)
    except ConfigError as error:
      raise ConfigError(f'{saved}: {error}') from None
    origins.update(dict.fromkeys(flatten(content), str(saved)))
  if config_path is not None:
    content = read_yaml(config_path)
    try:
      config = merge(config, content)
    except ConfigError as error:
      raise ConfigError(f'{config_path}: {error}') from None
    origins.update(dict.fromkeys(flatten(content), str(config_path)))
  given = {k: v for k, v in (overrides or {}).items() if v is not None}
  try:
    config = merge(config, dotted(given))
  except ConfigError as error:
    raise ConfigError(f'command line: {error}') from None
  origins.update(dict.fromkeys(given, 'command line'))
  check(config, origins=origins)
  model = build_model(config['model']['name'], origin=origins.get('model.name', 'config'))
  check_model(config, model, origins=origins)
  # Files as absolute paths: the run directory's config.yaml then names them from anywhere.
  for section, key in (path.split('.') for path in _PATHS):
    if config[section][key] not in (None, 'p6_nano'):
      config[section][key] = str(Path(config[section][key]).resolve())
  return resolve(config)


def build_model(name: str, *, num_classes: int | None = None, origin: str = 'config') -> yolo.YOLO:
  """The model ``model.name`` names (``'p6_nano'`` or a model YAML file).

  Args:
    name: ``'p6_nano'`` or the path of a model YAML.
    num_classes: ``C``; ``None`` keeps the model's own (enough for its geometry).
    origin: where ``name`` came from (a file, the command line), for the message.

  Raises:
    ConfigError: neither ``'p6_nano'`` nor a readable, valid model file (the
      file's problem is named).
  """
  if name == 'p6_nano':
    return yolo.p6_nano(num_classes=num_classes)
  if not Path(name).is_file():
    raise ConfigError(
      f"{origin}: model.name must be 'p6_nano' or a model YAML file, got {name!r} (no such file)"
    )
  try:
    return yolo.build_model(Path(name), num_classes=num_classes)
  except ValueError as error:
    raise ConfigError(f'{origin}: model.name: {error}') from None


def boxes_per_image(model: yolo.YOLO, *, image_size: int) -> int:
  """``R``: the boxes (decoded rows) ``model`` predicts on a square ``image_size`` input."""
  anchors = len(model.anchors[0])
  return sum(anchors * (image_size // stride) ** 2 for stride in model.strides)


def check_model(
  config: dict[str, Any], model: yolo.YOLO, *, origins: dict[str, str] | None = None
) -> None:
  """Raises :class:`ConfigError` when ``model`` does not train or the image size does not suit it.

  The model must end in the training head (``IAuxDetect``; a deploy model's
  ``Detect`` or ``IDetect`` head has no auxiliary outputs to train), the side
  must be a multiple of the model's largest stride, and the model must
  predict at least ``eval.max_detections`` boxes per image at it.
  """
  checker = _Checker(config, origins)
  size, stride = config['train']['image_size'], model.max_stride
  name = config['model']['name']
  checker.require(
    'model.name',
    lambda _: model.head.module is IAuxDetect,
    f'is a deploy model (its last layer is {model.head.name}, without the auxiliary head), '
    'which does not train: give its training model file, ending in IAuxDetect',
  )
  checker.require(
    'train.image_size', lambda v: v % stride == 0, f"must be a multiple of {name}'s stride {stride}"
  )
  boxes = boxes_per_image(model, image_size=size)
  detections = config['eval']['max_detections']
  checker.require(
    'train.image_size',
    lambda _: boxes >= detections,
    f'is too small for evaluation: {name} predicts {boxes} boxes per image there, fewer than '
    f'eval.max_detections = {detections} (raise the size or lower eval.max_detections)',
  )


class _Checker:
  """Raises :class:`ConfigError` lines ``'<origin>: <key> <reason>, got <value>'``."""

  def __init__(self, config: dict[str, Any], origins: dict[str, str] | None):
    self.config = config
    self.origins = origins or {}

  def fail(self, key: str, reason: str) -> ConfigError:
    origin = self.origins.get(key, 'config')
    return ConfigError(f'{origin}: {key} {reason}, got {get(self.config, key)!r}')

  def fail_with(self, key: str, error: Exception) -> ConfigError:
    """A library check's message (which names the value) under the option's origin and key."""
    origin = self.origins.get(key, 'config')
    return ConfigError(f'{origin}: {key}: {error}')

  def require(self, key: str, ok: Callable[[Any], bool], reason: str) -> None:
    if not ok(get(self.config, key)):
      raise self.fail(key, reason)

  def build(self, section: str, make: Callable[..., Any], keys: tuple[str, ...]) -> Any:
    """``make(**options)``, first with each option alone so a failure names its key."""
    options = {key: self.config[section][key] for key in keys}
    for key, value in options.items():
      try:
        make(**{key: value})
      except (TypeError, ValueError) as error:
        raise self.fail_with(f'{section}.{key}', error) from None
    try:
      return make(**options)
    except (TypeError, ValueError) as error:
      origins = sorted({self.origins.get(f'{section}.{key}', 'config') for key in keys})
      raise ConfigError(f'{", ".join(origins)}: {section}: {error}') from None


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_types(checker: _Checker, reference: dict[str, Any]) -> None:
  """Each option has the type of its default (a float option takes integers too)."""
  for key, default in flatten(reference).items():
    value = get(checker.config, key)
    if key in NULLABLE:
      kind = NULLABLE[key]
      if value is not None and not (_is_int(value) if kind is int else isinstance(value, kind)):
        raise checker.fail(key, f'must be null or a {kind.__name__}')
    elif isinstance(default, bool):
      checker.require(key, lambda v: isinstance(v, bool), 'must be true or false')
    elif isinstance(default, int):
      checker.require(key, _is_int, 'must be an integer')
    elif isinstance(default, float):
      checker.require(key, _is_number, 'must be a finite number')
    elif isinstance(default, str):
      checker.require(key, lambda v: isinstance(v, str), 'must be a string')
    elif isinstance(default, list):
      checker.require(
        key,
        lambda v: isinstance(v, (list, tuple)) and all(_is_number(x) for x in v),
        'must be a list of finite numbers',
      )


def check(config: dict[str, Any], *, origins: dict[str, str] | None = None) -> None:
  """Raises :class:`ConfigError` for values no run can use.

  Args:
    config: the merged configuration.
    origins: dotted key -> where its value came from (a file, the command
      line), for the message.
  """
  checker = _Checker(config, origins)
  _check_types(checker, defaults())
  for key in (
    'train.epochs',
    'train.batch_size',
    'train.image_size',
    'train.loader_threads',
    'train.prefetch',
    'eval.batch_size',
    'eval.max_detections',
    'eval.max_candidates',
    'checkpoint.save_every',
    'checkpoint.keep_last',
    'log.every_steps',
    'synthetic.num_train',
    'synthetic.num_val',
    'synthetic.image_size',
  ):
    checker.require(key, lambda v: v >= 1, 'must be a positive integer')
  checker.require('train.loader_workers', lambda v: v >= 0, 'must be a non-negative integer')
  checker.require('train.freeze', lambda v: v >= 0, 'must be a non-negative integer')
  if config['train']['loader_workers'] and config['train']['loader_threads'] > 1:
    raise checker.fail(
      'train.loader_workers',
      f'set with train.loader_threads = {config["train"]["loader_threads"]}: use one of them '
      '(set loader_threads to 1)',
    )
  checker.require('train.max_steps', lambda v: v is None or v >= 1, 'must be null or >= 1')
  for key in ('seed', 'synthetic.seed'):
    checker.require(key, lambda v: 0 <= v < 2**32, 'must be an integer in [0, 2**32)')
  for key in ('eval.score_threshold', 'eval.iou_threshold'):
    checker.require(key, lambda v: 0.0 <= v <= 1.0, 'must lie in [0, 1]')
  detections, candidates = config['eval']['max_detections'], config['eval']['max_candidates']
  if detections > candidates:
    raise checker.fail('eval.max_detections', f'must not exceed eval.max_candidates = {candidates}')
  checker.require(
    'checkpoint.best_metric', lambda v: v in ('map50', 'map50_95'), "must be 'map50' or 'map50_95'"
  )
  checker.require(
    'model.compute_dtype',
    lambda v: v in ('float32', 'bfloat16'),
    "must be 'float32' or 'bfloat16'",
  )
  remats = [policy.value for policy in yolo.Remat]
  checker.require('train.remat', lambda v: v in remats, f'must be one of {remats}')
  if config['data']['yaml'] is None:
    batch = config['train']['batch_size']
    checker.require(
      'synthetic.num_train',
      lambda v: v >= batch,
      f'must be at least train.batch_size = {batch} (every batch is full)',
    )
  recipe_keys = tuple(field.name for field in dataclasses.fields(optim.RecipeConfig))
  checker.build('recipe', optim.RecipeConfig, recipe_keys)
  augment_keys = tuple(field.name for field in dataclasses.fields(augment.AugmentConfig))
  checker.build('augment', augment.AugmentConfig, augment_keys)
  geometry = {
    'num_classes': 1,
    'anchors': loss_lib.P6_ANCHORS,
    'strides': loss_lib.P6_STRIDES,
    'balance': loss_lib.upstream_balance(len(loss_lib.P6_STRIDES)),
  }
  checker.build('loss', lambda **gains: loss_lib.LossConfig(**geometry, **gains), LOSS_OPTIONS)


def get(config: dict[str, Any], key: str) -> Any:
  """The value of a dotted ``key`` (``'train.epochs'``)."""
  value: Any = config
  for part in key.split('.'):
    value = value[part]
  return value


def resume_conflicts(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
  """The :data:`FIXED_ON_RESUME` options whose values differ, as ``'key: old -> new'``.

  An option the saved run does not name (it was written before the option
  existed) counts with its default; its file paths count as absolute.
  """
  reference = defaults()

  def saved_value(key: str) -> Any:
    try:
      value = get(saved, key)
    except (KeyError, TypeError):
      return get(reference, key)
    if key in _PATHS and value not in (None, 'p6_nano'):  # written relative by earlier versions
      return str(Path(value).resolve())
    return value

  return [
    f'{key}: {saved_value(key)!r} -> {get(current, key)!r}'
    for key in FIXED_ON_RESUME
    if saved_value(key) != get(current, key)
  ]


def dump(config: dict[str, Any], path: str | os.PathLike) -> None:
  """Writes ``config`` as YAML (the resolved options of a run), atomically.

  The text goes to ``<path>.tmp`` first and replaces ``path`` once complete,
  so a full disk never leaves a truncated file behind.
  """
  path = Path(path)
  partial = path.with_name(path.name + '.tmp')
  try:
    partial.write_text(yaml.safe_dump(config, sort_keys=False))
    os.replace(partial, path)
  finally:
    partial.unlink(missing_ok=True)
