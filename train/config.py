"""The program's configuration: the default file, overrides, and checks.

Defaults live in exactly one place, ``train/configs/default.yaml``. A run's
configuration is that file, deep-merged with an optional override file and
then with command-line overrides given as dotted keys (``train.epochs``).
Every key an override names must exist in the default file, so a typo is an
error rather than a silently ignored option.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml

DEFAULT_PATH = Path(__file__).resolve().parent / 'configs' / 'default.yaml'

# Options whose value must not change when a run is resumed.
FIXED_ON_RESUME = (
  'seed',
  'data.yaml',
  'synthetic',
  'model.name',
  'train.epochs',
  'train.batch_size',
  'train.image_size',
  'recipe',
  'augment',
  'loss',
)


class ConfigError(ValueError):
  """A configuration file or override is malformed or names an unknown option."""


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
  """A YAML mapping from ``path`` (an empty file gives ``{}``)."""
  path = Path(path)
  try:
    content = yaml.safe_load(path.read_text())
  except OSError as error:
    raise ConfigError(f'cannot read config {path}: {error}') from None
  except yaml.YAMLError as error:
    raise ConfigError(f'config {path} is not valid YAML: {error}') from None
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


def load(
  *, config_path: str | os.PathLike | None, overrides: dict[str, Any] | None
) -> dict[str, Any]:
  """The default configuration, then the file at ``config_path``, then ``overrides``.

  Args:
    config_path: an override YAML file, or ``None``.
    overrides: dotted keys to values (``None`` values are skipped: an
      option not given on the command line).

  Raises:
    ConfigError: unreadable files, unknown keys, or values of the wrong kind.
  """
  config = read_yaml(DEFAULT_PATH)
  if config_path is not None:
    config = merge(config, read_yaml(config_path))
  given = {k: v for k, v in (overrides or {}).items() if v is not None}
  config = merge(config, dotted(given))
  check(config)
  return config


def _positive_int(config: dict[str, Any], section: str, key: str, *, allow_none: bool = False):
  value = config[section][key]
  if value is None and allow_none:
    return
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ConfigError(f'{section}.{key} must be a positive integer, got {value!r}')


def check(config: dict[str, Any]) -> None:
  """Raises :class:`ConfigError` for values no run can use."""
  for section, key in (
    ('train', 'epochs'),
    ('train', 'batch_size'),
    ('train', 'image_size'),
    ('train', 'loader_threads'),
    ('train', 'prefetch'),
    ('eval', 'batch_size'),
    ('eval', 'max_detections'),
    ('eval', 'max_candidates'),
    ('checkpoint', 'save_every'),
    ('checkpoint', 'keep_last'),
    ('synthetic', 'num_train'),
    ('synthetic', 'num_val'),
    ('synthetic', 'image_size'),
  ):
    _positive_int(config, section, key)
  _positive_int(config, 'train', 'max_steps', allow_none=True)
  if config['train']['image_size'] % 64:
    raise ConfigError(
      f'train.image_size must be a multiple of 64 (the P6 models stride), '
      f'got {config["train"]["image_size"]}'
    )
  if config['checkpoint']['best_metric'] not in ('map50', 'map50_95'):
    raise ConfigError(
      f"checkpoint.best_metric must be 'map50' or 'map50_95', "
      f'got {config["checkpoint"]["best_metric"]!r}'
    )
  if config['model']['compute_dtype'] not in ('float32', 'bfloat16'):
    raise ConfigError(
      f"model.compute_dtype must be 'float32' or 'bfloat16', "
      f'got {config["model"]["compute_dtype"]!r}'
    )


def get(config: dict[str, Any], key: str) -> Any:
  """The value of a dotted ``key`` (``'train.epochs'``)."""
  value: Any = config
  for part in key.split('.'):
    value = value[part]
  return value


def resume_conflicts(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
  """The :data:`FIXED_ON_RESUME` options whose values differ, as ``'key: old -> new'``."""
  return [
    f'{key}: {get(saved, key)!r} -> {get(current, key)!r}'
    for key in FIXED_ON_RESUME
    if get(saved, key) != get(current, key)
  ]


def dump(config: dict[str, Any], path: str | os.PathLike) -> None:
  """Writes ``config`` as YAML (the resolved options of a run)."""
  Path(path).write_text(yaml.safe_dump(config, sort_keys=False))
