"""reorg-jax: YOLOv7 P6 training machinery in JAX/Flax.

Subpackages by role: :mod:`reorg_jax.models`, :mod:`reorg_jax.loss`,
:mod:`reorg_jax.data`, :mod:`reorg_jax.training`; shared types and helpers at
the top: :mod:`reorg_jax.boxes`, :mod:`reorg_jax.targets`,
:mod:`reorg_jax.evaluate`, :mod:`reorg_jax.testing`.
"""

from reorg_jax.loss import (
  Assignment,
  CandidateCosts,
  LossConfig,
  assign,
  aux_ota_loss,
  candidate_costs,
)
from reorg_jax.models.convert import export_state_dict, import_state_dict, load_torch_state_dict
from reorg_jax.models.detect import IAuxDetect, decode
from reorg_jax.models.inference import Detections, predict
from reorg_jax.models.reorg import ReOrg, reorg
from reorg_jax.models.yolo import YOLO, build_model, fuse, p6_nano
from reorg_jax.targets import Targets

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
