"""Speed and memory of the jitted aux OTA loss against upstream's ComputeLossAuxOTA.

Both run on the same inputs in the same process; the table prints
milliseconds (best of repeated runs, compilation excluded; the best is the
run least disturbed by other work on the machine, and both sides get it) for forward and
forward+backward of each, and the ratios upstream / ours. Upstream's inputs
require grad, as in training.

    python benchmarks/loss_speed.py              # B=16, 640x640, C=80, 7 and 30 boxes/image
    python benchmarks/loss_speed.py --sweep      # plus 0..200 boxes/image
    python benchmarks/loss_speed.py --memory     # plus B=16 with 300 boxes/image (ours only)

The upstream package (``pip install -e '.[test]'``) is needed for the ratios.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time

import jax
import numpy as np

import reorg_jax
from reorg_jax import testing

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'tests'))


def _best_ms(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append((time.perf_counter() - start) * 1e3)
  return min(times)


def make_case(seed: int, batch: int, boxes: int, size: int, num_classes: int):
  rng = np.random.default_rng(seed)
  config = reorg_jax.LossConfig.p6(num_classes)
  hw = (size, size)
  labels = testing.random_labels(
    rng, boxes_per_image=[boxes] * batch, num_classes=num_classes, image_hw=hw
  )
  targets = reorg_jax.Targets.from_yolo(labels, batch, max(boxes, 1), num_classes=num_classes)
  outputs = testing.random_head_outputs(rng, config, batch_size=batch, image_hw=hw)
  return config, hw, targets, outputs


def time_ours(config, hw, targets, outputs, repeats: int) -> tuple[float, float]:
  loss_fn = jax.jit(reorg_jax.aux_ota_loss, static_argnums=(2, 3))
  grad_fn = jax.jit(jax.value_and_grad(reorg_jax.aux_ota_loss, has_aux=True), static_argnums=(2, 3))
  device_outputs = [jax.device_put(o) for o in outputs]
  jax.block_until_ready(loss_fn(device_outputs, targets, hw, config))
  jax.block_until_ready(grad_fn(device_outputs, targets, hw, config))
  forward = _best_ms(
    lambda: jax.block_until_ready(loss_fn(device_outputs, targets, hw, config)), repeats
  )
  backward = _best_ms(
    lambda: jax.block_until_ready(grad_fn(device_outputs, targets, hw, config)), repeats
  )
  return forward, backward


def time_upstream(config, hw, targets, outputs, repeats: int) -> tuple[float, float] | None:
  """Upstream forward and forward+backward in ms, inputs requiring grad as in training."""
  try:
    import oracle
    import torch
  except ImportError:
    return None
  reference = oracle.reference_loss(config)
  rows = torch.from_numpy(targets.to_yolo())
  imgs = torch.zeros(len(outputs[0]), 3, *hw)

  def inputs():
    return [torch.from_numpy(o).requires_grad_(True) for o in outputs]

  def forward_backward():
    loss, _ = reference(inputs(), rows, imgs)
    loss.backward()

  forward_backward()
  forward = _best_ms(lambda: reference(inputs(), rows, imgs), repeats)
  return forward, _best_ms(forward_backward, repeats)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--size', type=int, default=640)
  parser.add_argument('--classes', type=int, default=80)
  parser.add_argument('--boxes', type=int, nargs='+', default=[7, 30])
  parser.add_argument('--sweep', action='store_true', help='add 0..200 boxes per image')
  parser.add_argument('--memory', action='store_true', help='add B=16 x 300 boxes, ours only')
  parser.add_argument('--repeats', type=int, default=7)
  args = parser.parse_args(argv)

  print(
    f'# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, '
    f'jax {jax.__version__} on {jax.devices()[0].platform}'
  )
  print(f'# B={args.batch}, {args.size}x{args.size}, C={args.classes}, best of {args.repeats}')
  counts = sorted(set(args.boxes + ([0, 10, 25, 50, 100, 200] if args.sweep else [])))
  print('ms; ratio = upstream / ours')
  print(
    f'{"boxes/img":>9} {"up fwd":>10} {"up f+b":>10} {"ours fwd":>10} {"ours f+b":>10} '
    f'{"fwd ratio":>10} {"f+b ratio":>10}'
  )
  for boxes in counts:
    case = make_case(boxes, args.batch, boxes, args.size, args.classes)
    forward, backward = time_ours(*case, args.repeats)
    upstream = time_upstream(*case, max(1, min(args.repeats, 3)))
    if upstream is None:
      print(f'{boxes:>9} {"n/a":>10} {"n/a":>10} {forward:>10.1f} {backward:>10.1f}')
    else:
      up_forward, up_backward = upstream
      print(
        f'{boxes:>9} {up_forward:>10.1f} {up_backward:>10.1f} {forward:>10.1f} '
        f'{backward:>10.1f} {up_forward / forward:>9.1f}x {up_backward / backward:>9.1f}x'
      )

  if args.memory:
    boxes = 300
    config, hw, targets, outputs = make_case(boxes, 16, boxes, args.size, args.classes)
    grad_fn = jax.jit(
      jax.value_and_grad(reorg_jax.aux_ota_loss, has_aux=True), static_argnums=(2, 3)
    )
    compiled = grad_fn.lower(outputs, targets, hw, config).compile()
    analysis = compiled.memory_analysis()
    start = time.perf_counter()
    (loss, _), _ = jax.block_until_ready(compiled(outputs, targets))
    elapsed = time.perf_counter() - start
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    temp = getattr(analysis, 'temp_size_in_bytes', 0) / 2**30 if analysis else float('nan')
    print(
      f'# memory: B=16, {boxes} boxes/image, fwd+bwd: loss {float(loss):.3f} in '
      f'{elapsed:.1f} s, XLA temp buffers {temp:.2f} GiB, process peak RSS {peak_gib:.2f} GiB'
    )


if __name__ == '__main__':
  main()
