"""Upstream's ``train_aux.py`` training loop around the reference package, for comparisons.

The other framework of every cross-framework training comparison:
``reorg-jax verify`` and :mod:`reorg_jax.reference.step_check`,
``benchmarks/train_vs_upstream.py`` and ``benchmarks/trained_step.py``.
``train_aux.py`` is not in the reference package (``sas-yolov7``), so its
loop is written here from its formulas, around the package's own ``Model``,
``ComputeLossAuxOTA`` and ``ModelEMA`` and torch's ``SGD`` and
``LambdaLR``:

* loss gains: ``hyp.scratch.p6.yaml`` with the run's ``recipe`` and ``loss``
  values on top, then ``box *= 3 / nl``, ``cls *= nc / 80 * 3 / nl``,
  ``obj *= (imgsz / 640) ** 2 * 3 / nl``; ``model.gr = 1``;
* optimiser: Nesterov ``SGD`` over three groups (pg0: BatchNorm weights and
  implicit vectors; pg1: other weights, with weight decay scaled by
  ``batch * accumulate / nbs``; pg2: biases) and ``LambdaLR`` with the
  one-cycle factor ``((1 - cos(epoch * pi / epochs)) / 2) * (lrf - 1) + 1``,
  stepped after each epoch;
* warm-up over ``nw = max(round(warmup_epochs * nb), min_warmup_steps)``
  iterations: per group ``lr = interp(ni, [0, nw], [warmup_bias_lr if pg2
  else 0, initial_lr * lf(epoch)])``, ``momentum = interp(ni, [0, nw],
  [warmup_momentum, momentum])``, ``accumulate = max(1, round(interp(ni,
  [0, nw], [1, nbs / batch])))``;
* gradients zeroed at each epoch start; ``loss.backward()`` on the batch-sum
  loss; an optimiser step and an EMA update when ``ni % accumulate == 0``.

A run can hand out its whole state at an iteration (``snapshot_at``: the
weights, BatchNorm statistics, EMA and its update count, the momentum
buffers and any gradient accumulated so far, as :func:`snapshot` arrays)
and another run can continue from such a state (``resume``), taking the
steps the first would have taken: :func:`train` restores the learning-rate
schedule's epoch, and the warm-up sets the rates, momentum and
accumulation count of each iteration from ``ni`` alone.

Where the run's configuration departs from ``train_aux.py``'s constants
(``nbs = 64``, at least 1000 warm-up iterations, the EMA's ramp of 2000
updates and its decay) the run's values are used, so both frameworks follow
one recipe. The images and labels come from the caller's loader (the same
batches our side trains on); float32 denormals are flushed, as XLA does on
CPU. Glossary: ``nb`` batches per epoch, ``ni`` global iteration, ``nl``
levels.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import pathlib
import time
import warnings
from typing import Any

import numpy as np

from reorg_jax.program.sections import RunConfig
from reorg_jax.training import assembly

# The auxiliary head's share of the loss, written into upstream's ComputeLossAuxOTA.
UPSTREAM_AUX_WEIGHT = 0.25

__all__ = [
  'UPSTREAM_AUX_WEIGHT',
  'UpstreamRun',
  'evaluate',
  'hyperparameters',
  'parameter_groups',
  'restore',
  'snapshot',
  'train',
]


@dataclasses.dataclass
class UpstreamRun:
  """What :func:`train` returns.

  Attributes:
    steps: per iteration ``step, epoch, loss, box, obj, cls, lr`` (``lr`` of pg1).
    epochs: per whole epoch ``epoch, step`` and the EMA's validation metrics.
    raw: the final state dict (NumPy).
    ema: the EMA's final state dict (NumPy).
    seconds: wall time of training and evaluation.
    snapshot: the state at iteration ``snapshot_at`` (:func:`snapshot`), or
      ``None``.
  """

  steps: list[dict[str, float]]
  epochs: list[dict[str, float]]
  raw: dict[str, np.ndarray]
  ema: dict[str, np.ndarray]
  seconds: float
  snapshot: dict[str, np.ndarray] | None = None


def hyperparameters(config: RunConfig, *, num_levels: int, num_classes: int) -> dict[str, float]:
  """``hyp.scratch.p6.yaml`` with the run's recipe and loss values, scaled as ``train_aux.py``.

  Raises:
    ValueError: ``loss.aux_weight`` is not upstream's fixed 0.25.
  """
  import sas_yolov7
  import yaml

  path = pathlib.Path(sas_yolov7.__file__).parent / 'data' / 'hyp.scratch.p6.yaml'
  hyp = yaml.safe_load(path.read_text())
  recipe = dataclasses.asdict(config.recipe)
  for key in (
    'lr0',
    'lrf',
    'momentum',
    'weight_decay',
    'warmup_epochs',
    'warmup_momentum',
    'warmup_bias_lr',
  ):
    hyp[key] = recipe[key]
  # The gains only: the loss's speed settings are ours and change no result.
  loss = {name: config.loss[name] for name in assembly.GAIN_FIELDS}
  if loss.pop('aux_weight') != UPSTREAM_AUX_WEIGHT:
    raise ValueError(
      f"loss.aux_weight = {config.loss['aux_weight']}: upstream's ComputeLossAuxOTA fixes "
      f"the auxiliary head's weight at {UPSTREAM_AUX_WEIGHT}, so it cannot train this run"
    )
  hyp.update(loss)
  size = config.train.image_size
  hyp['box'] *= 3.0 / num_levels
  hyp['cls'] *= num_classes / 80.0 * 3.0 / num_levels
  hyp['obj'] *= (size / 640) ** 2 * 3.0 / num_levels
  return hyp


def parameter_groups(model: Any) -> tuple[list, list, list]:
  """pg0 (BatchNorm weights, implicit vectors), pg1 (other weights), pg2 (biases).

  ``train_aux.py`` finds the implicit vectors through the attributes that hold
  ``ImplicitA``/``ImplicitM`` modules; here they are found by type, which is the
  same set of tensors for the P6 models.
  """
  import torch
  from sas_yolov7.models.common import ImplicitA, ImplicitM

  pg0, pg1, pg2 = [], [], []
  for module in model.modules():
    if isinstance(getattr(module, 'bias', None), torch.nn.Parameter):
      pg2.append(module.bias)
    if isinstance(module, torch.nn.BatchNorm2d):
      pg0.append(module.weight)
    elif isinstance(getattr(module, 'weight', None), torch.nn.Parameter):
      pg1.append(module.weight)
    if isinstance(module, ImplicitA | ImplicitM):
      pg0.append(module.implicit)
  return pg0, pg1, pg2


def snapshot(model: Any, ema: Any, optimizer: Any, *, step: int) -> dict[str, np.ndarray]:
  """The whole training state before iteration ``step``, as NumPy arrays.

  Keys: ``model/<name>`` and ``ema/<name>`` (the state dicts),
  ``momentum/<name>`` and ``grad/<name>`` per parameter (zeros where torch
  holds none yet), ``step`` (the next ``ni``) and ``updates`` (the EMA's
  count of optimiser steps).
  """
  import torch

  state = {f'model/{k}': v.detach().numpy().copy() for k, v in model.state_dict().items()}
  state.update({f'ema/{k}': v.detach().numpy().copy() for k, v in ema.ema.state_dict().items()})
  for name, param in model.named_parameters():
    buffer = optimizer.state.get(param, {}).get('momentum_buffer')
    for key, value in (('momentum', buffer), ('grad', param.grad)):
      value = torch.zeros_like(param) if value is None else value
      state[f'{key}/{name}'] = value.detach().numpy().copy()
  state['step'] = np.asarray(step, np.int64)
  state['updates'] = np.asarray(ema.updates, np.int64)
  return state


def restore(model: Any, ema: Any, optimizer: Any, state: dict[str, np.ndarray]) -> int:
  """Loads a :func:`snapshot` into ``model``, ``ema`` and ``optimizer``; returns its step.

  Raises:
    KeyError: naming the first parameter the snapshot lacks.
  """
  import torch

  def part(prefix: str) -> dict[str, Any]:
    return {k[len(prefix) :]: torch.from_numpy(v) for k, v in state.items() if k.startswith(prefix)}

  model.load_state_dict(part('model/'), strict=True)
  ema.ema.load_state_dict(part('ema/'), strict=True)
  ema.updates = int(state['updates'])
  for name, param in model.named_parameters():
    for key in ('momentum', 'grad'):
      if f'{key}/{name}' not in state:
        raise KeyError(f'the snapshot has no {key}/{name}')
    optimizer.state[param]['momentum_buffer'] = torch.from_numpy(state[f'momentum/{name}']).to(
      param.dtype, copy=True
    )
    param.grad = torch.from_numpy(state[f'grad/{name}']).to(param.dtype, copy=True)
  return int(state['step'])


def evaluate(model: Any, val_feed: Any, *, config: RunConfig, num_classes: int):
  """COCO metrics of ``model`` (evaluation mode) through our selection and evaluator.

  Upstream's decoded outputs ``[B, R, F]`` (``R`` rows per image, ``F = 5 + C``)
  go through :func:`reorg_jax.models.inference.select_detections` and
  :func:`reorg_jax.program.evaluation.evaluate_split` with the run's ``eval`` thresholds, as
  ``python -m train`` scores its own EMA.
  """
  import jax
  import jax.numpy as jnp
  import torch

  from reorg_jax.models.inference import select_detections
  from reorg_jax.program import evaluation

  ecfg = config.eval
  select = jax.jit(
    lambda decoded: select_detections(
      decoded,
      max_detections=ecfg.max_detections,
      max_candidates=min(ecfg.max_candidates, decoded.shape[1]),
      score_threshold=ecfg.score_threshold,
      iou_threshold=ecfg.iou_threshold,
      class_agnostic=False,
    )
  )

  def detect(images: np.ndarray) -> Any:
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0)
    with torch.no_grad():
      decoded = model(x.to(next(model.parameters()).dtype))[0].float().numpy()
    return jax.device_get(select(jnp.asarray(decoded)))

  model.eval()
  return evaluation.evaluate_split(
    detect, val_feed, num_classes=num_classes, max_detections=ecfg.max_detections
  )


def train(
  config: RunConfig,
  *,
  start: dict[str, np.ndarray],
  feed: Any,
  val_feed: Any,
  schedule: Any,
  num_classes: int,
  total: int,
  resume: dict[str, np.ndarray] | None = None,
  snapshot_at: int | None = None,
  float64: bool = False,
  evaluate_epochs: bool = True,
) -> UpstreamRun:
  """Trains upstream's model from ``start`` on ``feed``'s batches up to iteration ``total``.

  Args:
    config: the run's resolved configuration (``reorg_jax/program/configs/default.yaml`` keys).
    start: the initial state dict, loaded strictly.
    feed: the training :class:`reorg_jax.data.loader.BatchLoader`.
    val_feed: the validation loader (after each whole epoch).
    schedule: the run's :class:`reorg_jax.training.optim.Schedule` (epochs, batch size, ``nb``).
    num_classes: ``C``.
    total: the iteration to stop before (``schedule.total_steps`` or fewer).
    resume: a :func:`snapshot` to continue from (its iteration on), instead of
      iteration 0 from ``start``.
    snapshot_at: take a :func:`snapshot` before this iteration (returned as
      ``UpstreamRun.snapshot``).
    float64: train in float64 (model, optimiser state, EMA, images and
      labels; the package's loss sums its parts into float32 accumulators and
      scores SimOTA's class costs in float32, so the loss values are rounded
      to float32 while the gradients stay float64): a reference for how far
      float32 arithmetic alone takes a step.
    evaluate_epochs: score the EMA on ``val_feed`` after each whole epoch
      (``UpstreamRun.epochs``); ``False``: no evaluation (the schedule still steps).

  Raises:
    FloatingPointError: a loss was not finite (the step is named).
    ValueError: ``snapshot_at`` is not an iteration this run takes.
  """
  import torch

  from reorg_jax.data import prefetch
  from reorg_jax.models import yolo
  from reorg_jax.reference import oracle  # the torchvision stand-in; 'cuda:0' on the CPU

  # isort: split
  from sas_yolov7.models.yolo import Model
  from sas_yolov7.utils.torch_utils import ModelEMA

  name = config.model.name
  raw = yolo.load_config(yolo.NANO_CONFIG if name == 'p6_nano' else name)
  raw['nc'] = num_classes
  torch.set_flush_denormal(True)
  model = Model(raw)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in start.items()}, strict=True)
  dtype = torch.float64 if float64 else torch.float32
  model.to(dtype)

  hyp = hyperparameters(config, num_levels=model.model[-1].nl, num_classes=num_classes)
  model.nc, model.hyp, model.gr = num_classes, hyp, 1.0
  compute_loss = oracle.reference_loss_module().ComputeLossAuxOTA(model)

  recipe = config.recipe
  batch_size, nb, epochs = schedule.batch_size, schedule.steps_per_epoch, schedule.epochs
  nbs = recipe.nominal_batch_size
  accumulate = max(round(nbs / batch_size), 1)
  hyp['weight_decay'] *= batch_size * accumulate / nbs
  pg0, pg1, pg2 = parameter_groups(model)
  optimizer = torch.optim.SGD(pg0, lr=hyp['lr0'], momentum=hyp['momentum'], nesterov=True)
  optimizer.add_param_group({'params': pg1, 'weight_decay': hyp['weight_decay']})
  optimizer.add_param_group({'params': pg2})

  def lf(x):  # one_cycle(1, lrf, epochs)
    return ((1 - math.cos(x * math.pi / epochs)) / 2) * (hyp['lrf'] - 1) + 1

  scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=lf)
  ema = ModelEMA(model)
  ema.decay = lambda x: recipe.ema_decay * (1 - math.exp(-x / recipe.ema_ramp))
  nw = max(round(hyp['warmup_epochs'] * nb), recipe.min_warmup_steps)

  first = 0
  if resume is not None:
    first = restore(model, ema, optimizer, resume)
    with warnings.catch_warnings():  # torch warns of a schedule stepped before the optimiser
      warnings.simplefilter('ignore', UserWarning)
      for _ in range(first // nb):  # LambdaLR sets initial_lr * lf(epoch) from its epoch alone
        scheduler.step()
  if snapshot_at is not None and not first <= snapshot_at < total:
    raise ValueError(f'snapshot_at = {snapshot_at} is not an iteration of [{first}, {total})')

  steps, epoch_rows, taken = [], [], None
  started = time.perf_counter()
  for epoch in range(first // nb, -(-total // nb)):
    model.train()
    skip = max(first - nb * epoch, 0)  # batches of this epoch trained before the resume
    if not skip:
      optimizer.zero_grad()
    batches = itertools.islice(
      feed.epoch(epoch, start_step=skip), min(nb, total - nb * epoch) - skip
    )
    with prefetch.Prefetcher(batches, buffer_size=config.train.prefetch) as prefetched:
      for i, batch in enumerate(prefetched, start=skip):
        ni = i + nb * epoch
        if ni == snapshot_at:
          taken = snapshot(model, ema, optimizer, step=ni)
        x = torch.from_numpy(batch.images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0)
        x, labels = x.to(dtype), torch.from_numpy(batch.labels).to(dtype)
        if ni <= nw:
          xi = [0, nw]
          accumulate = max(1, np.interp(ni, xi, [1, nbs / batch_size]).round())
          for j, group in enumerate(optimizer.param_groups):
            group['lr'] = np.interp(
              ni, xi, [hyp['warmup_bias_lr'] if j == 2 else 0.0, group['initial_lr'] * lf(epoch)]
            )
            group['momentum'] = np.interp(ni, xi, [hyp['warmup_momentum'], hyp['momentum']])
        loss, items = compute_loss(model(x), labels, x)
        loss.backward()
        if ni % accumulate == 0:
          optimizer.step()
          optimizer.zero_grad()
          ema.update(model)
        box, obj, cls, whole = (float(v) for v in items)
        lr = float(optimizer.param_groups[1]['lr'])
        steps.append(
          {'step': ni, 'epoch': epoch, 'loss': whole, 'box': box, 'obj': obj, 'cls': cls, 'lr': lr}
        )
        if not math.isfinite(whole):
          raise FloatingPointError(f'upstream: the loss of step {ni} is not finite ({whole})')
    if ni + 1 == nb * (epoch + 1):  # a whole epoch: step the schedule, evaluate the EMA
      scheduler.step()
      if not evaluate_epochs:
        continue
      metrics = evaluate(ema.ema, val_feed, config=config, num_classes=num_classes)
      epoch_rows.append({'epoch': epoch, 'step': ni + 1, **metrics})
      print(
        f'upstream epoch {epoch + 1}/{epochs}: loss {whole:.4f}  mAP@0.5 {metrics["map50"]:.4f}  '
        f'mAP@0.5:0.95 {metrics["map50_95"]:.4f}',
        flush=True,
      )
  return UpstreamRun(
    steps=steps,
    epochs=epoch_rows,
    raw={k: v.detach().numpy().copy() for k, v in model.state_dict().items()},
    ema={k: v.detach().numpy().copy() for k, v in ema.ema.state_dict().items()},
    seconds=time.perf_counter() - started,
    snapshot=taken,
  )
