"""``reorg-jax verify``: both frameworks' first fine-tuning steps from an upstream checkpoint.

One tiny case is shared: the synthetic dataset (8 training images of 64 px,
6 classes) and an upstream training checkpoint written as ``train_aux.py``
saves one (the reference package's ``Model`` of p6_nano with 80 classes,
pickled in half precision, its EMA a different model, with an optimizer
state). The installed ``reorg-jax verify`` fine-tunes it for 2 steps of 2
images at 128 px in both frameworks. At 128 px the float64 sides agree to
about 1e-8, far inside the tolerance (at 64 px the stride-64 grid is 1x1,
BatchNorm there normalises 2 values, and two steps carry a one-ulp difference
to 0.25: the verdict is then INCONCLUSIVE, tested on constructed figures
below).

What is asserted:

* the run agrees (exit 0), prints the loss parts of each step on each side
  as the sides recorded them, and its verdict's figures are the relative
  differences of the changes recomputed here from the sides' weights;
* the shared start is a new fine-tuning run's: the checkpoint's ``model``
  weights where they fit (the 80-class head tensors do not and start fresh,
  the same on both sides), zero momentum and gradient for exactly upstream's
  parameters, the EMA equal to the weights, step 0;
* the verdict fails (exit 1, DISAGREE, the tensor named) when one side's
  result lacks one BatchNorm's update, by the amount that update makes;
* without the reference implementation, one line naming what to install,
  exit 2; bad input is one line, exit 2, nothing written.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import re
import shutil
import subprocess
import sys
from pathlib import Path

import benchmark_scripts
import numpy as np
import pytest
import torch
import yaml
from sas_yolov7.models.yolo import Model

from reorg_jax.data import synthetic
from reorg_jax.models import yolo
from reorg_jax.program import cli, weights
from reorg_jax.program.commands import verify
from reorg_jax.reference import step_check

COMMAND = Path(sys.executable).parent / 'reorg-jax'  # the installed console script
ARGS = ('--img-size', '128', '--batch-size', '2', '--steps', '2', '--no-compile-cache')


@dataclasses.dataclass(frozen=True)
class Verified:
  base: Path
  workdir: Path
  done: subprocess.CompletedProcess
  model: dict[str, np.ndarray]  # the checkpoint's 'model' state dict, float32
  ema: dict[str, np.ndarray]  # its 'ema'
  parameters: tuple[str, ...]  # upstream's parameter names (6 classes)


def _training_checkpoint(path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """Writes ``{'model', 'ema', 'optimizer', ...}`` as ``train_aux.py`` does; both state dicts."""
  config = yolo.load_config(yolo.NANO_CONFIG)
  torch.manual_seed(0)
  model = Model(copy.deepcopy(config), nc=80)
  sgd = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.937, nesterov=True)
  sum(o.float().mean() for o in model(torch.rand(2, 3, 128, 128))).backward()
  sgd.step()  # momentum buffers in the optimizer state, which a new run does not take
  torch.manual_seed(1)
  ema = Model(copy.deepcopy(config), nc=80)
  saved = {
    'epoch': 4,
    'best_fitness': np.array([0.25]),
    'training_results': 'epoch 4 results',
    'model': copy.deepcopy(model).half(),
    'ema': copy.deepcopy(ema).half(),
    'updates': 40,
    'optimizer': sgd.state_dict(),
    'wandb_id': None,
  }
  torch.save(saved, path)
  return tuple(
    {k: v.float().numpy() for k, v in saved[key].state_dict().items()} for key in ('model', 'ema')
  )


@pytest.fixture(scope='module')
def verified(tmp_path_factory) -> Verified:
  base = tmp_path_factory.mktemp('verify')
  synthetic.write_dataset(base / 'data', num_train=8, num_val=2, image_size=64, seed=0)
  model, ema = _training_checkpoint(base / 'nano80_training.pt')
  # One loss branch to compile (benchmark_scripts.FLAT_LOSS): the same results, a quicker compile.
  (base / 'flat.yaml').write_text(yaml.safe_dump({'loss': benchmark_scripts.FLAT_LOSS}))
  done = subprocess.run(
    [str(COMMAND), 'verify', '--weights', 'nano80_training.pt', '--data', 'data/data.yaml',
     '--config', 'flat.yaml', '--workdir', 'out', *ARGS],
    cwd=base, capture_output=True, text=True, timeout=900,
  )  # fmt: skip
  small = Model(copy.deepcopy(yolo.load_config(yolo.NANO_CONFIG)), nc=len(synthetic.CLASS_NAMES))
  names = tuple(name for name, _ in small.named_parameters())
  return Verified(base, base / 'out', done, model, ema, names)


def _figure(line: str, label: str) -> float:
  """The number after ``label`` in ``line``."""
  return float(re.search(re.escape(label) + r' ([-+.e\d]+)', line).group(1))


def test_agrees_and_reports(verified):
  done, workdir = verified.done, verified.workdir
  assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
  lines = done.stdout.splitlines()
  assert lines[-1].startswith('verdict: agree: in float64 the 2 steps'), lines[-1]
  assert (workdir / 'report.txt').read_text().splitlines()[-1] == lines[-1]
  for name in ('losses.csv', 'tensors.csv', 'config.yaml', 'model.yaml', 'snapshot.npz'):
    assert (workdir / name).is_file(), name
  # The loss table: each side's parts of each step, as the side recorded them.
  table = {
    (int(m[0]), m[1]): [float(v) for v in m[2:]]
    for m in (line.split() for line in lines)
    if len(m) == 6 and m[0].isdigit() and m[1] in verify.SIDES
  }
  for side in verify.SIDES:
    rows = step_check.read_csv(workdir / side / 'steps.csv')
    assert [int(r['step']) for r in rows] == [0, 1], side
    for row in rows:
      got = table[int(row['step']), side]
      np.testing.assert_allclose(got, [row[p] for p in step_check.PARTS], rtol=1e-8)


def test_the_verdict_figures_are_the_changes_relative_differences(verified):
  """Recomputed from the sides' weights and the shared start."""
  workdir = verified.workdir
  start = dict(np.load(workdir / 'snapshot.npz'))
  after = {side: np.load(workdir / side / 'weights.npz') for side in ('ours64', 'float64')}
  sums = {}
  for which, origin in (('raw', 'model'), ('ema', 'ema')):
    error = change = 0.0
    for key in after['float64'].files:
      if not key.startswith(f'{which}/') or 'anchor' in key:
        continue
      before = start[f'{origin}/{key.split("/", 1)[1]}'].astype(np.float64)
      if not np.issubdtype(before.dtype, np.floating) or key.endswith('num_batches_tracked'):
        continue
      want = after['float64'][key] - before
      got = after['ours64'][key] - before
      error += np.sum((got - want) ** 2)
      change += np.sum(want**2)
    sums[which] = np.sqrt(error / change)
  verdict = verified.done.stdout.splitlines()[-1]
  changes = re.search(r'by ([-+.e\d]+) and ([-+.e\d]+) in the changes', verdict)
  np.testing.assert_allclose(
    [float(v) for v in changes.groups()], [sums['raw'], sums['ema']], rtol=0.06
  )
  assert max(sums.values()) < step_check.FLOAT64_CHANGE_TOLERANCE


def test_the_start_is_a_new_fine_tuning_run(verified):
  start = dict(np.load(verified.workdir / 'snapshot.npz'))
  model = {k.removeprefix('model/'): v for k, v in start.items() if k.startswith('model/')}
  ema = {k.removeprefix('ema/'): v for k, v in start.items() if k.startswith('ema/')}
  assert model.keys() == ema.keys()
  fresh = []
  for key, value in model.items():
    if key.endswith('num_batches_tracked'):  # counters no step reads
      continue
    np.testing.assert_array_equal(ema[key], value, err_msg=key)
    if verified.model[key].shape == value.shape:
      np.testing.assert_array_equal(value, verified.model[key], err_msg=key)  # not the EMA
    else:
      fresh.append(key)
  head = f'model.{yolo.p6_nano(num_classes=6).head.index}.'
  assert fresh and all(key.startswith(head) for key in fresh), fresh  # the class-dependent ones
  for part in ('momentum', 'grad'):
    buffers = {k.removeprefix(f'{part}/'): v for k, v in start.items() if k.startswith(f'{part}/')}
    assert sorted(buffers) == sorted(verified.parameters), part
    assert all(not np.any(v) for v in buffers.values()), part
  assert int(start['step']) == 0 and int(start['updates']) == 0


def test_the_verdict_fails_when_a_side_misses_a_batchnorm_update(verified, monkeypatch, capsys):
  """``ours64`` without the first layer's BatchNorm statistics update, the rest as measured.

  The sides and the start are the shared run's (read back, not run again).
  """
  assert verified.done.returncode == 0
  start = np.load(verified.workdir / 'snapshot.npz')
  missed = ('model.1.bn.running_mean', 'model.1.bn.running_var')

  class Done:
    returncode = 0

    def wait(self):
      return 0

    def poll(self):
      return 0

  def start_worker(worker, *, out, steps, log, env):
    assert steps == 2
    log.write_text('')
    for side in ('upstream', 'float64', 'perturbed64') if worker == 'upstream' else (worker,):
      shutil.copytree(verified.workdir / side, out / side)
    if worker == 'ours64':
      weights = dict(np.load(out / 'ours64' / 'weights.npz'))
      for key in missed:
        weights[f'raw/{key}'] = start[f'model/{key}'].astype(np.float64)
      np.savez(out / 'ours64' / 'weights.npz', **weights)
    return Done()

  def prepared(args, workdir):  # the shared run's start, as read back from its files
    assert Path(args.weights) == verified.base / 'nano80_training.pt'
    config = step_check.load_config(verified.workdir)
    return weights.read(args.weights), config, dict(start), []

  monkeypatch.setattr(verify, '_prepare', prepared)
  monkeypatch.setattr(step_check, 'start_worker', start_worker)
  workdir = verified.base / 'missed'
  status = cli.main(
    ['verify', '--weights', str(verified.base / 'nano80_training.pt'), '--data',
     str(verified.base / 'data' / 'data.yaml'), '--workdir', str(workdir), *ARGS]
  )  # fmt: skip
  out = capsys.readouterr().out
  verdict = out.splitlines()[-1]
  assert status == 1, out[-3000:]
  assert verdict.startswith('verdict: DISAGREE:') and 'model.1.bn.running_' in verdict, verdict
  # The missing update's share of all changes (float64's), as the verdict states it.
  with (verified.workdir / 'tensors.csv').open() as file:
    rows = [
      r
      for r in csv.DictReader(file)
      if (r['side'], r['reference'], r['which']) == ('ours64', 'float64', 'raw')
    ]
  change = sum(float(r['change']) ** 2 for r in rows)
  lost = sum(float(r['change']) ** 2 for r in rows if r['tensor'] in missed)
  stated = re.search(r'by ([-+.e\d]+) and [-+.e\d]+ in the changes', verdict).group(1)
  np.testing.assert_allclose(float(stated), np.sqrt(lost / change), rtol=0.06)
  assert np.sqrt(lost / change) > 100 * step_check.FLOAT64_CHANGE_TOLERANCE
  assert _figure(verdict, 'differ by') < step_check.FLOAT64_LOSS_TOLERANCE  # losses unchanged


def _figures(scale: float) -> dict[str, float]:
  return {
    'loss_rel_err': scale * step_check.FLOAT64_LOSS_TOLERANCE,
    'update_rel_err': scale * step_check.FLOAT64_CHANGE_TOLERANCE,
    'ema_rel_err': scale * step_check.FLOAT64_CHANGE_TOLERANCE,
    'worst': {'tensor': 'model.7.conv.weight', 'change': 1.0, 'error': 0.5},
  }


def test_the_verdict_weighs_the_difference_against_upstreams_own_rounding():
  """agree within the tolerances; beyond them INCONCLUSIVE when upstream alone moves as far."""
  small, large, larger = _figures(0.5), _figures(10), _figures(100)
  assert verify.verdict_line(small, larger, steps=2).startswith('verdict: agree:')
  assert verify.verdict_line(large, larger, steps=2).startswith('verdict: INCONCLUSIVE:')
  line = verify.verdict_line(large, small, steps=2)
  assert line.startswith('verdict: DISAGREE:') and 'model.7.conv.weight' in line
  # Only the figures beyond their tolerance are weighed against upstream's own.
  partly = {**small, 'update_rel_err': large['update_rel_err']}
  rounding = {**small, 'update_rel_err': larger['update_rel_err']}
  assert verify.verdict_line(partly, rounding, steps=2).startswith('verdict: INCONCLUSIVE:')
  assert verify.verdict_line(partly, small, steps=2).startswith('verdict: DISAGREE:')


def test_without_the_reference_says_what_to_install(tmp_path, monkeypatch, capsys):
  monkeypatch.setitem(sys.modules, 'sas_yolov7.utils.loss', None)
  workdir = tmp_path / 'out'
  status = cli.main(['verify', '--weights', 'w.pt', '--data', 'd.yaml', '--workdir', str(workdir)])
  err = capsys.readouterr().err.strip().splitlines()
  assert status == 2 and len(err) == 1, err
  assert "pip install 'reorg-jax[verify]'" in err[0] and 'sas_yolov7.utils.loss' in err[0]
  assert not workdir.exists()


@pytest.mark.parametrize('one_at_a_time', [False, True])
def test_workers_run_at_once_or_one_after_another(tmp_path, monkeypatch, capsys, one_at_a_time):
  """``--one-at-a-time`` starts each worker only once the one before has ended."""
  events = []

  class Worker:  # stands in for a worker process
    def __init__(self, name):
      self.name, self.returncode = name, None

    def wait(self):
      events.append(('end', self.name))
      self.returncode = 0
      return 0

    def poll(self):
      return self.returncode

  def start(worker, **_):
    events.append(('start', worker))
    return Worker(worker)

  monkeypatch.setattr(step_check, 'start_worker', start)
  parser = cli.build_parser()
  argv = ['verify', '--weights', 'w.pt', '--data', 'd.yaml', '--no-compile-cache']
  args = parser.parse_args(argv + (['--one-at-a-time'] if one_at_a_time else []))
  assert verify._run_workers(args, tmp_path) == 0
  workers = list(step_check.WORKERS)
  if one_at_a_time:
    assert events == [(kind, w) for w in workers for kind in ('start', 'end')]
    assert 'one after another' in capsys.readouterr().out
  else:
    assert events == [('start', w) for w in workers] + [('end', w) for w in workers]
    assert f'in {len(workers)} processes' in capsys.readouterr().out


def test_bad_input_is_one_line(verified, tmp_path, capsys):
  data = str(verified.base / 'data' / 'data.yaml')
  weights = str(verified.base / 'nano80_training.pt')
  bfloat16 = tmp_path / 'bf16.yaml'
  bfloat16.write_text('model: {compute_dtype: bfloat16}\n')
  cases = (
    (['--weights', str(tmp_path / 'missing.pt'), '--data', data], 'missing.pt'),
    (['--weights', weights, '--data', str(tmp_path / 'none.yaml')], 'none.yaml'),
    (['--weights', weights, '--data', data, '--config', str(bfloat16)], 'compute_dtype'),
    (['--weights', weights, '--data', data, '--steps', '400'], '--steps 400'),
  )
  for argv, named in cases:
    workdir = tmp_path / 'out'
    status = cli.main(['verify', *argv, '--workdir', str(workdir), '--no-compile-cache'])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and named in err[0], (argv, err)
    assert not (workdir / 'snapshot.npz').exists() and not (workdir / 'report.txt').exists()
  with pytest.raises(SystemExit) as stop:
    cli.main(['verify', '--weights', weights, '--data', data, '--steps', '0'])
  assert stop.value.code == 2
