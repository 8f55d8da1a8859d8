"""Cost per training sample of each augmentation option, ours against upstream's loader.

Both frameworks build training samples of the same synthetic dataset (box
labels, and the same images with polygon labels) at one image size, each in
its own process: ours with :func:`reorg_jax.data.loader.load_sample`, upstream's
with ``LoadImagesAndLabels.__getitem__``. Variants, each changing one thing
from the one before it:

* ``boxes``: box labels, 4-image mosaics, no mixup, no paste_in;
* ``segments``: polygon labels (the mosaic warp re-boxes resampled polygons);
* ``mosaic9``: every mosaic a 9-image one (upstream: its 4-image choice is
  replaced in the worker);
* ``paste_in``: 4-image mosaics again, paste_in on every sample.

Each variant is timed over ``--samples`` samples, ``--repeats`` times; the
best run's milliseconds per sample are printed with the cost added over
``boxes`` and the ratio upstream / ours measured in the same run.

    python benchmarks/augment_speed.py                       # 320 px, 200 samples
    python benchmarks/augment_speed.py --size 640 --samples 100
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

import numpy as np
import yaml

_TESTS = pathlib.Path(__file__).resolve().parent.parent / 'tests'
VARIANTS = ('boxes', 'segments', 'mosaic9', 'paste_in')


def _changes(variant: str) -> dict:
  """hyp changes of ``variant`` (``mosaic9`` is handled apart: it is no hyp key upstream)."""
  base = {'mixup': 0.0, 'paste_in': 0.0}
  return {**base, 'paste_in': 1.0} if variant == 'paste_in' else base


def _hyp() -> dict:
  import sas_yolov7

  path = pathlib.Path(sas_yolov7.__file__).parent / 'data' / 'hyp.scratch.p6.yaml'
  return yaml.safe_load(path.read_text())


def _ours(root: pathlib.Path, args) -> dict[str, float]:
  from reorg_jax.data import augment, dataset, loader

  sets = {
    name: dataset.load_dataset(root / name / 'data.yaml', split='train')
    for name in ('boxes', 'polygons')
  }
  keys = [f.name for f in augment.dataclasses.fields(augment.AugmentConfig) if f.name != 'mosaic9']
  results = {}
  for variant in VARIANTS:
    hyp = {**_hyp(), **_changes(variant)}
    config = augment.AugmentConfig(
      **{k: hyp[k] for k in keys}, mosaic9=1.0 if variant == 'mosaic9' else 0.0
    )
    data = sets['boxes' if variant == 'boxes' else 'polygons']
    best = float('inf')
    for repeat in range(args.repeats):
      start = time.perf_counter()
      for i in range(args.samples):
        rng = np.random.default_rng([repeat, i])
        loader.load_sample(data, i % len(data), image_size=args.size, config=config, rng=rng)
      best = min(best, (time.perf_counter() - start) / args.samples)
    results[variant] = best * 1e3
  return results


def _upstream(root: pathlib.Path, args) -> dict[str, float]:
  import random

  from reorg_jax.reference import oracle  # the torchvision stand-in, the label scan's progress

  # isort: split
  from sas_yolov7.utils import datasets as reference

  reference.zip = oracle.LabelScanProgress
  sets = {
    name: reference.LoadImagesAndLabels(
      str(root / name / 'images' / 'train'), img_size=args.size, augment=True, hyp=_hyp()
    )
    for name in ('boxes', 'polygons')
  }
  four = reference.load_mosaic
  results = {}
  for variant in VARIANTS:
    data = sets['boxes' if variant == 'boxes' else 'polygons']
    data.hyp = {**_hyp(), **_changes(variant)}
    reference.load_mosaic = reference.load_mosaic9 if variant == 'mosaic9' else four
    best = float('inf')
    for repeat in range(args.repeats):
      random.seed(repeat)
      start = time.perf_counter()
      for i in range(args.samples):
        data[i % len(data)]
      best = min(best, (time.perf_counter() - start) / args.samples)
    results[variant] = best * 1e3
  return results


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--size', type=int, default=320, help='training image side in pixels')
  parser.add_argument('--images', type=int, default=16, help='images in the dataset')
  parser.add_argument('--samples', type=int, default=200, help='samples per timed run')
  parser.add_argument('--repeats', type=int, default=3, help='timed runs (the best counts)')
  parser.add_argument('--worker', choices=('ours', 'upstream'), help=argparse.SUPPRESS)
  parser.add_argument('--root', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    run = _ours if args.worker == 'ours' else _upstream
    print(json.dumps(run(pathlib.Path(args.root), args)))
    return

  from reorg_jax.data import synthetic

  print(f'{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs')
  print(
    f'{args.images} synthetic images of {args.size} px (6 shapes at most each), '
    f'{args.samples} samples per run, best of {args.repeats} runs'
  )
  with tempfile.TemporaryDirectory() as tmp:
    root = pathlib.Path(tmp)
    for name in ('boxes', 'polygons'):
      synthetic.write_dataset(
        root / name,
        num_train=args.images,
        num_val=1,
        image_size=args.size,
        seed=0,
        polygons=name == 'polygons',
      )
    results = {}
    for framework in ('ours', 'upstream'):
      command = [sys.executable, os.path.abspath(__file__), '--worker', framework, '--root', tmp]
      command += ['--size', str(args.size), '--samples', str(args.samples)]
      command += ['--repeats', str(args.repeats)]
      out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
      results[framework] = json.loads(out.strip().splitlines()[-1])
  ours, theirs = results['ours'], results['upstream']
  print(f'{"variant":10} {"ours ms":>8} {"added":>7} {"upstream ms":>12} {"added":>7} {"ratio":>6}')
  for variant in VARIANTS:
    print(
      f'{variant:10} {ours[variant]:8.2f} {ours[variant] - ours["boxes"]:+7.2f} '
      f'{theirs[variant]:12.2f} {theirs[variant] - theirs["boxes"]:+7.2f} '
      f'{theirs[variant] / ours[variant]:6.2f}'
    )
  print('ratio: upstream time / ours (above 1: ours is faster); added: over "boxes"')


if __name__ == '__main__':
  main()
