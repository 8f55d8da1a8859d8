"""Training samples per second of our loader's worker processes, against upstream's loader.

Both sides build training samples of one synthetic dataset (box labels,
source images at the training size) with upstream's P6 recipe
(``hyp.scratch.p6.yaml``: mosaics, 20% of them of 9 images as upstream's
loader fixes, mixup on 15%, HSV, flips, translation and zoom), ``paste_in``
off:

* **ours**: :class:`reorg_jax.data.loader.BatchLoader` with ``num_workers`` worker
  processes (1, 2 and the machine's core count), each with one OpenCV
  thread, building batches of ``--batch`` images; timed from the second batch
  on, so the workers' start is not counted;
* **upstream**: the reference package's ``LoadImagesAndLabels.__getitem__``
  in a loop on one core (one OpenCV and one torch thread), which is what each
  of upstream's ``DataLoader`` workers does.

Each side and each worker count runs in its own process, one after the other
(a pool in the same process as the other framework would share its cores).
Printed per image size: samples/s, samples/s per worker, the per-worker rate
over upstream's per-core rate, and the scaling of 2 workers over 1 (ideal
2.0; it can only be reached with 2 free cores).

    python benchmarks/loader_speed.py                      # 640 and 1280 px
    python benchmarks/loader_speed.py --sizes 640 --samples 48

Needs the test extra (``pip install -e '.[test]'``) for the upstream side.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

import yaml

_TESTS = pathlib.Path(__file__).resolve().parent.parent / 'tests'


def _hyp() -> dict:
  """Upstream's P6 hyper-parameters with paste_in off."""
  import sas_yolov7

  path = pathlib.Path(sas_yolov7.__file__).parent / 'data' / 'hyp.scratch.p6.yaml'
  return {**yaml.safe_load(path.read_text()), 'paste_in': 0.0}


def _ours(root: pathlib.Path, size: int, workers: int, args: argparse.Namespace) -> float:
  """Samples/s of a ``BatchLoader`` with ``workers`` worker processes (best of the repeats)."""
  from reorg_jax.data import augment, dataset, loader

  data = dataset.load_dataset(root / 'data.yaml', split='train')
  # AugmentConfig's defaults are hyp.scratch.p6; upstream's loader makes 20% of its
  # mosaics 9-image ones (a constant in its code, not a hyp key).
  config = augment.AugmentConfig(paste_in=0.0, mosaic9=0.2)
  steps = -(-args.samples // args.batch)
  with loader.BatchLoader(
    data,
    batch_size=args.batch,
    image_size=size,
    max_boxes=loader.max_boxes_bound(data, config),
    seed=0,
    config=config,
    shuffle=True,
    drop_last=True,
    num_workers=workers,
  ) as feed:
    feed.batch(0, 0)  # starts the workers
    best = 0.0
    for repeat in range(args.repeats):
      started = time.perf_counter()
      for step in range(steps):
        feed.batch(1 + repeat, step % feed.steps_per_epoch)
      best = max(best, steps * args.batch / (time.perf_counter() - started))
  return best


def _upstream(root: pathlib.Path, size: int, args: argparse.Namespace) -> float:
  """Samples/s of ``LoadImagesAndLabels.__getitem__`` on one core (best of the repeats)."""
  import random

  import cv2
  import torch

  from reorg_jax.reference import oracle  # the torchvision stand-in, the label scan's progress

  # isort: split
  from sas_yolov7.utils import datasets as reference

  cv2.setNumThreads(1)
  torch.set_num_threads(1)
  reference.zip = oracle.LabelScanProgress
  data = reference.LoadImagesAndLabels(
    str(root / 'images' / 'train'), img_size=size, augment=True, hyp=_hyp()
  )
  data[0]  # first reads, as our side's first batch
  best = 0.0
  for repeat in range(args.repeats):
    random.seed(repeat)
    started = time.perf_counter()
    for i in range(args.samples):
      data[i % len(data)]
    best = max(best, args.samples / (time.perf_counter() - started))
  return best


def _measure(root: pathlib.Path, side: str, size: int, workers: int, args) -> float:
  command = [sys.executable, os.path.abspath(__file__), '--worker', side, '--root', str(root)]
  command += ['--size', str(size), '--workers', str(workers), '--samples', str(args.samples)]
  command += ['--batch', str(args.batch), '--repeats', str(args.repeats)]
  out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
  return json.loads(out.strip().splitlines()[-1])['samples_per_s']


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--sizes', type=int, nargs='+', default=[640, 1280], help='image sides')
  parser.add_argument('--images', type=int, default=24, help='images in the dataset')
  parser.add_argument('--samples', type=int, default=64, help='samples per timed run')
  parser.add_argument('--batch', type=int, default=8, help='images per batch (ours)')
  parser.add_argument('--repeats', type=int, default=2, help='timed runs (the best counts)')
  parser.add_argument(
    '--max-workers', type=int, default=os.cpu_count() or 1, help='N, the largest worker count'
  )
  parser.add_argument('--worker', choices=('ours', 'upstream'), help=argparse.SUPPRESS)
  parser.add_argument('--root', help=argparse.SUPPRESS)
  parser.add_argument('--size', type=int, help=argparse.SUPPRESS)
  parser.add_argument('--workers', type=int, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    root = pathlib.Path(args.root)
    if args.worker == 'ours':
      rate = _ours(root, args.size, args.workers, args)
    else:
      rate = _upstream(root, args.size, args)
    print(json.dumps({'samples_per_s': rate}))
    return 0

  from reorg_jax.data import synthetic

  counts = sorted({1, 2, max(1, args.max_workers)})
  print(f'{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs')
  print(
    f'{args.images} synthetic images per size, hyp.scratch.p6 with paste_in 0, '
    f'{args.samples} samples per timed run, best of {args.repeats}; ours in batches of '
    f'{args.batch}, workers {counts}'
  )
  print(f'{"size":>5} {"loader":22} {"samples/s":>10} {"per worker":>11} {"vs upstream":>12}')
  with tempfile.TemporaryDirectory() as tmp:
    for size in args.sizes:
      root = pathlib.Path(tmp) / str(size)
      synthetic.write_dataset(root, num_train=args.images, num_val=1, image_size=size, seed=0)
      upstream = _measure(root, 'upstream', size, 1, args)
      print(f'{size:5d} {"upstream, one core":22} {upstream:10.2f} {upstream:11.2f} {1.0:12.2f}')
      rates = {}
      for workers in counts:
        rates[workers] = rate = _measure(root, 'ours', size, workers, args)
        per = rate / workers
        label = f'ours, {workers} worker{"s" if workers > 1 else ""}'
        print(f'{size:5d} {label:22} {rate:10.2f} {per:11.2f} {per / upstream:12.2f}')
      print(
        f'ratio: size={size} per_worker_1_vs_upstream_core={rates[1] / upstream:.2f} '
        f'workers_2_vs_1={rates[2] / rates[1]:.2f}',
        flush=True,
      )
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
