"""One optimiser step in upstream PyTorch and in JAX from the same weights and batch.

Upstream's model (built from our small YAML by upstream's own ``Model``), its
``ComputeLossAuxOTA`` and ``torch.optim.SGD`` with upstream's three parameter
groups take one step; our imported copy takes one :func:`reorg_jax.training.step.train_step`
with the same learning rates, momentum and weight decay. The updated weights and
BatchNorm statistics must agree.

Tolerance: the weight *updates* (new minus old) agree to 5e-3 relative in
norm per tensor and the new weights to 1e-5 absolute; float32 rounding in the
two frameworks' convolutions and reductions differs at about 1e-6 relative.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from sas_yolov7.models.common import ImplicitA, ImplicitM
from sas_yolov7.models.yolo import Model

import reorg_jax
from reorg_jax import testing
from reorg_jax.models import convert, yolo
from reorg_jax.reference import oracle
from reorg_jax.reference.models import flushed_denormals
from reorg_jax.training import assembly, optim
from reorg_jax.training import step as train

NUM_CLASSES, SIZE, BATCH = 3, 128, 2
LABELS = np.asarray(
  [
    [0, 0, 0.20, 0.25, 0.18, 0.22],
    [0, 2, 0.75, 0.70, 0.30, 0.25],
    [1, 1, 0.50, 0.45, 0.40, 0.50],
    [1, 0, 0.12, 0.85, 0.10, 0.12],
  ],
  np.float32,
)


def upstream_groups(model: torch.nn.Module):
  """Upstream's grouping: BN weights and implicit vectors, conv weights, biases."""
  no_decay, decay, biases = [], [], []
  for module in model.modules():
    if isinstance(getattr(module, 'bias', None), torch.nn.Parameter):
      biases.append(module.bias)
    if isinstance(module, torch.nn.BatchNorm2d):
      no_decay.append(module.weight)
    elif isinstance(getattr(module, 'weight', None), torch.nn.Parameter):
      decay.append(module.weight)
    if isinstance(module, ImplicitA | ImplicitM):
      no_decay.append(module.implicit)
  return no_decay, decay, biases


@pytest.fixture(scope='module')
def both_steps():
  raw = yolo.load_config(yolo.NANO_CONFIG)
  raw['nc'] = NUM_CLASSES
  torch.manual_seed(0)
  torch_model = Model(copy.deepcopy(raw)).train()
  model = yolo.p6_nano(num_classes=NUM_CLASSES)
  variables = convert.import_state_dict(model, torch_model.state_dict())

  schedule = optim.Schedule(epochs=1, batch_size=BATCH, steps_per_epoch=4)
  # One loss branch to compile (testing.ONE_BRANCH): no result changes.
  ours = assembly.assemble(
    model, image_size=SIZE, schedule=schedule, gains=testing.ONE_BRANCH, variables=variables
  )
  setup, state, loss_config = ours.setup, ours.state, ours.loss_config
  lrs, momentum = np.asarray([0.02, 0.01, 0.05]), 0.9
  decays = schedule.weight_decays

  images = np.random.default_rng(0).integers(0, 256, size=(BATCH, SIZE, SIZE, 3), dtype=np.uint8)
  targets = reorg_jax.Targets.from_yolo(LABELS, BATCH, 4, num_classes=NUM_CLASSES)

  # Upstream: forward, ComputeLossAuxOTA, SGD with three groups.
  torch_model.hyp = {
    'box': loss_config.box,
    'obj': loss_config.obj,
    'cls': loss_config.cls,
    'cls_pw': 1.0,
    'obj_pw': 1.0,
    'anchor_t': loss_config.anchor_t,
    'fl_gamma': 0.0,
  }
  torch_model.gr = 1.0
  compute_loss = oracle.reference_loss_module().ComputeLossAuxOTA(torch_model)
  no_decay, decay, biases = upstream_groups(torch_model)
  sgd = torch.optim.SGD(no_decay, lr=lrs[0], momentum=momentum, nesterov=True)
  sgd.add_param_group({'params': decay, 'lr': lrs[1], 'weight_decay': decays[1]})
  sgd.add_param_group({'params': biases, 'lr': lrs[2]})
  x = torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0)
  with flushed_denormals():
    outputs = torch_model(x)
    loss, items = compute_loss(outputs, torch.from_numpy(LABELS), x)
    sgd.zero_grad()
    loss.backward()
    sgd.step()
  torch_after = {k: v.detach().numpy().copy() for k, v in torch_model.state_dict().items()}

  # Ours: one train step with the same hyper-parameters.
  before = convert.export_state_dict(model, state.variables(use_ema=False))
  hparams = optim.HyperParams(
    step=np.asarray(0, np.int32),
    lrs=lrs.astype(np.float64),
    momentum=np.asarray(momentum, np.float64),
    accumulate=np.asarray(1, np.int32),
  )
  state, metrics = train.jit_train_step(setup)(
    state, {'images': images, 'targets': targets, 'hparams': hparams}
  )
  ours_after = convert.export_state_dict(model, state.variables(use_ema=False))
  return before, torch_after, ours_after, loss.item(), float(metrics['loss']), metrics


def test_loss_and_step_taken(both_steps):
  _, _, _, torch_loss, our_loss, metrics = both_steps
  assert bool(metrics['stepped']) and bool(metrics['finite'])
  np.testing.assert_allclose(our_loss, torch_loss, rtol=1e-4)


def test_updated_weights_agree(both_steps):
  before, torch_after, ours_after, *_ = both_steps
  checked = 0
  for key, want in torch_after.items():
    if key.endswith('num_batches_tracked') or key.endswith('anchors') or 'anchor_grid' in key:
      continue
    got = ours_after[key]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=key)
    delta_torch = want - before[key]
    norm = np.linalg.norm(delta_torch)
    if norm > 1e-6:
      rel = np.linalg.norm((got - before[key]) - delta_torch) / norm
      assert rel < 5e-3, (key, rel)
      checked += 1
  assert checked > 100, checked
