"""YOLOv7's lead-guided auxiliary OTA loss and its label assignment.

Glossary (the package's, see the README): ``B`` batch, ``L`` levels, ``A``
anchors per level, ``M`` max boxes per image, ``K = L * 5 * A * M`` candidate
slots per image, ``C`` classes.

The modules behind this API are private: :class:`LossConfig` (head geometry
and hyper-parameters), the slot layout every slot index goes through, the
dense reference assignment (:func:`assign`), the packed assignment the loss
runs on, and the loss with its custom gradient (:func:`aux_ota_loss`).
"""

from reorg_jax.loss._assign import Assignment, CandidateCosts, assign, candidate_costs
from reorg_jax.loss._config import P6_ANCHORS, P6_STRIDES, LossConfig, upstream_balance
from reorg_jax.loss._objective import aux_ota_loss

__all__ = [
  'P6_ANCHORS',
  'P6_STRIDES',
  'Assignment',
  'CandidateCosts',
  'LossConfig',
  'assign',
  'aux_ota_loss',
  'candidate_costs',
  'upstream_balance',
]
