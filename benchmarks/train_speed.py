"""Training-step throughput and the share of step time spent in assignment and loss.

For each model, three jitted functions run on one synthetic batch of the
synthetic dataset (real images and boxes, letterboxed):

* ``full``: :func:`reorg_jax.training.step.train_step` (forward, lead-guided
  assignment and loss, backward, optimiser, EMA), as ``python -m train`` runs it;
* ``no loss``: the same step (its ``loss_fn`` argument) with the assignment
  and loss replaced by a trivial function of the head outputs (mean of
  squares), so forward, backward, optimiser and EMA remain;
* ``loss``: assignment and loss alone, forward and backward
  (``value_and_grad`` of :func:`reorg_jax.aux_ota_loss` with respect to the
  head outputs of this batch), jitted on its own.

Two shares of assignment + loss in the step are printed: ``loss / full``
(measured directly) and ``1 - no_loss / full`` (the difference of two whole
compiled steps, which also moves with how XLA schedules each of them, and
with machine noise of a few percent of a multi-second step).

Times are medians of repeated calls after the first (compiling) one; the
state is donated between calls as in training. Prints a table; not a test.

``--vs-upstream`` instead times the whole training step against upstream's
(``Model``, ``ComputeLossAuxOTA``, backward, Nesterov ``SGD`` over its three
parameter groups and ``ModelEMA``'s update, float32) for the same models,
sizes and batches, on random images with ``--boxes`` random boxes per image
and ``--classes`` classes. Each
framework runs in its own process (two frameworks' thread pools in one process
starve each other), each in the environment its program runs in when started
from this shell (ours with glibc's huge-page tunable where it helps, as
``reorg-jax`` and ``python -m train`` set it for themselves; upstream's as it
is; ``--same-environment``: both as it is), ``--rounds`` rounds alternating
which goes first; each round reports the median of ``--repeats`` steps after the first, and the best
round counts. It prints our compile time (the first call: tracing, XLA
compilation) and upstream's first step, and a line per model::

  ratio: model=<m> size=<s> batch=<b> ours_step_s=<x> upstream_step_s=<y> ours_vs_upstream=<y/x>

(above 1: our step is faster). The workers are ``benchmarks/device_step.py``'s.

    python benchmarks/train_speed.py                       # small model at 256 and W6 at 640
    python benchmarks/train_speed.py --models nano --repeats 10
    python benchmarks/train_speed.py --vs-upstream --rounds 2
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import pathlib
import platform
import statistics
import tempfile
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp

import reorg_jax
from reorg_jax.data import dataset, loader, synthetic
from reorg_jax.loss import LossConfig
from reorg_jax.models import yolo
from reorg_jax.targets import Targets
from reorg_jax.training import assembly, optim
from reorg_jax.training import step as train_lib


def _w6_path() -> pathlib.Path | None:
  """The upstream YOLOv7-W6 training config, if its package is installed."""
  spec = importlib.util.find_spec('sas_yolov7')
  if spec is None or spec.origin is None:
    return None
  path = pathlib.Path(spec.origin).parent / 'cfg' / 'training' / 'yolov7-w6.yaml'
  return path if path.is_file() else None


def trivial_loss(
  outputs: Sequence[jax.Array], targets: Targets, image_hw: tuple[int, int], config: LossConfig
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """``sum of mean(outputs ** 2)``, a :data:`reorg_jax.training.step.LossFn` without assignment."""
  del targets, image_hw, config
  return sum(jnp.mean(jnp.square(o)) for o in outputs), {}


def _time_steps(step, state, batch, *, repeats: int) -> tuple[float, float, train_lib.TrainState]:
  """(first call, median later call) seconds; returns the final state too."""
  start = time.perf_counter()
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return first, statistics.median(times), state


def benchmark(
  model: yolo.YOLO, *, data: dataset.YoloDataset, image_size: int, batch_size: int, repeats: int
) -> dict[str, float]:
  """Times the full and the trivial-loss step of ``model``; see the module notes."""
  feed = loader.BatchLoader(
    data,
    batch_size=batch_size,
    image_size=image_size,
    max_boxes=loader.max_boxes_bound(data, None),
    seed=0,
    config=None,
    shuffle=False,
    drop_last=True,
  )
  sample = feed.batch(0, 0)
  schedule = optim.Schedule(epochs=1, batch_size=batch_size, steps_per_epoch=1000)
  results = {}
  for name, loss_fn in (('full', reorg_jax.aux_ota_loss), ('no_loss', trivial_loss)):
    run = assembly.assemble(model, image_size=image_size, schedule=schedule)
    setup, state, loss_config = run.setup, run.state, run.loss_config
    batch = {
      'images': jnp.asarray(sample.images),
      'targets': jax.tree.map(jnp.asarray, sample.targets),
      'hparams': optim.hyperparams(100, schedule=schedule),
    }
    step = jax.jit(
      functools.partial(train_lib.train_step, setup, loss_fn=loss_fn), donate_argnums=(0,)
    )
    first, median, state = _time_steps(step, state, batch, repeats=repeats)
    results[f'{name}_compile_s'] = first
    results[f'{name}_s'] = median
  results['loss_s'] = _time_loss(setup, state, batch, loss_config, repeats=repeats)
  results['images_per_s'] = batch_size / results['full_s']
  results['loss_share'] = results['loss_s'] / results['full_s']
  results['difference_share'] = 1.0 - results['no_loss_s'] / results['full_s']
  return results


def _time_loss(setup, state, batch, loss_config, *, repeats: int) -> float:
  """Median seconds of the jitted loss forward+backward on this batch's head outputs."""
  images = yolo.unit_images(batch['images'])
  outputs, _ = setup.model.apply(
    {'params': state.params, 'batch_stats': state.batch_stats},
    images,
    train=True,
    mutable=['batch_stats'],
  )
  outputs = [o.astype(jnp.float32) for o in outputs]
  grad_fn = jax.jit(jax.value_and_grad(reorg_jax.aux_ota_loss, has_aux=True), static_argnums=(2, 3))
  args = (outputs, batch['targets'], setup.image_hw, loss_config)
  jax.block_until_ready(grad_fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(grad_fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def vs_upstream(args: argparse.Namespace) -> None:
  """Whole steps, ours against upstream's, each in its own process (see the module docstring)."""
  import device_step

  runs = []
  if 'nano' in args.models:
    runs.append(('nano', args.nano_size, args.nano_batch))
  if 'w6' in args.models:
    runs.append(('w6', args.w6_size, args.w6_batch))
  print(
    f'{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; {args.boxes} boxes '
    f'per image, {args.classes} classes; best of {args.rounds} rounds, median of '
    f'{args.repeats} steps each'
  )
  print(
    f'{"model":<6} {"size":>5} {"batch":>5} {"ours compile s":>14} {"ours step s":>11} '
    f'{"upstream 1st s":>14} {"upstream step s":>15} {"ours / upstream":>15}'
  )
  for model, size, batch in runs:
    spec = {
      'model': model,
      'image_size': size,
      'batches': [batch],
      'dtypes': ['float32'],
      'num_classes': args.classes,
      'boxes': args.boxes,
      'repeats': args.repeats,
      'smoke': False,
      'memory_only': False,
      'run': True,
    }
    best: dict[str, dict] = {}
    for round_ in range(args.rounds):
      order = ('ours', 'upstream') if round_ % 2 == 0 else ('upstream', 'ours')
      for framework in order:
        env = device_step.worker_environment(framework, same=args.same_environment)
        (row,) = device_step._in_own_process(framework, spec, timeout=3600, env=env)[1]
        if framework not in best or row['step_s'] < best[framework]['step_s']:
          best[framework] = row
    ours, theirs = best['ours'], best['upstream']
    ratio = theirs['step_s'] / ours['step_s']
    print(
      f'{model:<6} {size:>5} {batch:>5} {ours["compile_s"]:>14.1f} {ours["step_s"]:>11.3f} '
      f'{theirs["compile_s"]:>14.2f} {theirs["step_s"]:>15.3f} {ratio:>14.2f}x'
    )
    print(
      f'ratio: model={model} size={size} batch={batch} ours_step_s={ours["step_s"]:.4g} '
      f'upstream_step_s={theirs["step_s"]:.4g} ours_vs_upstream={ratio:.2f}',
      flush=True,
    )


def main() -> None:
  import device_step

  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', nargs='+', default=['nano', 'w6'], choices=['nano', 'w6'])
  parser.add_argument('--nano-size', type=int, default=256)
  parser.add_argument('--nano-batch', type=int, default=8)
  parser.add_argument('--w6-size', type=int, default=640)
  parser.add_argument('--w6-batch', type=int, default=2)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--vs-upstream', action='store_true', help="whole steps against upstream's")
  parser.add_argument('--rounds', type=int, default=2, help='--vs-upstream: alternating rounds')
  device_step.add_same_environment_option(parser, applies_to='--vs-upstream: ')
  parser.add_argument('--boxes', type=int, default=7, help='--vs-upstream: boxes per image')
  parser.add_argument('--classes', type=int, default=80, help='--vs-upstream: classes')
  args = parser.parse_args()
  if args.vs_upstream:
    vs_upstream(args)
    return
  print(f'{platform.processor() or platform.machine()}, jax {jax.__version__}, {jax.devices()}')
  with tempfile.TemporaryDirectory() as root:
    size = max(args.nano_size, args.w6_size)
    data_yaml = synthetic.write_dataset(root, num_train=16, num_val=1, image_size=size, seed=0)
    data = dataset.load_dataset(data_yaml, split='train')
    runs = []
    if 'nano' in args.models:
      runs.append(('p6_nano', yolo.p6_nano, args.nano_size, args.nano_batch))
    if 'w6' in args.models:
      w6 = _w6_path()
      if w6 is None:
        print('yolov7-w6: skipped (the sas_yolov7 package with its cfg/ files is not installed)')
      else:
        runs.append(
          ('yolov7-w6', functools.partial(yolo.build_model, w6), args.w6_size, args.w6_batch)
        )
    print(
      f'{"model":<10} {"size":>5} {"batch":>5} {"compile s":>9} {"step s":>8} {"img/s":>7} '
      f'{"no-loss s":>9} {"loss s":>8} {"share loss/full":>15} {"share 1-no_loss/full":>20}'
    )
    for name, build, image_size, batch_size in runs:
      model = build(num_classes=data.num_classes)
      r = benchmark(
        model, data=data, image_size=image_size, batch_size=batch_size, repeats=args.repeats
      )
      print(
        f'{name:<10} {image_size:>5} {batch_size:>5} {r["full_compile_s"]:>9.1f} '
        f'{r["full_s"]:>8.3f} {r["images_per_s"]:>7.2f} {r["no_loss_s"]:>9.3f} '
        f'{r["loss_s"]:>8.4f} {r["loss_share"]:>15.1%} {r["difference_share"]:>20.1%}'
      )


if __name__ == '__main__':
  main()
