"""Speed and memory of the jitted aux OTA loss against upstream's ComputeLossAuxOTA.

Each framework runs in its own worker process, started by this script, on the
same inputs (both workers draw them from the same seeded NumPy generator).
Only one worker computes at a time: for every box count the script runs
``--rounds`` rounds, alternating which framework goes first, and in each
round a worker makes one untimed call, then times ``--repeats`` forward and
``--repeats`` forward+backward calls and reports the best of each (the run
least disturbed by other work on the machine). The table prints the median
over rounds of those bests with their range, the best over all rounds, and
the ratios upstream / ours: of the two overall bests, and round by round
(median and range). On a machine shared with other work the overall best is
the least disturbed figure of each side. Upstream's inputs require
grad, as in training; compilation is excluded (it happens in the first,
untimed call of a box count).

Each side also counts the minor page faults of its timed forward+backward
calls (``getrusage``): the pages a call touched for the first time, mostly
memory its outputs and temporaries were freshly given.

Last, both workers time writing one float32 array of each head output's shape
(the ``2L`` gradients, 277 MB at the defaults) into freshly allocated memory,
which any forward+backward that returns them does too, and prints upstream's
forward+backward over our write: the ratio the script would print if our loss
cost nothing beyond writing its gradients. Where the allocator maps large
arrays fresh on every call (glibc does for arrays over 32 MiB) this write is
mostly the page faults of first touch, and it does not shrink with the loss's
own work.

Why not one process: XLA:CPU's and torch's thread pools both keep their
threads spinning for a while after each call. In one process the idle
framework's spinning threads take cores from the working one, and on a
2-core machine that slowed upstream down far more than ours (upstream's
forward at 7 boxes per image: about 136 ms in one process, 80 ms alone), so
one-process ratios overstated ours. A user runs one framework alone, and so
does each worker: the idle one blocks on its pipe, and a short pause before
each timed call lets its threads settle.

    python benchmarks/loss_speed.py              # B=16, 640x640, C=80, 7 and 30 boxes/image
    python benchmarks/loss_speed.py --sweep      # plus 0..200 boxes/image
    python benchmarks/loss_speed.py --memory     # plus B=16 with 300 boxes/image (ours only)
    python benchmarks/loss_speed.py --one-branch # our loss compiled as one branch
    python benchmarks/loss_speed.py --rounds 9 --repeats 5

The upstream package (``pip install -e '.[test]'``) is needed for the ratios;
without it only our times are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

import reorg_jax
from reorg_jax import testing

_TESTS = pathlib.Path(__file__).resolve().parent.parent / 'tests'
# Pause before each timed call, so that the other worker's threads have gone idle.
_SETTLE_S = 0.3


def make_case(
  seed: int, batch: int, boxes: int, size: int, num_classes: int, *, one_branch: bool = False
):
  """``(config, hw, targets, outputs)``: ``boxes`` boxes per image, ``2L`` NumPy head outputs.

  The scene of :func:`reorg_jax.testing.random_scene` with ``M = max(boxes, 1)``;
  upstream's label rows of the same boxes are ``targets.to_yolo()``. ``one_branch``:
  the config's speed settings are :data:`reorg_jax.testing.ONE_BRANCH` (the same results).
  """
  config, targets, outputs = testing.random_scene(
    seed,
    [boxes] * batch,
    num_classes=num_classes,
    max_boxes=max(boxes, 1),
    image_hw=(size, size),
    **(testing.ONE_BRANCH if one_branch else {}),
  )
  return config, (size, size), targets, [np.array(o) for o in outputs]  # writable, for torch


def _times_ms(fn, repeats: int, faults: list[int] | None = None) -> list[float]:
  """Milliseconds of ``repeats`` calls; appends each call's minor page faults to ``faults``.

  The fault count (``getrusage``, read outside the timed window) is the number
  of pages the call touched for the first time: on Linux, mostly freshly
  mapped memory of its outputs and temporaries.
  """
  times = []
  for _ in range(repeats):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    fn()
    times.append((time.perf_counter() - start) * 1e3)
    if faults is not None:
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
  return times


def _ours(config, hw, targets, outputs):
  """``(forward, forward_backward)`` callables of our jitted loss; the first call compiles."""
  import jax

  loss_fn = jax.jit(reorg_jax.aux_ota_loss, static_argnums=(2, 3))
  grad_fn = jax.jit(jax.value_and_grad(reorg_jax.aux_ota_loss, has_aux=True), static_argnums=(2, 3))
  device_outputs = [jax.device_put(o) for o in outputs]

  def forward():
    jax.block_until_ready(loss_fn(device_outputs, targets, hw, config))

  def forward_backward():
    jax.block_until_ready(grad_fn(device_outputs, targets, hw, config))

  return forward, forward_backward


def _upstream(config, hw, targets, outputs):
  """The same for upstream, on the label rows of ``targets``."""
  import torch

  from reorg_jax.reference import oracle

  reference = oracle.reference_loss(config)
  rows = torch.from_numpy(targets.to_yolo())
  imgs = torch.zeros(len(outputs[0]), 3, *hw)

  def inputs():
    return [torch.from_numpy(o).requires_grad_(True) for o in outputs]

  def forward():
    reference(inputs(), rows, imgs)

  def forward_backward():
    loss, _ = reference(inputs(), rows, imgs)
    loss.backward()

  return forward, forward_backward


def _upstream_missing() -> str | None:
  """Why upstream cannot run here, or None."""
  try:
    from reorg_jax.reference import oracle

    oracle.reference_loss_module()
  except ImportError as error:
    return f'upstream not installed ({error})'
  return None


def _head_shapes(args: argparse.Namespace) -> list[tuple[int, ...]]:
  """The ``2L`` head output shapes ``[B, A, H_l, W_l, 5 + C]`` of :func:`make_case`'s scenes."""
  config = reorg_jax.LossConfig.p6(args.classes)
  level_shapes = [
    (args.batch, config.num_anchors, args.size // s, args.size // s, 5 + args.classes)
    for s in config.strides
  ]
  return level_shapes * 2


def _fresh_gradients(framework: str, shapes: list[tuple[int, ...]]):
  """A callable writing one float32 array of each shape into freshly allocated memory.

  This is the least any forward+backward that returns the head gradients must
  do: every one of their pages is written once. Ours is a jitted fill (XLA
  allocates its outputs anew on every call), upstream's ``torch.full``.
  """
  if framework == 'ours':
    import jax
    import jax.numpy as jnp

    fill = jax.jit(lambda value: [jnp.full(shape, value, jnp.float32) for shape in shapes])
    value = jax.device_put(np.float32(1.0))
    return lambda: jax.block_until_ready(fill(value))
  import torch

  return lambda: [torch.full(shape, 1.0, dtype=torch.float32) for shape in shapes]


def worker(framework: str, args: argparse.Namespace) -> None:
  """Serves timing requests on stdin, one JSON line each, answering on stdout.

  A request ``{"boxes": n}`` builds (once per box count) the case and the
  callables, makes one untimed call of each, then times ``repeats`` calls of
  each and answers ``{"forward": [ms...], "backward": [ms...], "faults":
  [n...], "first_s": s}`` (``faults``: minor page faults of each timed
  forward+backward call). A request ``{"fresh": true}`` times
  :func:`_fresh_gradients` of the head output shapes the same way and answers
  ``{"fresh": [ms...], "faults": [n...]}``.
  """
  missing = _upstream_missing() if framework == 'upstream' else None
  print(json.dumps({'ready': missing is None, 'reason': missing}), flush=True)
  if missing is not None:
    return
  build = _ours if framework == 'ours' else _upstream
  cached, first, fresh = None, {}, None
  for line in sys.stdin:
    request = json.loads(line)
    if request.get('fresh'):
      if fresh is None:
        fresh = _fresh_gradients(framework, _head_shapes(args))
        fresh()
      time.sleep(_SETTLE_S)
      faults = []
      fresh_ms = _times_ms(fresh, args.repeats, faults)
      print(json.dumps({'fresh': fresh_ms, 'faults': faults}), flush=True)
      continue
    boxes = request['boxes']
    if cached is None or cached[0] != boxes:
      cached = None  # free the previous case first
      case = make_case(
        boxes, args.batch, boxes, args.size, args.classes, one_branch=args.one_branch
      )
      cached = (boxes, *build(*case))
      start = time.perf_counter()
      cached[1]()
      cached[2]()
      first[boxes] = time.perf_counter() - start
    _, forward, forward_backward = cached
    forward()
    forward_backward()
    time.sleep(_SETTLE_S)
    forward_ms = _times_ms(forward, args.repeats)
    faults = []
    backward_ms = _times_ms(forward_backward, args.repeats, faults)
    answer = {'forward': forward_ms, 'backward': backward_ms, 'faults': faults}
    print(json.dumps({**answer, 'first_s': first[boxes]}), flush=True)


def memory_worker(args: argparse.Namespace) -> None:
  """Ours only, alone in its process: B=16 with 300 boxes per image, forward+backward."""
  import jax

  boxes = 300
  config, hw, targets, outputs = make_case(boxes, 16, boxes, args.size, args.classes)
  grad_fn = jax.jit(jax.value_and_grad(reorg_jax.aux_ota_loss, has_aux=True), static_argnums=(2, 3))
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


class _Worker:
  """One framework's worker process, spoken to over pipes."""

  def __init__(self, framework: str, argv: list[str]):
    self.framework = framework
    self.process = subprocess.Popen(
      [sys.executable, os.path.abspath(__file__), '--worker', framework, *argv],
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      text=True,
    )
    hello = self._read()
    self.ready, self.reason = hello['ready'], hello['reason']

  def _read(self) -> dict:
    line = self.process.stdout.readline()
    if not line:
      code = self.process.wait()
      raise RuntimeError(f'the {self.framework} worker exited with status {code}; see above')
    return json.loads(line)

  def time(self, **request) -> dict:
    self.process.stdin.write(json.dumps(request) + '\n')
    self.process.stdin.flush()
    return self._read()

  def close(self) -> None:
    if self.process.stdin:
      self.process.stdin.close()
    self.process.wait()


def _cpu_name() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _spread(values: list[float], digits: int = 1, unit: str = '') -> str:
  """``median [min-max]``."""
  med, lo, hi = statistics.median(values), min(values), max(values)
  return f'{med:.{digits}f}{unit} [{lo:.{digits}f}-{hi:.{digits}f}]'


def _parse(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--size', type=int, default=640)
  parser.add_argument('--classes', type=int, default=80)
  parser.add_argument('--boxes', type=int, nargs='+', default=[7, 30])
  parser.add_argument('--sweep', action='store_true', help='add 0..200 boxes per image')
  parser.add_argument('--memory', action='store_true', help='add B=16 x 300 boxes, ours only')
  parser.add_argument('--repeats', type=int, default=5, help='timed calls per round (best kept)')
  parser.add_argument('--rounds', type=int, default=5, help='alternating rounds per box count')
  parser.add_argument(
    '--one-branch',
    action='store_true',
    help='our loss with capacity_fractions=() and batch_groups=1: one branch to compile '
    'instead of 12, the same results (the compile time prints as "our first calls")',
  )
  parser.add_argument('--worker', choices=['ours', 'upstream', 'memory'], help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  for name in ('batch', 'size', 'classes', 'repeats', 'rounds'):
    if getattr(args, name) < 1:
      parser.error(f'--{name} must be >= 1, got {getattr(args, name)}')
  if min(args.boxes) < 0:
    parser.error(f'--boxes must be >= 0, got {args.boxes}')
  shared = [
    f'--batch={args.batch}',
    f'--size={args.size}',
    f'--classes={args.classes}',
    f'--repeats={args.repeats}',
    *(['--one-branch'] if args.one_branch else []),
  ]
  return args, shared


def _alternate(workers: list[_Worker], rounds: int, **request) -> dict[str, list[dict]]:
  """Each ready worker's answers to ``rounds`` requests, alternating which worker goes first."""
  answers = {w.framework: [] for w in workers}
  for round_index in range(rounds):
    for w in workers if round_index % 2 == 0 else workers[::-1]:
      if w.ready:
        answers[w.framework].append(w.time(**request))
  return answers


def _faults(answers: list[dict]) -> str:
  """Median minor page faults per call over all of a side's timed calls, in thousands."""
  return f'{statistics.median(n for a in answers for n in a["faults"]) / 1e3:.1f}k'


def _print_fresh(workers: list[_Worker], rounds: int, upstream_backward: dict[int, float]) -> None:
  """Times writing the head gradients into fresh memory on each side and prints what it bounds.

  A forward+backward that returns the ``2L`` head gradients writes each of
  their pages at least once; upstream's forward+backward over our time for
  that write alone is the ratio if our loss cost nothing more.
  """
  answers = _alternate(workers, rounds, fresh=True)
  bests = {side: [min(a['fresh']) for a in answers[side]] for side in answers}
  ours = min(bests['ours'])
  text = f'ours {ours:.1f} ms {_spread(bests["ours"])} ({_faults(answers["ours"])} page faults)'
  if bests['upstream']:
    upstream = f'{min(bests["upstream"]):.1f} ms {_spread(bests["upstream"])}'
    text = f'upstream {upstream} ({_faults(answers["upstream"])} page faults), ' + text
  print(f'writing the head gradients into fresh memory: {text}')
  for boxes, upstream_ms in upstream_backward.items():
    print(
      f'{boxes:>9}  fwd+bwd if ours only wrote its gradients: upstream best / our write = '
      f'{upstream_ms:.1f} / {ours:.1f} = {upstream_ms / ours:.1f}x'
    )


def main(argv: list[str] | None = None) -> None:
  args, shared = _parse(argv)
  if args.worker == 'memory':
    memory_worker(args)
    return
  if args.worker is not None:
    worker(args.worker, args)
    return

  counts = sorted(set(args.boxes + ([0, 10, 25, 50, 100, 200] if args.sweep else [])))
  print(
    f'# {_cpu_name()}, {len(os.sched_getaffinity(0))} usable CPUs, '
    f'load average {os.getloadavg()[0]:.2f} at start'
  )
  print(
    f'# B={args.batch}, {args.size}x{args.size}, C={args.classes}; each framework in its own '
    f'process, {args.rounds} alternating rounds of best-of-{args.repeats}'
    + (
      '; our loss with one branch (capacity_fractions=(), batch_groups=1)'
      if args.one_branch
      else ''
    )
  )
  workers = [_Worker('ours', shared), _Worker('upstream', shared)]
  ours, upstream = workers
  if not upstream.ready:
    print(f'# {upstream.reason}: our times only')
  print("ms: best of all rounds; median over rounds of each round's best [range over rounds]")
  print('ratio = upstream / ours: of the two bests; round by round, median [range]')
  print(
    f'{"boxes/img":>9}  {"":<8} {"up best":>8} {"upstream rounds":>22} {"ours best":>9} '
    f'{"ours rounds":>20} {"ratio":>6} {"ratio rounds":>18}'
  )
  upstream_backward = {}  # best forward+backward ms per box count
  try:
    for boxes in counts:
      results = _alternate(workers, args.rounds, boxes=boxes)
      for key, label in (('forward', 'fwd'), ('backward', 'fwd+bwd')):
        ours_best = [min(r[key]) for r in results['ours']]
        ours_text = f'{min(ours_best):>9.1f} {_spread(ours_best):>20}'
        if upstream.ready:
          up_best = [min(r[key]) for r in results['upstream']]
          if key == 'backward':
            upstream_backward[boxes] = min(up_best)
          ratios = [u / o for u, o in zip(up_best, ours_best, strict=True)]
          line = (
            f'{min(up_best):>8.1f} {_spread(up_best):>22} {ours_text} '
            f'{min(up_best) / min(ours_best):>5.1f}x {_spread(ratios, 1, "x"):>18}'
          )
        else:
          line = f'{"n/a":>8} {"n/a":>22} {ours_text} {"n/a":>6} {"n/a":>18}'
        print(f'{boxes:>9}  {label:<8} {line}', flush=True)
      first = results['ours'][0]['first_s']
      faults = f'ours {_faults(results["ours"])}'
      if upstream.ready:
        faults = f'upstream {_faults(results["upstream"])}, {faults}'
      print(f'{"":>9}  (our first calls, compiling both: {first:.1f} s)', flush=True)
      print(f'{"":>9}  (minor page faults per fwd+bwd call, median: {faults})', flush=True)
    _print_fresh(workers, args.rounds, upstream_backward)
  finally:
    for w in workers:
      w.close()
  print(f'# load average {os.getloadavg()[0]:.2f} at end')

  if args.memory:
    subprocess.run(
      [sys.executable, os.path.abspath(__file__), '--worker', 'memory', *shared], check=True
    )


if __name__ == '__main__':
  main()
