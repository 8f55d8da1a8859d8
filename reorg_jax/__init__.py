"""reorg-jax: YOLOv7 P6 training machinery in JAX/Flax."""

from reorg_jax.assigner import Assignment, CandidateCosts, assign, candidate_costs
from reorg_jax.config import LossConfig
from reorg_jax.convert import export_state_dict, import_state_dict, load_torch_state_dict
from reorg_jax.detect import IAuxDetect, decode
from reorg_jax.inference import Detections, predict
from reorg_jax.loss import aux_ota_loss
from reorg_jax.reorg import ReOrg, reorg
from reorg_jax.targets import Targets
from reorg_jax.yolo import YOLO, build_model, fuse, p6_nano

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
