"""One training step of YOLOv7-W6 (and E6E) on an accelerator: speed, compile time, memory, FLOPs.

For each model, batch size, compute dtype and rematerialisation policy
(``--remat``: :class:`reorg_jax.models.yolo.Remat`, the program's ``train.remat``),
:func:`reorg_jax.training.step.train_step`
(forward, lead-guided assignment and loss, backward, optimiser, EMA; the state
donated, as ``python -m train`` runs it) is compiled ahead of time on one
device and timed on a random batch (uint8 images, ``boxes`` random boxes per
image, 80 classes). Printed per row:

* ``img/s`` and ``step ms``: median of ``--repeats`` steps after a warm-up step;
* ``compile s``: lowering and compiling the step (for upstream: its first step,
  with cuDNN's autotuning and the allocator's growth);
* ``peak GiB``: the device's peak memory in use (``memory_stats``; accelerators
  only), and ``xla GiB``: XLA's memory analysis of the compiled step
  (arguments + outputs + temporaries - donated aliases), available on any
  backend, also without running;
* ``TFLOP/step`` from XLA's cost analysis, and ``% peak``: the achieved
  FLOP rate over the chip's dense peak for that dtype (bfloat16 tensor cores;
  float32 as TF32, XLA's default precision on GPUs), where the chip is in
  :data:`PEAK_TFLOPS`.

Where torch can run the reference package (``sas-yolov7``), upstream's step
on the same device is timed in its own process (one framework per process):
its ``Model`` and ``ComputeLossAuxOTA`` with the P6 hyper-parameters,
``SGD`` over ``train_aux.py``'s three parameter groups and its ``ModelEMA``
update after every optimiser step (ours steps and updates its EMA on every
call too), and on CUDA automatic
mixed precision (float16 autocast and a gradient scaler), as ``train_aux.py``
trains. Its rows are matched with ours of the same batch (our bfloat16 with
its AMP) and the ratio ``ours / upstream`` of images/s is printed.

Memory: under the table, XLA's memory analysis per model, policy and dtype
(GiB) beside the training memory mmyolo publishes per A100 for its YOLOv7 P6
models at 1280 px and batch 16 with automatic mixed precision
(:data:`MMYOLO_GB`: W-P6 27.0 GB, E-P6 42.5 GB; its E-P6 is YOLOv7-E6, and
it gives no figure for E6E, which is larger).

Without an accelerator the full run would take hours, so the default run then
compiles only, printing the memory analysis of W6 and E6E at 1280 px and
batch 16 for each policy and dtype, and then measures what each policy costs
in time on this CPU at a small size (``--cost-*``: the small model at 128 px,
batch 4, float32, median of ``--cost-repeats`` steps; a CPU figure, not an
accelerator's). ``--smoke`` runs everything at a tiny size (the small model at
64 px, batch 2) on whatever device there is; a CI test runs it.

    python benchmarks/device_step.py               # W6 and E6E, 1280 px, batch 8 and 16, ...
    python benchmarks/device_step.py --memory-only # XLA's memory analysis only (any backend)
    python benchmarks/device_step.py --smoke       # tiny, any backend
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
from typing import Any

import numpy as np

_ROOT = pathlib.Path(__file__).resolve().parents[1]
_TESTS = _ROOT / 'tests'

# Dense peak TFLOP/s per chip: (bfloat16, float32 as XLA runs it by default).
# NVIDIA: tensor-core dense figures of the SXM parts (float32 matmuls and convolutions
# run as TF32); TPU: bfloat16 peak, float32 through bfloat16 passes (no separate peak).
PEAK_TFLOPS = {
  'H200': (989.4, 494.7),
  'H100': (989.4, 494.7),
  'A100': (312.0, 156.0),
  'L4': (121.0, 60.0),
  'TPU v4': (275.0, None),
  'TPU v5 lite': (197.0, None),
  'TPU v5p': (459.0, None),
}

_GIB = 2.0**30

# The profiler range around upstream's EMA update.
EMA_SCOPE = 'ModelEMA.update'

# Training memory per A100 (GB, automatic mixed precision) that mmyolo publishes for its
# YOLOv7 P6 models at 1280 px and batch 16 per GPU (8 GPUs x 16): W-P6 and E-P6 (YOLOv7-E6).
MMYOLO_GB = {'w6': 27.0, 'e6': 42.5}

# The upstream training files of the P6 models this script can build (besides 'nano').
P6_MODELS = ('w6', 'e6', 'd6', 'e6e')
REMATS = ('none', 'blocks', 'full')


@dataclasses.dataclass(frozen=True)
class Case:
  """One measured configuration.

  Attributes:
    model: one of :data:`P6_MODELS` (upstream's ``yolov7-<model>.yaml``) or
      ``'nano'`` (``p6_nano``).
    image_size: ``S``.
    batch_size: ``B`` on the one device.
    dtype: ``'bfloat16'`` or ``'float32'`` (forward compute dtype).
    num_classes: ``C``.
    remat: a :class:`reorg_jax.models.yolo.Remat` value (what the backward pass recomputes).
  """

  model: str
  image_size: int
  batch_size: int
  dtype: str
  num_classes: int
  remat: str = 'none'


def _config_path(model: str) -> pathlib.Path:
  """Upstream's training file of a P6 model (``'w6'``: ``yolov7-w6.yaml``)."""
  import sas_yolov7

  return pathlib.Path(sas_yolov7.__file__).parent / 'cfg' / 'training' / f'yolov7-{model}.yaml'


def random_batch(case: Case, *, boxes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """``[B, S, S, 3]`` uint8 images and ``[B * boxes, 6]`` upstream label rows.

  Rows are ``(image, class, cx, cy, w, h)`` normalised to the image, sides
  between 2% and 30% of it, centres keeping each box inside.
  """
  rng = np.random.default_rng(seed)
  b, s = case.batch_size, case.image_size
  images = rng.integers(0, 256, size=(b, s, s, 3), dtype=np.uint8)
  wh = rng.uniform(0.02, 0.3, size=(b * boxes, 2))
  centre = wh / 2 + rng.uniform(size=(b * boxes, 2)) * (1 - wh)
  labels = np.concatenate(
    [
      np.repeat(np.arange(b), boxes)[:, None],
      rng.integers(0, case.num_classes, size=(b * boxes, 1)),
      centre,
      wh,
    ],
    axis=1,
  ).astype(np.float32)
  return images, labels


# --- Ours ----------------------------------------------------------------------------------------


_INITIAL: dict[tuple[str, int], Any] = {}


def _ours_setup(case: Case, *, smoke: bool):
  """``(model, setup, state)`` of ``case`` on the default device."""
  import jax
  import jax.numpy as jnp

  from reorg_jax import testing
  from reorg_jax.models import yolo
  from reorg_jax.training import assembly, optim

  if case.model == 'nano':
    model = yolo.p6_nano(num_classes=case.num_classes)
  else:
    model = yolo.build_model(_config_path(case.model), num_classes=case.num_classes)
  # The smoke run compiles the simplest capacity ladder (a speed setting only).
  speed = testing.ONE_BRANCH if smoke else {}
  schedule = optim.Schedule(epochs=1, batch_size=case.batch_size, steps_per_epoch=1000)
  # One initialisation per model (on the host): the dtypes and policies share it. The
  # values do not depend on the side of the dummy image, so the smallest one does.
  key = (case.model, case.num_classes)
  if key not in _INITIAL:
    side = 2 * model.max_stride
    variables = assembly.initial_variables(model, image_size=side, rng=jax.random.key(0))
    _INITIAL[key] = jax.device_get(variables)
  run = assembly.assemble(
    model,
    image_size=case.image_size,
    schedule=schedule,
    gains=speed,
    compute_dtype=jnp.dtype(case.dtype),
    variables=jax.tree.map(jnp.asarray, _INITIAL[key]),  # fresh arrays: the step donates them
    remat=yolo.Remat(case.remat),
  )
  return run.setup, run.state, schedule


def _ours_batch(case: Case, schedule: Any, *, boxes: int) -> dict[str, Any]:
  import jax
  import jax.numpy as jnp

  from reorg_jax import targets
  from reorg_jax.training import optim

  images, labels = random_batch(case, boxes=boxes, seed=0)
  packed = targets.Targets.from_yolo(labels, case.batch_size, boxes, num_classes=case.num_classes)
  return {
    'images': jnp.asarray(images),
    'targets': jax.tree.map(jnp.asarray, packed),
    'hparams': optim.hyperparams(100, schedule=schedule),
  }


def xla_analysis(compiled: Any) -> dict[str, float | None]:
  """FLOPs and the memory analysis of a compiled step (``None`` where XLA gives none)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, list | tuple):  # one entry per computation in older jax
    cost = cost[0] if cost else None
  flops = float(cost['flops']) if cost and cost.get('flops', -1) > 0 else None
  memory = compiled.memory_analysis()
  if memory is None:
    return {'flops': flops, 'xla_bytes': None}
  total = (
    memory.argument_size_in_bytes
    + memory.output_size_in_bytes
    + memory.temp_size_in_bytes
    - memory.alias_size_in_bytes
  )
  return {'flops': flops, 'xla_bytes': float(total)}


def measure_ours(case: Case, *, boxes: int, repeats: int, run: bool, smoke: bool) -> dict:
  """Compiles (and with ``run``, times) our step for ``case``; one result row."""
  import functools

  import jax

  from reorg_jax.training import step as train_lib

  setup, state, schedule = _ours_setup(case, smoke=smoke)
  batch = _ours_batch(case, schedule, boxes=boxes)
  step = jax.jit(functools.partial(train_lib.train_step, setup), donate_argnums=(0,))
  started = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  row: dict[str, Any] = {
    **dataclasses.asdict(case),
    'framework': 'ours',
    'compile_s': time.perf_counter() - started,
    **xla_analysis(compiled),
  }
  if not run:
    return row
  state, metrics = compiled(state, batch)  # warm-up
  jax.block_until_ready(metrics)
  times = []
  for _ in range(repeats):
    started = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - started)
  if not np.isfinite(float(metrics['loss'])):
    raise FloatingPointError(f'{case}: the loss is not finite')
  stats = jax.local_devices()[0].memory_stats() or {}
  row['step_s'] = statistics.median(times)
  row['peak_bytes'] = stats.get('peak_bytes_in_use')
  return row


# --- Upstream ------------------------------------------------------------------------------------


def measure_upstream(case: Case, *, boxes: int, repeats: int) -> dict:
  """Times upstream's training step for ``case`` (AMP on CUDA); one result row."""
  import math

  try:
    import torchvision  # noqa: F401  (the real one, where installed)
  except ImportError:
    from reorg_jax.reference import oracle  # noqa: F401  (registers the stand-in the reference imports)
  import sas_yolov7
  import torch
  import yaml
  from sas_yolov7.models.yolo import Model
  from sas_yolov7.utils.torch_utils import ModelEMA

  from reorg_jax.models import yolo
  from reorg_jax.reference import train_aux

  cuda = torch.cuda.is_available()
  device = torch.device('cuda:0' if cuda else 'cpu')
  if cuda:
    from sas_yolov7.utils import loss as reference  # its 'cuda:0' tensors are right here
  else:
    from reorg_jax.reference import oracle

    reference = oracle.reference_loss_module()
  raw = yolo.load_config(yolo.NANO_CONFIG if case.model == 'nano' else _config_path(case.model))
  raw['nc'] = case.num_classes
  torch.manual_seed(0)
  model = Model(raw).to(device)
  hyp = yaml.safe_load(
    (pathlib.Path(sas_yolov7.__file__).parent / 'data' / 'hyp.scratch.p6.yaml').read_text()
  )
  levels = model.model[-1].nl
  hyp['box'] *= 3.0 / levels
  hyp['cls'] *= case.num_classes / 80.0 * 3.0 / levels
  hyp['obj'] *= (case.image_size / 640) ** 2 * 3.0 / levels
  model.nc, model.hyp, model.gr = case.num_classes, hyp, 1.0
  compute_loss = reference.ComputeLossAuxOTA(model)
  pg0, pg1, pg2 = train_aux.parameter_groups(model)
  optimizer = torch.optim.SGD(pg0, lr=0.01, momentum=hyp['momentum'], nesterov=True)
  optimizer.add_param_group({'params': pg1, 'weight_decay': hyp['weight_decay']})
  optimizer.add_param_group({'params': pg2})
  scaler = torch.amp.GradScaler('cuda', enabled=cuda)
  ema = ModelEMA(model)

  images, labels = random_batch(case, boxes=boxes, seed=0)
  x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).to(device)
  targets = torch.from_numpy(labels).to(device)

  def step() -> float:
    imgs = x.float() / 255.0
    with torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
      outputs = model(imgs)
      loss, _ = compute_loss(outputs, targets, imgs)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad()
    with torch.profiler.record_function(EMA_SCOPE):  # a name for benchmarks/step_profile.py
      ema.update(model)
    if cuda:
      torch.cuda.synchronize()
    return float(loss)

  model.train()
  started = time.perf_counter()
  first = step()
  compile_s = time.perf_counter() - started
  if cuda:
    torch.cuda.reset_peak_memory_stats()
  times = []
  for _ in range(repeats):
    started = time.perf_counter()
    last = step()
    times.append(time.perf_counter() - started)
  if not (math.isfinite(first) and math.isfinite(last)):
    raise FloatingPointError(f'{case}: upstream loss is not finite')
  return {
    **dataclasses.asdict(case),
    'framework': 'upstream' + (' amp' if cuda else ''),
    'compile_s': compile_s,  # the first step: cuDNN autotuning and allocation
    'step_s': statistics.median(times),
    'peak_bytes': float(torch.cuda.max_memory_allocated()) if cuda else None,
    'flops': None,
    'xla_bytes': None,
  }


def upstream_available() -> str | None:
  """Why upstream's step cannot run here, or ``None`` when it can."""
  import importlib.util

  for name in ('torch', 'sas_yolov7'):
    if importlib.util.find_spec(name) is None:
      return f'{name} is not installed'
  return None


# --- Driver --------------------------------------------------------------------------------------


def peak_tflops(device_kind: str, dtype: str) -> float | None:
  """The chip's dense peak for ``dtype`` from :data:`PEAK_TFLOPS` (``None``: not listed)."""
  for name, (bf16, f32) in PEAK_TFLOPS.items():
    if name.lower() in device_kind.lower():
      return bf16 if dtype == 'bfloat16' else f32
  return None


def plan(spec: dict, *, accelerator: bool) -> tuple[list[Case], bool]:
  """The cases to measure and whether to run them (else compile only).

  Off an accelerator, outside ``--smoke``, only the largest batch is compiled
  (for the memory analysis): running W6 at 1280 px on a CPU takes hours.
  ``spec`` names one ``model`` or several ``models``, and optionally the
  ``remats`` (default ``['none']``).
  """
  run = (accelerator or spec['smoke'] or spec['run']) and not spec['memory_only']
  batches = spec['batches'] if run or spec['smoke'] else [max(spec['batches'])]
  cases = [
    Case(m, spec['image_size'], b, d, spec['num_classes'], r)
    for m in spec.get('models', [spec.get('model')])
    for b in batches
    for r in spec.get('remats', ['none'])
    for d in spec['dtypes']
  ]
  return cases, run


def _worker(argv: list[str]) -> None:
  """``--worker ours|upstream SPEC_JSON``: prints ``DEVICE``, then one ``ROW`` line per case."""
  framework, spec = argv[0], json.loads(argv[1])
  if framework == 'cost':  # our step on this machine, run, whatever the backend
    for remat in spec['remats']:
      case = Case('nano', spec['image_size'], spec['batch'], 'float32', spec['num_classes'], remat)
      row = measure_ours(case, boxes=spec['boxes'], repeats=spec['repeats'], run=True, smoke=False)
      print('ROW ' + json.dumps(row), flush=True)
    return
  if framework == 'ours':
    import jax

    device = jax.devices()[0]
    info = {'kind': device.device_kind, 'platform': device.platform, 'count': jax.device_count()}
    print('DEVICE ' + json.dumps({**info, 'jax': jax.__version__}), flush=True)
    cases, run = plan(spec, accelerator=device.platform != 'cpu')
    for case in cases:
      row = measure_ours(
        case, boxes=spec['boxes'], repeats=spec['repeats'], run=run, smoke=spec['smoke']
      )
      print('ROW ' + json.dumps(row), flush=True)
    return
  for model in spec.get('models', [spec.get('model')]):
    for batch_size in spec['batches']:  # one row per batch: AMP on CUDA, float32 on a CPU
      case = Case(model, spec['image_size'], batch_size, 'float32', spec['num_classes'])
      row = measure_upstream(case, boxes=spec['boxes'], repeats=spec['repeats'])
      print('ROW ' + json.dumps(row), flush=True)


def _in_own_process(
  framework: str, spec: dict, *, timeout: float, env: dict[str, str] | None = None
) -> tuple[dict, list[dict]]:
  """Runs ``framework``'s worker in a fresh process (environment ``env``, default this
  one's); returns its device line and rows."""
  done = subprocess.run(
    [sys.executable, __file__, '--worker', framework, json.dumps(spec)],
    capture_output=True,
    text=True,
    timeout=timeout,
    env=env,
  )
  if done.returncode != 0:
    raise SystemExit(f'{framework} worker failed (exit {done.returncode}):\n{done.stderr[-3000:]}')
  lines = done.stdout.splitlines()
  device = next((json.loads(x[7:]) for x in lines if x.startswith('DEVICE ')), {})
  return device, [json.loads(x[4:]) for x in lines if x.startswith('ROW ')]


def worker_environment(framework: str, *, same: bool) -> dict[str, str]:
  """The environment of ``framework``'s worker in a comparison of the two steps.

  With ``same``, this process's for both. Otherwise each side's as its own
  program would run when started from here: ours in the one ``reorg-jax`` and
  ``python -m train`` give themselves (glibc's huge-page tunable where it
  helps, :func:`reorg_jax.program.allocator.program_environment`), upstream's
  in this process's.
  """
  from reorg_jax.program import allocator

  if same or framework != 'ours':
    return dict(os.environ)
  return allocator.program_environment(os.environ)


def add_same_environment_option(parser: argparse.ArgumentParser, *, applies_to: str = '') -> None:
  """``--same-environment`` (:func:`worker_environment`'s ``same``), for scripts comparing the
  two steps; ``applies_to`` prefixes its help (``'--vs-upstream: '``)."""
  parser.add_argument(
    '--same-environment',
    action='store_true',
    help=f'{applies_to}both workers in this environment (default: ours in the one the '
    "program gives itself, with glibc's huge-page tunable where it helps)",
  )


def _fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
  return 'n/a' if value is None else format(value / scale, spec)


def print_rows(rows: list[dict], *, device_kind: str) -> None:
  """The table (and the ours / upstream ratios)."""
  print(
    f'{"framework":<13} {"model":<5} {"size":>5} {"batch":>5} {"dtype":<9} {"remat":<6} '
    f'{"img/s":>8} {"step ms":>9} {"compile s":>9} {"peak GiB":>8} {"xla GiB":>8} '
    f'{"TFLOP/step":>10} {"% peak":>6}'
  )
  for r in rows:
    step = r.get('step_s')
    rate = None if step is None else r['batch_size'] / step
    achieved = None
    peak = peak_tflops(device_kind, r['dtype'])
    if r['flops'] and step and peak:
      achieved = 100 * r['flops'] / step / (peak * 1e12)
    dtype = 'amp fp16' if r['framework'] == 'upstream amp' else r['dtype']
    remat = r.get('remat', 'none') if r['framework'] == 'ours' else '-'
    print(
      f'{r["framework"]:<13} {r["model"]:<5} {r["image_size"]:>5} {r["batch_size"]:>5} '
      f'{dtype:<9} {remat:<6} {_fmt(rate, ".1f"):>8} {_fmt(step, ".1f", 1e-3):>9} '
      f'{r["compile_s"]:>9.1f} {_fmt(r.get("peak_bytes"), ".2f", _GIB):>8} '
      f'{_fmt(r["xla_bytes"], ".2f", _GIB):>8} {_fmt(r["flops"], ".3g", 1e12):>10} '
      f'{_fmt(achieved, ".1f"):>6}'
    )
  theirs = {(r['model'], r['batch_size']): r for r in rows if r['framework'].startswith('upstream')}
  for r in rows:
    other = theirs.get((r['model'], r['batch_size']))
    if r['framework'] != 'ours' or other is None or r.get('step_s') is None:
      continue
    if other['dtype'] != r['dtype'] and r['dtype'] != 'bfloat16':
      continue  # upstream's AMP is compared with our bfloat16
    print(
      f'ours {r["dtype"]} remat {r.get("remat", "none")} / upstream '
      f'{"amp" if "amp" in other["framework"] else other["dtype"]}'
      f' at batch {r["batch_size"]}: {other["step_s"] / r["step_s"]:.2f}x images/s'
    )


def print_memory(rows: list[dict]) -> None:
  """XLA's memory analysis (GiB) per model, batch and policy, bfloat16 and float32, beside
  mmyolo's published training memory (:data:`MMYOLO_GB`)."""
  ours = [r for r in rows if r['framework'] == 'ours' and r['xla_bytes'] is not None]
  keys = list(dict.fromkeys((r['model'], r['image_size'], r['batch_size']) for r in ours))
  if not keys:
    return
  print()
  print(
    'XLA memory analysis of the step (GiB: arguments + outputs + temporaries - donated), '
    'beside mmyolo (GB per A100, AMP, 1280 px, batch 16)'
  )
  print(
    f'{"model":<5} {"size":>5} {"batch":>5} {"remat":<6} {"bfloat16":>9} {"float32":>9} '
    f'{"mmyolo":>14}'
  )
  for model, size, batch in keys:
    same = [
      r for r in ours if (r['model'], r['image_size'], r['batch_size']) == (model, size, batch)
    ]
    for remat in dict.fromkeys(r.get('remat', 'none') for r in same):
      by_dtype = {r['dtype']: r['xla_bytes'] for r in same if r.get('remat', 'none') == remat}
      reference = 'n/a'
      if (size, batch) == (1280, 16) and model in MMYOLO_GB:
        reference = f'{MMYOLO_GB[model]:.1f}'
      elif (size, batch) == (1280, 16) and model == 'e6e':
        reference = f'({MMYOLO_GB["e6"]:.1f}: E6)'
      print(
        f'{model:<5} {size:>5} {batch:>5} {remat:<6} '
        f'{_fmt(by_dtype.get("bfloat16"), ".2f", _GIB):>9} '
        f'{_fmt(by_dtype.get("float32"), ".2f", _GIB):>9} {reference:>14}'
      )


def print_cost(rows: list[dict], *, repeats: int) -> None:
  """The CPU step time of each policy, and its ratio to ``none``'s."""
  if not rows:
    return
  first = rows[0]
  print()
  print(
    f'Step time by policy on this CPU ({first["model"]}, {first["image_size"]} px, batch '
    f'{first["batch_size"]}, {first["dtype"]}, median of {repeats} steps; a CPU figure)'
  )
  base = next((r['step_s'] for r in rows if r['remat'] == 'none'), None)
  print(f'{"remat":<6} {"step ms":>9} {"vs none":>8} {"compile s":>9} {"xla GiB":>8}')
  for r in rows:
    ratio = None if base is None else r['step_s'] / base
    print(
      f'{r["remat"]:<6} {r["step_s"] * 1e3:>9.1f} {_fmt(ratio, ".2f"):>8} '
      f'{r["compile_s"]:>9.1f} {_fmt(r["xla_bytes"], ".3f", _GIB):>8}'
    )


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if argv[:1] == ['--worker']:
    _worker(argv[1:])
    return 0
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--smoke', action='store_true', help='the small model at 64 px (CI)')
  parser.add_argument('--memory-only', action='store_true', help='compile only: memory, FLOPs')
  parser.add_argument('--models', nargs='+', default=['w6', 'e6e'], choices=P6_MODELS)
  parser.add_argument('--batches', type=int, nargs='+', default=[8, 16])
  parser.add_argument('--dtypes', nargs='+', default=['bfloat16', 'float32'])
  parser.add_argument(
    '--remat', nargs='+', default=list(REMATS), choices=REMATS, help='train.remat policies'
  )
  parser.add_argument('--image-size', type=int, default=1280)
  parser.add_argument('--boxes', type=int, default=20, help='boxes per image')
  parser.add_argument('--repeats', type=int, default=10)
  parser.add_argument('--no-upstream', action='store_true', help='skip the reference step')
  parser.add_argument(
    '--no-cost', action='store_true', help="skip the policies' step time on the CPU"
  )
  parser.add_argument('--cost-size', type=int, default=128, help='image side of the CPU timing')
  parser.add_argument('--cost-batch', type=int, default=4)
  parser.add_argument('--cost-repeats', type=int, default=5)
  parser.add_argument('--timeout', type=float, default=7200.0, help='seconds per worker process')
  args = parser.parse_args(argv)
  for dtype in args.dtypes:
    if dtype not in ('bfloat16', 'float32'):
      parser.error(f'--dtypes: bfloat16 or float32, got {dtype!r}')

  if args.smoke:
    models, size, batches, classes, repeats = ['nano'], 64, [2], 6, 2
  else:
    models, size, batches, classes = args.models, args.image_size, args.batches, 80
    repeats = args.repeats
  spec = {
    'models': models,
    'image_size': size,
    'batches': batches,
    'dtypes': args.dtypes,
    'remats': args.remat,
    'num_classes': classes,
    'boxes': args.boxes,
    'repeats': repeats,
    'smoke': args.smoke,
    'memory_only': args.memory_only,
    'run': False,  # run off an accelerator too (benchmarks/train_speed.py --vs-upstream)
  }
  # Neither framework runs in this process: each worker owns the device while it runs.
  device, rows = _in_own_process('ours', spec, timeout=args.timeout)
  print(
    f'{device["kind"]} ({device["platform"]}, {device["count"]} device(s)), host '
    f'{platform.processor() or platform.machine()}, jax {device["jax"]}'
  )
  ran = all('step_s' in r for r in rows)
  if not ran:
    why = '--memory-only' if args.memory_only else 'no accelerator (--smoke runs a tiny step)'
    print(f'compile only ({why}): XLA memory analysis and FLOPs')
  elif not args.no_upstream:
    missing = upstream_available()
    if missing:
      print(f'upstream: skipped ({missing})')
    else:
      rows += _in_own_process('upstream', spec, timeout=args.timeout)[1]
  print_rows(rows, device_kind=device['kind'])
  print_memory(rows)
  if not (args.smoke or args.memory_only or args.no_cost or device['platform'] != 'cpu'):
    cost = {
      'remats': args.remat,
      'image_size': args.cost_size,
      'batch': args.cost_batch,
      'num_classes': 80,
      'boxes': args.boxes,
      'repeats': args.cost_repeats,
    }
    print_cost(_in_own_process('cost', cost, timeout=args.timeout)[1], repeats=args.cost_repeats)
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
