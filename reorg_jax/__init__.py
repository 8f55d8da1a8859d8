"""reorg-jax: YOLOv7 P6 training machinery in JAX/Flax."""

from reorg_jax.assigner import Assignment, CandidateCosts, assign, candidate_costs
from reorg_jax.config import LossConfig
from reorg_jax.loss import aux_ota_loss
from reorg_jax.reorg import ReOrg, reorg
from reorg_jax.targets import Targets

__all__ = [
  'Assignment',
  'CandidateCosts',
  'candidate_costs',
  'LossConfig',
  'ReOrg',
  'Targets',
  'assign',
  'aux_ota_loss',
  'reorg',
]
