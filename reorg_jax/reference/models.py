"""Original YOLOv7 models with perturbed weights, for parity tests.

The original initialisation leaves batch-norm statistics at zero mean and unit
variance and the implicit layers near their identity, which would hide
layout mistakes in those tensors. :func:`perturbed_model` randomises every
batch-norm affine parameter and implicit tensor, sets the running statistics
from a forward pass over random images (so evaluation-mode activations stay in
a sensible range through a hundred layers) and then perturbs those too.

Batch-norm scales are drawn from ``U(0.2, 0.4)``. With scales near 1 these
randomly initialised networks of 100 to 260 layers are chaotic: rounding
differences grow with depth, and PyTorch's own float32 outputs land 3e-4 (W6)
to 2e-2 (D6) away from its float64 ones, so no float32 implementation could
match to 1e-4. With the smaller scales the float32 rounding differences stay
near 1e-5. Comparisons in float64 do not depend on this choice.
"""

from __future__ import annotations

import contextlib
import copy
import pathlib
from typing import Any

import numpy as np
import sas_yolov7
import torch
import yaml
from sas_yolov7.models.common import ImplicitA, ImplicitM
from sas_yolov7.models.yolo import Model

from reorg_jax.reference import oracle  # noqa: F401  (registers the torchvision stand-in)

CONFIG_DIR = pathlib.Path(sas_yolov7.__file__).parent / 'cfg' / 'training'


def upstream_config(name: str) -> dict[str, Any]:
  """The original training config ``yolov7-{name}.yaml`` as a mapping."""
  return yaml.safe_load((CONFIG_DIR / f'yolov7-{name}.yaml').read_text())


def perturbed_model(config: dict[str, Any], *, seed: int, calibration_size: int = 320) -> Model:
  """Builds the original model in training mode with every state tensor randomised."""
  torch.manual_seed(seed)
  model = Model(copy.deepcopy(config))
  norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.weight.uniform_(0.2, 0.4)
        module.bias.normal_(0.0, 0.2)
      elif isinstance(module, ImplicitA):
        module.implicit.normal_(0.0, 0.2)
      elif isinstance(module, ImplicitM):
        module.implicit.normal_(1.0, 0.2)
    for norm in norms:
      norm.momentum = 1.0
    model.train()
    with flushed_denormals():
      model(torch.rand(4, config.get('ch', 3), calibration_size, calibration_size))
    for norm in norms:
      norm.momentum = 0.03
      std = norm.running_var.sqrt()
      norm.running_mean.add_(0.1 * std * torch.randn_like(std))
      norm.running_var.mul_(torch.empty_like(std).uniform_(0.8, 1.25))
  return model


@contextlib.contextmanager
def flushed_denormals():
  """Flushes float32 denormals inside the block (XLA's CPU default), else SiLU tails crawl."""
  torch.set_flush_denormal(True)
  try:
    yield
  finally:
    torch.set_flush_denormal(False)


def torch_outputs(model: Model, images: np.ndarray) -> dict[str, Any]:
  """Evaluation then training forward of NHWC ``images``, in NumPy, in the model's dtype.

  Returns ``before`` (the state dict before), ``decoded`` ``[B, N, K]``
  (evaluation mode), ``heads`` (the ``2L`` training-mode outputs
  ``[B, A, H, W, K]``) and ``after`` (the state dict after the training step's
  running-average update). Leaves the model in training mode.
  """
  dtype = next(model.parameters()).dtype
  before = {k: v.detach().clone().numpy() for k, v in model.state_dict().items()}
  x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(dtype)
  with torch.no_grad(), flushed_denormals():
    model.eval()
    decoded = model(x)[0].numpy()
    model.train()
    heads = [h.numpy() for h in model(x)]
  after = {k: v.detach().clone().numpy() for k, v in model.state_dict().items()}
  return {'before': before, 'decoded': decoded, 'heads': heads, 'after': after}
