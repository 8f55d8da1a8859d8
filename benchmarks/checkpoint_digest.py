"""Cost of the checkpoint digests on a YOLOv7-W6 training state.

Builds the full :class:`reorg_jax.training.step.TrainState` of W6 (weights, BatchNorm
statistics, optimiser state, EMA) from upstream's ``cfg/training/yolov7-w6.yaml``
with random weights (no initialisation is compiled: the variables' shapes come
from ``jax.eval_shape``; SHA-256 costs the same on any bytes), then measures,
in one process:

* ``digests``: :func:`reorg_jax.training.integrity.digests` of the state alone;
* ``save``: the time :meth:`Checkpoints.save` takes to return (the caller's
  pause; the write itself continues in the background) and the time until
  the write is on disk, with the digests and with them switched off (the
  reference, same run, same directory kind).

Times are best-of and median of ``--repeats`` saves.

    python benchmarks/checkpoint_digest.py [--repeats 5] [--dir DIRECTORY]
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import pathlib
import platform
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from reorg_jax.models import yolo
from reorg_jax.training import assembly, checkpoint, integrity, optim
from reorg_jax.training import step as train_lib


def _w6_path() -> pathlib.Path:
  spec = importlib.util.find_spec('sas_yolov7')
  if spec is None or spec.origin is None:
    raise SystemExit('needs the sas_yolov7 package (its cfg/training/yolov7-w6.yaml)')
  return pathlib.Path(spec.origin).parent / 'cfg' / 'training' / 'yolov7-w6.yaml'


def w6_state(*, image_size: int = 256) -> train_lib.TrainState:
  """The W6 train state with random variables of the right shapes."""
  model = yolo.build_model(_w6_path(), num_classes=80)
  dummy = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), dummy)
  rng = np.random.default_rng(0)
  variables = jax.tree.map(
    lambda s: jnp.asarray(rng.standard_normal(s.shape, np.float32).astype(s.dtype)), shapes
  )
  schedule = optim.Schedule(epochs=1, batch_size=16, steps_per_epoch=100)
  state = assembly.assemble(
    model, image_size=image_size, schedule=schedule, variables=variables
  ).state
  return jax.block_until_ready(state)


def _saves(state, directory: pathlib.Path, *, repeats: int) -> tuple[list[float], list[float]]:
  """(seconds until ``save`` returns, seconds until the write is done) per save."""
  returned, done = [], []
  with checkpoint.Checkpoints(directory, save_every=1, keep_last=1) as ckpt:
    for step in range(repeats + 1):  # the first save is a warm-up
      start = time.perf_counter()
      ckpt.save(step, state)
      back = time.perf_counter()
      ckpt.wait()
      end = time.perf_counter()
      if step:
        returned.append(back - start)
        done.append(end - start)
  return returned, done


def _line(name: str, values: list[float]) -> str:
  return f'{name}: best {min(values):.3f} s, median {statistics.median(values):.3f} s'


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--dir', help='where to write the checkpoints (default: a temporary dir)')
  args = parser.parse_args()

  state = w6_state()
  leaves = jax.tree.leaves(integrity.unwrap_keys(state))
  size = sum(leaf.size * leaf.dtype.itemsize for leaf in leaves)
  print(
    f'W6 train state: {len(leaves)} arrays, {size / 2**20:.0f} MiB; '
    f'{jax.devices()[0].platform}, {platform.processor() or platform.machine()}'
  )
  times = []
  for _ in range(args.repeats):
    start = time.perf_counter()
    integrity.digests(state)
    times.append(time.perf_counter() - start)
  print(_line('digests alone', times) + f' ({size / 2**20 / min(times):.0f} MiB/s)')

  with tempfile.TemporaryDirectory(dir=args.dir) as root:
    root = pathlib.Path(root)
    with_returned, with_done = _saves(state, root / 'with', repeats=args.repeats)
    real = integrity.digests
    integrity.digests = lambda tree: {}  # the reference: no digests
    try:
      without_returned, without_done = _saves(state, root / 'without', repeats=args.repeats)
    finally:
      integrity.digests = real
  print(_line('save returns, with digests   ', with_returned))
  print(_line('save returns, without digests', without_returned))
  print(_line('write done, with digests     ', with_done))
  print(_line('write done, without digests  ', without_done))
  print(
    'ratio with/without (medians): save returns '
    f'{statistics.median(with_returned) / statistics.median(without_returned):.2f}x, '
    f'write done {statistics.median(with_done) / statistics.median(without_done):.2f}x'
  )


if __name__ == '__main__':
  main()
