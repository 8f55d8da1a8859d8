"""reorg-jax: YOLOv7 P6 training machinery in JAX/Flax.

Subpackages by role: :mod:`reorg_jax.models`, :mod:`reorg_jax.loss`,
:mod:`reorg_jax.data`, :mod:`reorg_jax.training`; shared types and helpers at
the top: :mod:`reorg_jax.boxes`, :mod:`reorg_jax.targets`,
:mod:`reorg_jax.evaluate`, :mod:`reorg_jax.testing`.
"""

import importlib
from typing import Any

# Name -> the module defining it. Imported on first use (PEP 562), so that
# ``import reorg_jax.program.cli`` (the installed command) is quick and can take
# over Ctrl-C before jax is imported.
_ORIGINS = {
  'Assignment': 'reorg_jax.loss',
  'CandidateCosts': 'reorg_jax.loss',
  'LossConfig': 'reorg_jax.loss',
  'assign': 'reorg_jax.loss',
  'aux_ota_loss': 'reorg_jax.loss',
  'candidate_costs': 'reorg_jax.loss',
  'export_state_dict': 'reorg_jax.models.convert',
  'import_state_dict': 'reorg_jax.models.convert',
  'load_torch_state_dict': 'reorg_jax.models.convert',
  'IAuxDetect': 'reorg_jax.models.detect',
  'decode': 'reorg_jax.models.detect',
  'Detections': 'reorg_jax.models.inference',
  'predict': 'reorg_jax.models.inference',
  'ReOrg': 'reorg_jax.models.reorg',
  'reorg': 'reorg_jax.models.reorg',
  'YOLO': 'reorg_jax.models.yolo',
  'build_model': 'reorg_jax.models.yolo',
  'fuse': 'reorg_jax.models.yolo',
  'p6_nano': 'reorg_jax.models.yolo',
  'Targets': 'reorg_jax.targets',
}


def __getattr__(name: str) -> Any:
  origin = _ORIGINS.get(name)
  if origin is None:
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
  value = getattr(importlib.import_module(origin), name)
  globals()[name] = value
  return value


def __dir__() -> list[str]:
  return sorted({*globals(), *_ORIGINS})


__all__ = [
  'YOLO',
  'Assignment',
  'CandidateCosts',
  'Detections',
  'IAuxDetect',
  'LossConfig',
  'ReOrg',
  'Targets',
  'assign',
  'aux_ota_loss',
  'build_model',
  'candidate_costs',
  'decode',
  'export_state_dict',
  'fuse',
  'import_state_dict',
  'load_torch_state_dict',
  'p6_nano',
  'predict',
  'reorg',
]
