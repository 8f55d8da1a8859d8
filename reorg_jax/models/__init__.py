"""The P6 model family: layers, the IAuxDetect head, the YAML builder, presets,
PyTorch weight conversion and inference.

Modules: :mod:`~reorg_jax.models.reorg` (ReOrg), :mod:`~reorg_jax.models.layers`
(Linen layers), :mod:`~reorg_jax.models.detect` (the IAuxDetect training head,
the IDetect deploy head, their decode),
:mod:`~reorg_jax.models.from_yaml` (upstream's model YAML to layer specs),
:mod:`~reorg_jax.models.yolo` (the model and its presets, YAML files under
``configs/``), :mod:`~reorg_jax.models.convert` (``state_dict`` import and
export), :mod:`~reorg_jax.models.torch_save` (``state_dict`` files written
without PyTorch), :mod:`~reorg_jax.models.deploy` (the reparameterisation of
a trained model for deployment), :mod:`~reorg_jax.models.inference` (decode +
NMS on static shapes).
"""

from reorg_jax.models.convert import export_state_dict, import_state_dict, load_torch_state_dict
from reorg_jax.models.detect import IAuxDetect, IDetect
from reorg_jax.models.inference import Detections, predict
from reorg_jax.models.reorg import ReOrg
from reorg_jax.models.yolo import YOLO, build_model, fuse, p6_nano

__all__ = [
  'YOLO',
  'Detections',
  'IAuxDetect',
  'IDetect',
  'ReOrg',
  'build_model',
  'export_state_dict',
  'fuse',
  'import_state_dict',
  'load_torch_state_dict',
  'p6_nano',
  'predict',
]
