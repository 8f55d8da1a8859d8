"""Where one whole training step's time goes, ours beside upstream YOLOv7's, on a CPU.

The steps are the ones ``benchmarks/train_speed.py --vs-upstream`` times, built by
``benchmarks/device_step.py``'s workers: ours is
:func:`reorg_jax.training.step.train_step` (forward, lead-guided assignment and
loss, backward, optimiser, EMA; the state donated) compiled once; upstream's is
``Model``, ``ComputeLossAuxOTA``, backward, Nesterov ``SGD`` over
``train_aux.py``'s three parameter groups and ``ModelEMA``'s update, float32.
Same model, image size, batch, random images and ``--boxes`` random
boxes per image. Each framework runs in its own process (two frameworks' thread
pools in one process starve each other), with accelerators hidden: this is a CPU
profile. Each worker runs in the environment its program runs in when started
from this shell: ours with glibc's huge-page tunable where it helps, as
``reorg-jax`` and ``python -m train`` set it for themselves; upstream's as it
is (``--same-environment``: both as it is). Per model each side warms up (``--warmup`` steps after our
compilation), then runs ``--steps`` profiled steps, then ``--steps`` unprofiled
ones (the profilers add overhead; both sets are reported).

Categories of step time (ms per step and share of the step):

* convolution forward, backward by input, backward by weight;
* other fusions / elementwise; reductions (batch-norm statistics, max
  pooling, sums); copies / transposes (also reversals, concatenation,
  slicing, padding, gathers, scatters, upsampling);
* the loss: assignment and loss, forward and backward;
* optimiser + EMA;
* runtime (ours only): the host events around the operations (``PjitFunction``
  dispatch, argument and donated-buffer handling, output creation, the thunk
  executor between operations), counted only while no operation runs;
* unattributed: the rest of the step's wall time (ours: Python and
  ``block_until_ready``; upstream's: Python between operators outside the loss,
  which its profiler does not trace).

The loss and the optimiser take precedence: a convolution inside the loss
counts as loss.

Ours: ``jax.profiler`` traces the profiled steps (Python tracer off); every
XLA:CPU operation of the step's module is an event carrying its HLO
instruction's name, looked up in the compiled step's HLO text
(``compiled.as_text()``). The loss is wrapped in a ``jax.named_scope`` here (the
step's ``loss_fn`` argument: a change of names, not of the program), so its
instructions, backward ones included, carry the scope in their ``op_name``
metadata; instructions outside the forward and backward pass (no ``jvp(`` in
their ``op_name``: optimiser, EMA, the finite check and its guard of the state,
the image conversion) count as optimiser + EMA; an instruction without metadata
takes that of the conditional or loop that runs it. A fusion counts as a
convolution if it holds a convolution or dot (XLA:CPU rewrites some 1x1
convolutions as dots), else as a reduction if it holds one, else as a copy if it
holds only data movement, else as elementwise. A convolution is forward when its
``op_name`` has ``jvp(`` without ``transpose(``; a backward one is by weight when
its output's shape, ones dropped, is that of its layer's kernel or of one tap
of it (``[I, O]``: :mod:`reorg_jax.models.convolution` computes some kernels'
gradients one tap at a time) (the layer named by its ``op_name``; any kernel
of the model if it has none), else by input.

Upstream: ``torch.profiler`` (CPU) over the same steps. ``measure_upstream``
builds and runs the step (its first step is the first warm-up step); a hook on
the model's forward marks each step's start (after the image conversion) and
starts and stops the profiler there. The loss is a ``record_function`` around
``ComputeLossAuxOTA.__call__`` (wrapped in this worker while the step runs), and
its backward is the autograd nodes whose
sequence numbers belong to the loss's forward operators; the optimiser and
EMA are torch's own ``Optimizer.step`` / ``zero_grad`` ranges and the
``ModelEMA.update`` range ``measure_upstream`` puts around the EMA update.
Other operators count by their outermost named range (``ConvolutionBackward0``,
``NativeBatchNormBackward0``, ...), then by the ``aten::`` name. Upstream's
convolution backward computes both gradients in one operator
(``convolution_backward``), so it is one row, "not split", unless its profile
shows them apart; the table's "both" row compares the sums.

Attribution: per thread each event's exclusive time (minus the events nested in
it), then along the time line time is split evenly among the events running at
once on different threads. So a category is wall time, the categories and the
unattributed row add up to the mean profiled step, and work an operator hands
to a thread pool counts for that operator. Reported too: the wall time per step
(median) with and without profiling, and per step the user and system CPU
seconds, minor and major page faults and context switches of the whole process
(``getrusage`` deltas around the profiled and around the unprofiled steps).

Limits: a fusion's category follows its kind and its metadata (XLA keeps one
``op_name``, the root's), so work fused across a boundary counts on one side of
it (a convolution's fused bias or activation counts as convolution); batch norm
is one torch operator (statistics and normalisation, counted as a reduction)
but XLA splits it into reductions and elementwise fusions; torch's
``AccumulateGrad`` counts as elementwise; events running at once share time
evenly whatever their thread counts; profiling slows both sides, upstream's
more (its profiler records every operator: compare the profiled and unprofiled
wall rows); a few steps on a machine doing other work vary a lot, so read
the medians of several ``--steps``. Not a test.

Raw traces under ``--out`` (default: a new temporary folder), per model:
``ours/`` (the XPlane trace, a Perfetto ``perfetto_trace.json.gz``, and
``step.hlo.txt``), ``upstream/trace.json`` (Chrome trace) and ``summary.json``.

    python benchmarks/step_profile.py                          # nano at 256 px batch 8, W6 at 640 px batch 2
    python benchmarks/step_profile.py --models nano --steps 3
    python benchmarks/step_profile.py --models nano --image-size 64 --batch-size 2 --steps 2
"""

from __future__ import annotations

import argparse
import collections
import functools
import itertools
import json
import math
import os
import pathlib
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from typing import Any

# (key, label) of each category, in the table's order. 'conv_backward' is a convolution
# backward a profile does not split into its input and weight parts (upstream's).
CATEGORIES = (
  ('conv_forward', 'convolution forward'),
  ('conv_input', 'convolution backward, input'),
  ('conv_weight', 'convolution backward, weight'),
  ('conv_backward', 'convolution backward, not split'),
  ('elementwise', 'other fusions / elementwise'),
  ('reduction', 'reductions'),
  ('copy', 'copies / transposes'),
  ('loss', 'loss (assignment + loss)'),
  ('update', 'optimiser + EMA'),
  ('runtime', 'runtime: dispatch, buffers, scheduling'),
)
# Categories that count only while no operation runs (the runtime around the operations).
BACKGROUND = frozenset({'runtime'})
CONV_BACKWARD = ('conv_input', 'conv_weight', 'conv_backward')

# The loss's jax.named_scope (ours) and record_function label (upstream).
LOSS_SCOPE = 'step_profile_loss'

# Default (image side, batch) per model, as benchmarks/train_speed.py times them.
SIZES = {'nano': (256, 8), 'w6': (640, 2)}

# A span: (thread, start s, end s, key); a piece: (start s, end s, key).
Span = tuple[Any, float, float, Any]
Piece = tuple[float, float, Any]


# --- Attribution ---------------------------------------------------------------------------------


def exclusive_pieces(spans: Iterable[Span]) -> list[Piece]:
  """Per thread, the time of each span not covered by spans nested in it.

  Spans on one thread nest (a conditional holds its branch's operations); a
  span overlapping the end of its enclosing one is cut at that end.
  """
  by_thread: dict[Any, list[Piece]] = collections.defaultdict(list)
  for thread, start, end, key in spans:
    if end > start:
      by_thread[thread].append((start, end, key))
  pieces: list[Piece] = []
  for items in by_thread.values():
    items.sort(key=lambda s: (s[0], -s[1]))
    stack: list[tuple[float, Any]] = []  # (end, key), innermost last
    cursor = -math.inf
    for start, end, key in [*items, (math.inf, math.inf, None)]:
      while stack and stack[-1][0] <= start:  # close what ends before this span starts
        closing, closed = stack.pop()
        if closing > cursor:
          pieces.append((cursor, closing, closed))
          cursor = closing
      if key is None:
        break
      if stack and start > cursor:  # the enclosing span's own time up to here
        pieces.append((cursor, start, stack[-1][1]))
      cursor = start
      stack.append((min(end, stack[-1][0]) if stack else end, key))
  return pieces


def wall_attribution(
  pieces: Iterable[Piece], *, background: Callable[[Any], bool] = lambda key: False
) -> dict[Any, float]:
  """Seconds per key: each instant's wall time split evenly among the pieces running then.

  A piece whose key is ``background`` counts only at instants when no other piece
  runs. The values add up to the time during which any piece ran.
  """
  pieces = list(pieces)
  marks = sorted(
    [(start, 1, i) for i, (start, _, _) in enumerate(pieces)]
    + [(end, -1, i) for i, (_, end, _) in enumerate(pieces)]
  )
  seconds: dict[Any, float] = collections.defaultdict(float)
  active: tuple[dict[int, Any], dict[int, Any]] = ({}, {})  # foreground, background
  last = 0.0
  for t, change, i in marks:
    running = active[0] or active[1]
    if running and t > last:
      share = (t - last) / len(running)
      for key in running.values():
        seconds[key] += share
    last = t
    key = pieces[i][2]
    layer = active[1] if background(key) else active[0]
    if change > 0:
      layer[i] = key
    else:
      layer.pop(i, None)
  return dict(seconds)


def summarise(spans: list[Span], *, steps: int, top: int) -> dict[str, Any]:
  """Per-step seconds per category, the busiest operations and the thread time of ``spans``.

  Span keys are ``(category, operation)``; categories in :data:`BACKGROUND` count only
  while no other span runs.
  """
  pieces = exclusive_pieces(spans)
  by_key = wall_attribution(pieces, background=lambda key: key[0] in BACKGROUND)
  categories = {key: 0.0 for key, _ in CATEGORIES}
  for (category, _), seconds in by_key.items():
    categories[category] += seconds / steps
  busiest = sorted(by_key.items(), key=lambda item: -item[1])[:top]
  return {
    'categories': categories,
    'top': [[category, name, seconds / steps] for (category, name), seconds in busiest],
    'thread_s': sum(end - s for s, end, key in pieces if key[0] not in BACKGROUND) / steps,
    'threads': len({span[0] for span in spans if span[3][0] not in BACKGROUND}),
  }


def _usage() -> dict[str, float]:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return {
    'user_s': r.ru_utime,
    'sys_s': r.ru_stime,
    'minor_faults': r.ru_minflt,
    'major_faults': r.ru_majflt,
    'context_switches': r.ru_nvcsw + r.ru_nivcsw,
  }


def _phase(marks: list[tuple[float, dict[str, float]]]) -> dict[str, Any]:
  """Step walls and per-step usage from ``(perf_counter, usage)`` marks at step boundaries."""
  steps = len(marks) - 1
  walls = [b[0] - a[0] for a, b in itertools.pairwise(marks)]
  first, last = marks[0][1], marks[-1][1]
  return {
    'walls_s': walls,
    'median_s': statistics.median(walls),
    'mean_s': sum(walls) / steps,
    'per_step': {key: (last[key] - first[key]) / steps for key in first},
  }


def _mark() -> tuple[float, dict[str, float]]:
  return time.perf_counter(), _usage()


# --- Ours ----------------------------------------------------------------------------------------


def scoped_loss(*args: Any, **kwargs: Any) -> Any:
  """:func:`reorg_jax.aux_ota_loss` under the named scope :data:`LOSS_SCOPE`."""
  import jax

  import reorg_jax

  with jax.named_scope(LOSS_SCOPE):
    return reorg_jax.aux_ota_loss(*args, **kwargs)


_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%(\S+) = (.+?) ([a-z][a-z0-9-]*)\(')
_COMPUTATION = re.compile(r'^(?:ENTRY )?%(\S+) ')
_CALLED_ONE = re.compile(
  r'\b(?:calls|to_apply|body|condition|true_computation|false_computation)=%([\w.\-]+)'
)
_CALLED_MANY = re.compile(r'\b(?:branch_computations|called_computations)=\{([^}]*)\}')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_SHAPE = re.compile(r'^[a-z0-9]+\[([0-9,]*)\]')

_CONVOLUTION = {'convolution', 'dot'}
_REDUCTION = {'reduce', 'reduce-window', 'select-and-scatter'}
_MOVEMENT = {
  'parameter',
  'constant',
  'copy',
  'transpose',
  'reverse',
  'bitcast',
  'reshape',
  'broadcast',
  'concatenate',
  'slice',
  'dynamic-slice',
  'dynamic-update-slice',
  'pad',
  'gather',
  'scatter',
  'iota',
  'tuple',
  'get-tuple-element',
}


class StepHlo:
  """The compiled step's HLO instructions, and the category of each.

  Args:
    text: ``compiled.as_text()`` of the step.
    kernels: module path (``'model_2/cv1/conv'``) -> kernel shape, of the model's
      convolution kernels.
  """

  def __init__(self, text: str, *, kernels: dict[str, tuple[int, ...]]):
    self.module = re.match(r'HloModule ([^\s,]+)', text).group(1)
    self.instructions: dict[str, dict[str, Any]] = {}
    self.members: dict[str, list[str]] = collections.defaultdict(list)
    self.caller: dict[str, str] = {}
    computation = None
    for line in text.splitlines():
      if not line.startswith(' '):
        head = _COMPUTATION.match(line)
        if head and line.rstrip().endswith('{'):
          computation = head.group(1)
        continue
      found = _INSTRUCTION.match(line)
      if not found:
        continue
      name, kind, opcode = found.groups()
      called = _CALLED_ONE.findall(line)
      for group in _CALLED_MANY.findall(line):
        called += re.findall(r'%([\w.\-]+)', group)
      shape = _SHAPE.match(kind)
      op_name = _OP_NAME.search(line)
      self.instructions[name] = {
        'opcode': opcode,
        'computation': computation,
        'called': called,
        'shape': tuple(int(d) for d in shape.group(1).split(',') if d) if shape else None,
        'op_name': op_name.group(1) if op_name else '',
      }
      self.members[computation].append(name)
      for callee in called:
        self.caller.setdefault(callee, name)
    # A kernel's shape, and the [I, O] of one of its taps (reorg_jax.models.convolution
    # computes a k x k kernel's gradient one tap at a time).
    self.kernels = {
      path: {_nonunit(shape), _nonunit(shape[-2:])} for path, shape in kernels.items()
    }
    self._categories: dict[str, str] = {}

  def _inner(self, name: str) -> list[str]:
    """The instructions a fusion runs (nested fusions opened), or the instruction itself."""
    instruction = self.instructions[name]
    if instruction['opcode'] != 'fusion':
      return [name]
    inner = []
    for callee in instruction['called']:
      for member in self.members.get(callee, []):
        inner += self._inner(member)
    return inner

  def scope(self, name: str) -> str:
    """The ``op_name`` of an instruction: its own, its fused operations', or its caller's.

    Only names under the step's ``jit(...)`` count (XLA names some operations of
    reducers and parameters otherwise).
    """
    seen = set()
    while name and name not in seen:
      seen.add(name)
      instruction = self.instructions[name]
      if instruction['op_name'].startswith('jit('):
        return instruction['op_name']
      names = [self.instructions[i]['op_name'] for i in self._inner(name)]
      names = [n for n in names if n.startswith('jit(')]
      if names:
        return collections.Counter(names).most_common(1)[0][0]
      name = self.caller.get(instruction['computation'], '')
    return ''

  def category(self, name: str) -> str:
    """The category key of the instruction called ``name`` (see the module notes)."""
    if name not in self._categories:
      self._categories[name] = self._category(name)
    return self._categories[name]

  def _category(self, name: str) -> str:
    if name not in self.instructions:
      return 'elementwise'
    scope = self.scope(name)
    if LOSS_SCOPE in scope:
      return 'loss'
    if scope and 'jvp(' not in scope:
      return 'update'
    inner = self._inner(name)
    opcodes = {self.instructions[i]['opcode'] for i in inner}
    convolutions = [i for i in inner if self.instructions[i]['opcode'] in _CONVOLUTION]
    if convolutions:
      return self.convolution_direction(convolutions[0], fallback_scope=scope)
    if opcodes & _REDUCTION:
      return 'reduction'
    if opcodes <= _MOVEMENT:
      return 'copy'
    return 'elementwise'

  def convolution_direction(self, name: str, *, fallback_scope: str = '') -> str:
    """``'conv_forward'``, ``'conv_input'`` or ``'conv_weight'`` of a convolution or dot."""
    instruction = self.instructions[name]
    scope = instruction['op_name'] if instruction['op_name'].startswith('jit(') else fallback_scope
    if 'jvp(' in scope and 'transpose(' not in scope:
      return 'conv_forward'
    parts = scope.split('/')
    layer = next((i for i, part in enumerate(parts) if 'jvp(' in part), None)
    candidates = set().union(*self.kernels.values())
    if layer is not None and '/'.join(parts[layer + 1 : -1]) in self.kernels:
      candidates = self.kernels['/'.join(parts[layer + 1 : -1])]
    shape = instruction['shape']
    return 'conv_weight' if shape is not None and _nonunit(shape) in candidates else 'conv_input'


def _nonunit(shape: Iterable[int]) -> tuple[int, ...]:
  return tuple(sorted(d for d in shape if d != 1))


def kernel_shapes(params: Any) -> dict[str, tuple[int, ...]]:
  """Module path -> shape of every leaf called ``kernel`` in ``params``."""
  import jax

  shapes = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = [str(getattr(k, 'key', getattr(k, 'name', k))) for k in path]
    if keys and keys[-1] == 'kernel':
      shapes['/'.join(keys[:-1])] = tuple(leaf.shape)
  return shapes


def xla_spans(trace_dir: pathlib.Path, *, module: str) -> list[tuple[Any, float, float, str, bool]]:
  """``(thread, start s, end s, name, operation)`` of the host events traced.

  ``operation``: an operation of ``module``, ``name`` its HLO instruction; else a
  runtime event (dispatch, argument handling, the thunk executor), ``name`` its name.
  """
  import jax

  files = sorted(trace_dir.rglob('*.xplane.pb'), key=lambda p: p.stat().st_mtime)
  if not files:
    raise SystemExit(f'{trace_dir}: no *.xplane.pb trace written')
  data = jax.profiler.ProfileData.from_file(str(files[-1]))
  spans = []
  for plane in data.planes:
    for line in plane.lines:
      for event in line.events:
        stats = dict(event.stats)
        operation = stats.get('hlo_module') == module and 'hlo_op' in stats
        if not operation and (event.name.startswith('end: ') or 'hlo_op' in stats):
          continue  # an end marker, or another module's operation
        start = event.start_ns * 1e-9
        end = start + event.duration_ns * 1e-9
        name = stats['hlo_op'] if operation else event.name
        spans.append(((plane.name, line.name), start, end, name, operation))
  return spans


def profile_ours(spec: dict[str, Any]) -> dict[str, Any]:
  """Compiles, warms up, profiles and times our step (see the module notes); one result row."""
  import device_step
  import jax
  import numpy as np

  from reorg_jax.training import step as train_lib

  case = device_step.Case(
    spec['model'], spec['image_size'], spec['batch_size'], 'float32', spec['classes']
  )
  setup, state, schedule = device_step._ours_setup(case, smoke=False)
  batch = device_step._ours_batch(case, schedule, boxes=spec['boxes'])
  kernels = kernel_shapes(state.params)
  step = jax.jit(
    functools.partial(train_lib.train_step, setup, loss_fn=scoped_loss), donate_argnums=(0,)
  )
  started = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - started
  out = pathlib.Path(spec['out']) / 'ours'
  out.mkdir(parents=True, exist_ok=True)
  text = compiled.as_text()
  (out / 'step.hlo.txt').write_text(text)
  hlo = StepHlo(text, kernels=kernels)

  metrics: dict[str, Any] = {}

  def run(count: int) -> list[tuple[float, dict[str, float]]]:
    nonlocal state, metrics
    marks = [_mark()]
    for _ in range(count):
      state, metrics = compiled(state, batch)
      jax.block_until_ready(metrics)
      marks.append(_mark())
    return marks

  run(spec['warmup'])
  options = jax.profiler.ProfileOptions()
  options.python_tracer_level = 0
  jax.profiler.start_trace(str(out), create_perfetto_trace=True, profiler_options=options)
  profiled = run(spec['steps'])
  jax.profiler.stop_trace()
  unprofiled = run(spec['steps'])
  if not np.isfinite(float(metrics['loss'])):
    raise FloatingPointError(f'{case}: the loss is not finite')

  traced = xla_spans(out, module=hlo.module)
  spans = [
    (thread, start, end, (hlo.category(name) if operation else 'runtime', name))
    for thread, start, end, name, operation in traced
  ]
  summary = summarise(spans, steps=spec['steps'], top=spec['top'])
  summary['top'] = [
    [category, name if category == 'runtime' else f'{name} ({_short_scope(hlo.scope(name))})', s]
    for category, name, s in summary['top']
  ]
  seen = {name for _, _, _, name, operation in traced if operation}
  convolutions = collections.Counter(hlo.category(n) for n in seen)
  return {
    'framework': 'ours',
    'version': f'jax {jax.__version__}',
    'compile_s': compile_s,
    'profiled': _phase(profiled),
    'unprofiled': _phase(unprofiled),
    **summary,
    'note': (
      f'convolution operations traced: {convolutions["conv_forward"]} forward, '
      f'{convolutions["conv_input"]} backward by input, {convolutions["conv_weight"]} backward '
      f'by weight (outside the loss; the model has {len(kernels)} kernels)'
    ),
  }


def _short_scope(scope: str, parts: int = 3) -> str:
  """The last ``parts`` components of an ``op_name`` (``'-'`` if none)."""
  return '/'.join(scope.split('/')[-parts:]) if scope else '-'


# --- Upstream ------------------------------------------------------------------------------------

_TORCH_CONV_BACKWARD = re.compile(
  r'ConvolutionBackward|convolution_backward|[Cc]onv\w*[Bb]ackward|conv\w*_backward'
)
_TORCH_CONV_FORWARD = re.compile(
  r'^aten::(conv\w*|_convolution|mkldnn_convolution|_slow_conv\w*|slow_conv\w*|thnn_conv\w*|'
  r'_nnpack\w*|_conv_depthwise2d)$'
)
_TORCH_REDUCTION = re.compile(
  r'batch_norm|BatchNorm|max_pool|MaxPool|^aten::(sum|mean|amax|amin|max|min|argmax|argmin|var|'
  r'std|var_mean|norm|prod|cumsum|logsumexp|any|all)$|^(Sum|Mean|Expand)Backward'
)
_TORCH_COPY = re.compile(
  r'^aten::(copy_|clone|contiguous|cat|stack|_to_copy|to|index|index_select|gather|scatter\w*|'
  r'index_put_?|_index_put_impl_|masked_select|nonzero|repeat|flip|upsample\w*|_unsafe_index|'
  r'pad|constant_pad_nd|permute|transpose|t|view|reshape|_reshape_alias|slice|select|split|'
  r'split_with_sizes|chunk|unbind|unsqueeze|squeeze|flatten|as_strided|expand|expand_as|detach|'
  r'alias|unfold|narrow|fill_|zero_|zeros|zeros_like|empty|empty_like|empty_strided|'
  r'new_empty_strided|ones|full)$|^(Cat|Stack|Slice|Select|View|Unsafe\w*|Permute|Transpose|'
  r'Clone|Unsqueeze|Squeeze|Index|UpsampleNearest2D|Reshape\w*|Alias|ToCopy|Copy\w*|Unbind|'
  r'Split\w*)Backward'
)
_BACKWARD_PREFIX = 'autograd::engine::evaluate_function: '


def _torch_kind(name: str) -> str | None:
  """The category a torch operator or range name gives by itself (``None``: none)."""
  name = name.removeprefix(_BACKWARD_PREFIX)
  if _TORCH_CONV_BACKWARD.search(name):
    if 'input' in name.lower():
      return 'conv_input'
    if 'weight' in name.lower():
      return 'conv_weight'
    return 'conv_backward'
  if _TORCH_CONV_FORWARD.match(name):
    return 'conv_forward'
  if _TORCH_REDUCTION.search(name):
    return 'reduction'
  if _TORCH_COPY.search(name):
    return 'copy'
  return None


def _is_backward(name: str) -> bool:
  return name.startswith(_BACKWARD_PREFIX) or bool(re.search(r'Backward\d*$', name))


def torch_categories(events: list[Any]) -> dict[int, str]:
  """``id(event)`` -> category key of every profiled CPU event (see the module notes)."""
  import device_step

  def chain(event: Any) -> list[Any]:
    links = []
    while event is not None:
      links.append(event)
      event = event.cpu_parent
    return links[::-1]  # outermost first

  chains = {id(e): chain(e) for e in events}
  loss_forward = set()
  for e in events:
    names = [x.name for x in chains[id(e)]]
    if LOSS_SCOPE in names and not any(_is_backward(n) for n in names) and e.sequence_nr >= 0:
      loss_forward.add((e.thread, e.sequence_nr))
  categories = {}
  for e in events:
    links = chains[id(e)]
    names = [x.name for x in links]
    if LOSS_SCOPE in names or any(
      _is_backward(x.name)
      and (x.thread if x.fwd_thread is None else x.fwd_thread, x.sequence_nr) in loss_forward
      for x in links
    ):
      category = 'loss'
    elif any(n.startswith('Optimizer.') or n == device_step.EMA_SCOPE for n in names):
      category = 'update'
    else:
      kinds = [_torch_kind(n) for n in names]
      category = next((k for k in kinds if k is not None), 'elementwise')
      if category == 'conv_backward':  # a part named further in: input or weight
        category = next((k for k in kinds if k in ('conv_input', 'conv_weight')), category)
    categories[id(e)] = category
  return categories


def profile_upstream(spec: dict[str, Any]) -> dict[str, Any]:
  """Profiles and times upstream's step through ``device_step.measure_upstream``; one row.

  ``measure_upstream`` runs one first step and then ``repeats`` more; a hook on
  the model's forward (each step's start, after the image conversion) starts
  and stops the profiler and marks the step boundaries, and ``ComputeLossAuxOTA``
  is wrapped in a ``record_function`` while it runs.
  """
  try:
    import torchvision  # noqa: F401  (the real one, where installed)
  except ImportError:
    from reorg_jax.reference import oracle  # noqa: F401  (registers the stand-in the reference imports)
  import device_step
  import torch
  from sas_yolov7.models.yolo import Model

  from reorg_jax.reference import oracle

  reference = oracle.reference_loss_module()  # the loss module measure_upstream uses on a CPU
  case = device_step.Case(
    spec['model'], spec['image_size'], spec['batch_size'], 'float32', spec['classes']
  )
  warmup, steps = max(1, spec['warmup']), spec['steps']
  profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
  profiled: list[tuple[float, dict[str, float]]] = []
  unprofiled: list[tuple[float, dict[str, float]]] = []
  started = [0]  # steps started so far

  def at_step_start(module: Any, args: Any) -> None:
    k = started[0]
    started[0] += 1
    if k == warmup:
      profiler.start()
    if warmup <= k <= warmup + steps:
      profiled.append(_mark())
    if k == warmup + steps:
      profiler.stop()
    if warmup + steps <= k <= warmup + 2 * steps:
      unprofiled.append(_mark())

  hooks: dict[str, Any] = {}

  def find_model(module: Any, args: Any) -> None:
    if isinstance(module, Model) and 'model' not in hooks:
      hooks.pop('global').remove()
      hooks['model'] = module.register_forward_pre_hook(at_step_start)
      at_step_start(module, args)

  original = reference.ComputeLossAuxOTA.__call__

  def labelled(self: Any, *args: Any, **kwargs: Any) -> Any:
    with torch.profiler.record_function(LOSS_SCOPE):
      return original(self, *args, **kwargs)

  hooks['global'] = torch.nn.modules.module.register_module_forward_pre_hook(find_model)
  reference.ComputeLossAuxOTA.__call__ = labelled
  try:
    row = device_step.measure_upstream(case, boxes=spec['boxes'], repeats=warmup + 2 * steps)
  finally:
    reference.ComputeLossAuxOTA.__call__ = original
    for hook in hooks.values():
      hook.remove()
  if len(profiled) != steps + 1 or len(unprofiled) != steps + 1:
    raise SystemExit(
      f'device_step.measure_upstream: {started[0]} model calls seen, '
      f'{warmup + 2 * steps + 1} expected (one per step)'
    )
  out = pathlib.Path(spec['out']) / 'upstream'
  out.mkdir(parents=True, exist_ok=True)
  profiler.export_chrome_trace(str(out / 'trace.json'))
  events = [e for e in profiler.events() if not e.is_async and not e.name.startswith('[')]
  categories = torch_categories(events)
  spans = [
    (e.thread, e.time_range.start * 1e-6, e.time_range.end * 1e-6, (categories[id(e)], e.name))
    for e in events
  ]
  return {
    'framework': 'upstream',
    'version': f'torch {torch.__version__}, {torch.get_num_threads()} threads',
    'compile_s': row['compile_s'],
    'profiled': _phase(profiled),
    'unprofiled': _phase(unprofiled),
    **summarise(spans, steps=steps, top=spec['top']),
    'note': '',
  }


# --- Driver --------------------------------------------------------------------------------------


def _worker(argv: list[str]) -> None:
  """``--worker ours|upstream SPEC_JSON``: prints one ``ROW`` line."""
  framework, spec = argv[0], json.loads(argv[1])
  row = profile_ours(spec) if framework == 'ours' else profile_upstream(spec)
  print('ROW ' + json.dumps(row), flush=True)


def in_own_process(
  framework: str, spec: dict[str, Any], *, timeout: float, same_environment: bool = False
) -> dict[str, Any]:
  """Runs ``framework``'s worker in a fresh process with accelerators hidden; its row.

  The environment is ``device_step.worker_environment``'s (``same_environment``: this one).
  """
  import device_step

  env = device_step.worker_environment(framework, same=same_environment)
  env.update(JAX_PLATFORMS='cpu', CUDA_VISIBLE_DEVICES='')
  done = subprocess.run(
    [sys.executable, __file__, '--worker', framework, json.dumps(spec)],
    capture_output=True,
    text=True,
    timeout=timeout,
    env=env,
  )
  rows = [json.loads(x[4:]) for x in done.stdout.splitlines() if x.startswith('ROW ')]
  if done.returncode != 0 or not rows:
    raise SystemExit(f'{framework} worker failed (exit {done.returncode}):\n{done.stderr[-3000:]}')
  return rows[0]


def cpu_model() -> str:
  """The CPU's model name from ``/proc/cpuinfo`` (else what ``platform`` says)."""
  try:
    for line in pathlib.Path('/proc/cpuinfo').read_text().splitlines():
      if line.startswith('model name'):
        return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def machine_line(ours: dict[str, Any], theirs: dict[str, Any]) -> str:
  usable = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  return (
    f'machine: {cpu_model()}, {os.cpu_count()} cores ({usable} usable); {ours["version"]}; '
    f'{theirs["version"]}'
  )


def _ms(value: float | None) -> str:
  return '-' if value is None else f'{value * 1e3:.2f}'


def _ratio(a: float | None, b: float | None) -> str:
  return '-' if a is None or not b else f'{a / b:.2f}'


def print_table(ours: dict[str, Any], theirs: dict[str, Any], *, title: str) -> None:
  """The categories (ms per step, share) and the wall and usage rows, side by side."""
  print(title)
  print(
    f'{"":<36} {"ours ms":>10} {"share":>6} {"upstream ms":>12} {"share":>6} '
    f'{"ours / upstream":>15}'
  )
  steps = {side: row['profiled']['mean_s'] for side, row in (('ours', ours), ('up', theirs))}

  def line(label: str, a: float | None, b: float | None, *, share: bool = True) -> None:
    sa = f'{a / steps["ours"]:.1%}' if share and a is not None else ''
    sb = f'{b / steps["up"]:.1%}' if share and b is not None else ''
    print(f'{label:<36} {_ms(a):>10} {sa:>6} {_ms(b):>12} {sb:>6} {_ratio(a, b):>15}')

  def value(row: dict[str, Any], key: str) -> float | None:
    seconds = row['categories'][key]
    return seconds if seconds > 0 else None

  for key, label in CATEGORIES:
    a, b = value(ours, key), value(theirs, key)
    if a is not None or b is not None:
      line(label, a, b)
    if key == CONV_BACKWARD[-1]:  # the subtotal both sides have, split or not
      both = [sum(row['categories'][k] for k in CONV_BACKWARD) for row in (ours, theirs)]
      line('  convolution backward, both', *both)
  unattributed = [
    row['profiled']['mean_s'] - sum(row['categories'].values()) for row in (ours, theirs)
  ]
  line('unattributed', *unattributed)
  line('step, mean of profiled (sum of above)', steps['ours'], steps['up'])
  print()
  for phase in ('profiled', 'unprofiled'):
    a, b = ours[phase]['median_s'], theirs[phase]['median_s']
    line(f'wall ms/step, median, {phase}', a, b, share=False)
  for key, label in (('user_s', 'user CPU ms/step'), ('sys_s', 'system CPU ms/step')):
    for phase in ('profiled', 'unprofiled'):
      a, b = ours[phase]['per_step'][key], theirs[phase]['per_step'][key]
      line(f'{label}, {phase}', a, b, share=False)
  for key, label in (
    ('minor_faults', 'minor page faults/step'),
    ('major_faults', 'major page faults/step'),
    ('context_switches', 'context switches/step'),
  ):
    for phase in ('profiled', 'unprofiled'):
      a, b = ours[phase]['per_step'][key], theirs[phase]['per_step'][key]
      print(f'{label + ", " + phase:<36} {a:>10.0f} {"":>6} {b:>12.0f} {"":>6} {_ratio(a, b):>15}')
  print()
  for row in (ours, theirs):
    print(
      f'{row["framework"]}: first step/compile {row["compile_s"]:.1f} s; profiled operations on '
      f'{row["threads"]} thread(s), {row["thread_s"] * 1e3:.2f} ms/step summed over threads'
    )
    if row['note']:
      print(f'  {row["note"]}')
    for category, name, seconds in row['top']:
      print(f'  {seconds * 1e3:9.3f} ms  {category:<14} {name[:100]}')


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if argv[:1] == ['--worker']:
    _worker(argv[1:])
    return 0
  import device_step

  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', nargs='+', default=['nano,w6'], help='nano, w6 (comma list)')
  parser.add_argument('--image-size', type=int, help="override every model's image side")
  parser.add_argument('--batch-size', type=int, help="override every model's batch")
  parser.add_argument('--steps', type=int, default=5, help='profiled steps (and unprofiled ones)')
  parser.add_argument('--warmup', type=int, default=2, help='steps before the profiled ones')
  parser.add_argument('--boxes', type=int, default=7, help='boxes per image')
  parser.add_argument('--classes', type=int, default=80)
  parser.add_argument('--top', type=int, default=10, help='busiest operations listed per side')
  parser.add_argument('--out', type=pathlib.Path, help='folder of the raw traces (default: new)')
  parser.add_argument('--timeout', type=float, default=7200.0, help='seconds per worker process')
  device_step.add_same_environment_option(parser)
  args = parser.parse_args(argv)
  models = [m for group in args.models for m in group.split(',') if m]
  for model in models:
    if model not in SIZES:
      parser.error(f'--models: nano or w6, got {model!r}')
  if args.steps < 1 or args.warmup < 1:
    parser.error('--steps and --warmup: at least 1')
  out = args.out or pathlib.Path(tempfile.mkdtemp(prefix='step_profile-'))
  for model in models:
    size = args.image_size or SIZES[model][0]
    batch = args.batch_size or SIZES[model][1]
    spec = {
      'model': model,
      'image_size': size,
      'batch_size': batch,
      'classes': args.classes,
      'boxes': args.boxes,
      'steps': args.steps,
      'warmup': args.warmup,
      'top': args.top,
      'out': str(out / model),
    }
    same = args.same_environment
    ours = in_own_process('ours', spec, timeout=args.timeout, same_environment=same)
    theirs = in_own_process('upstream', spec, timeout=args.timeout, same_environment=same)
    (out / model / 'summary.json').write_text(
      json.dumps({'spec': spec, 'ours': ours, 'upstream': theirs}, indent=1)
    )
    print(machine_line(ours, theirs))
    print_table(
      ours,
      theirs,
      title=(
        f'{model}: {size} px, batch {batch}, {args.boxes} boxes/image, {args.classes} classes; '
        f'{args.steps} profiled steps after {args.warmup} warm-up, then {args.steps} unprofiled'
      ),
    )
    print(f'raw traces: {out / model}')
    print()
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
