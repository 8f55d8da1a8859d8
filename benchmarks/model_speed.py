"""Compile and run times of a YAML-built model: init, training step, evaluation, predict.

The training step is ``jax.value_and_grad`` of the aux OTA loss on random
boxes followed by an SGD update, all in one jitted function, as a trainer
would run it. Times are wall-clock seconds; run times are medians of repeated
calls after the first (compiling) call.

    python benchmarks/model_speed.py                                  # the small model
    python benchmarks/model_speed.py --config path/to/yolov7-w6.yaml --size 640 --batch 2
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import jax
import numpy as np
import optax

import reorg_jax
from reorg_jax import testing
from reorg_jax.models import inference, yolo
from reorg_jax.training import assembly


def _timed(fn, *args, repeats: int) -> tuple[float, float]:
  """(first call, median of later calls) in seconds, waiting for the results."""
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - start
  later = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    later.append(time.perf_counter() - start)
  return first, statistics.median(later)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default=None, help='model YAML (default: the small model)')
  parser.add_argument('--classes', type=int, default=None, help='override the number of classes')
  parser.add_argument('--size', type=int, default=256, help='square input size in pixels')
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--boxes', type=int, default=10, help='boxes per training image')
  parser.add_argument('--repeats', type=int, default=5)
  args = parser.parse_args()

  config = yolo.NANO_CONFIG if args.config is None else args.config
  model = yolo.build_model(config, num_classes=args.classes)
  images = jax.random.uniform(jax.random.key(0), (args.batch, args.size, args.size, 3))
  print(
    f'{platform.processor() or platform.machine()}, {jax.devices()[0].platform}, '
    f'jax {jax.__version__}'
  )
  name = 'yolov7-p6-nano' if args.config is None else args.config
  print(f'model {name}: {model.num_classes} classes, input {args.batch}x{args.size}x{args.size}')

  init = jax.jit(lambda key, x: model.init(key, x, train=True))
  start = time.perf_counter()
  variables = jax.block_until_ready(init(jax.random.key(1), images))
  first = time.perf_counter() - start
  count = sum(leaf.size for leaf in jax.tree.leaves(variables['params']))
  print(f'parameters {count:,}')
  print(f'init          first call {first:7.2f} s')

  loss_config = assembly.loss_config(model, image_size=args.size, scaled=False)
  labels = testing.random_labels(
    np.random.default_rng(0),
    boxes_per_image=[args.boxes] * args.batch,
    num_classes=model.num_classes,
    image_hw=(args.size, args.size),
  )
  targets = reorg_jax.Targets.from_yolo(
    labels, args.batch, args.boxes, num_classes=model.num_classes
  )
  optimizer = optax.sgd(0.01, momentum=0.937, nesterov=True)
  opt_state = optimizer.init(variables['params'])

  @jax.jit
  def train_step(variables, opt_state, images, targets):
    def loss_fn(params):
      outputs, updates = model.apply(
        {**variables, 'params': params}, images, train=True, mutable=['batch_stats']
      )
      loss, _ = reorg_jax.aux_ota_loss(outputs, targets, (args.size, args.size), loss_config)
      return loss, updates['batch_stats']

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables['params'])
    steps, opt_state = optimizer.update(grads, opt_state, variables['params'])
    params = optax.apply_updates(variables['params'], steps)
    return {'params': params, 'batch_stats': stats}, opt_state, loss

  first, median = _timed(train_step, variables, opt_state, images, targets, repeats=args.repeats)
  print(f'train step    first call {first:7.2f} s   then {median:7.3f} s')

  evaluate = jax.jit(lambda v, x: model.apply(v, x, train=False))
  first, median = _timed(evaluate, variables, images, repeats=args.repeats)
  print(f'evaluation    first call {first:7.2f} s   then {median:7.3f} s')

  first, median = _timed(
    lambda v, x: inference.predict(model, v, x, score_threshold=0.001, iou_threshold=0.65),
    variables,
    images,
    repeats=args.repeats,
  )
  print(f'predict       first call {first:7.2f} s   then {median:7.3f} s')


if __name__ == '__main__':
  main()
