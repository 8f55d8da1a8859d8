"""``benchmarks/trained_step.py`` at a tiny size: both frameworks' step from one upstream state.

Upstream trains two iterations of the demo recipe and hands out its whole
state before the third (weights, BatchNorm statistics, EMA and its update
count, momentum buffers, accumulated gradient); upstream resumed from it,
upstream in float64, ours and ours in float64 take iteration 2 from there.

What is asserted, and why these tolerances hold on any machine:

* upstream resumed equals upstream's uninterrupted run to the bit: the
  state handed over is the whole state;
* **ours in float64 against upstream in float64**: the step's loss parts to
  1e-5 relative and the change of the weights, statistics and EMA to 1e-5
  relative over all tensors (measured 3.3e-7 and 6.7e-7; the rest is the
  float32 the head outputs enter the loss in, on both machines measured). In
  float64 the rounding of either side is some 1e-13, so this compares the
  arithmetic itself: any difference of method (a gain, a term, the momentum
  or warm-up rule, the EMA or BatchNorm update) moves it by far more;
* ours in float32 against upstream: the same figures within 1e-4 (loss) and
  2e-2 (changes), measured 1.4e-5 and 8.4e-4. Our float32 step is further from
  float64 than upstream's (8.3e-4 against 6.3e-5; in the layers at strides 2
  to 8, 1e-2 per tensor against 7e-4) while the float64 steps agree to 6.7e-7,
  so the gap is rounding, not method; these bounds only catch a broken
  float32 path.
"""

from __future__ import annotations

import importlib.util
import pathlib

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = """\
synthetic: {num_train: 8, num_val: 4, image_size: 128}
train: {batch_size: 2, image_size: 128}
augment: {mosaic: 0.5, scale: 0.5}
eval: {batch_size: 4}
log: {plots: false}
"""


def _script():
  spec = importlib.util.spec_from_file_location(
    'trained_step', ROOT / 'benchmarks' / 'trained_step.py'
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope='module')
def figures(tmp_path_factory):
  out = tmp_path_factory.mktemp('trained_step')
  config = out / 'tiny.yaml'
  config.write_text(TINY)
  script = _script()
  assert script.main(['--config', str(config), '--at', '2', '--steps', '1', '--out', str(out)]) == 0
  return script, out, script.compare(out, at=2, steps=1)


def test_prints_the_summary_line(figures):
  script, out, got = figures
  line = script.summary_line(got)
  assert line.startswith('trained_step: at=2 steps=1 loss_rel_err=')
  assert line.endswith('resume_exact=true')
  for name in ('snapshot.npz', 'losses.csv', 'tensors.csv'):
    assert (out / name).is_file(), name


def test_upstream_resumes_exactly(figures):
  _, _, got = figures
  assert got['resumed', 'upstream']['exact']


def test_float64_steps_are_the_same_arithmetic(figures):
  _, _, got = figures
  both = got['ours64', 'float64']
  assert both['loss_rel_err'] < 1e-5, both
  assert both['update_rel_err'] < 1e-5, both
  assert both['ema_rel_err'] < 1e-5, both


def test_float32_step_agrees(figures):
  _, _, got = figures
  ours = got['ours', 'upstream']
  assert ours['loss_rel_err'] < 1e-4, ours
  assert ours['update_rel_err'] < 2e-2, ours
  assert ours['ema_rel_err'] < 2e-2, ours


def test_the_float64_bound_sees_a_lost_momentum_buffer(figures):
  """Dropping the momentum carried into the step would move it by far more than 1e-5.

  Nesterov's update is ``-lr * (g + m * (m * buf + g))``: losing ``buf``
  shifts each tensor by ``lr * m**2 * buf``.
  """
  _, out, _ = figures
  from reorg_jax.training import optim
  from train import config as config_lib

  config = config_lib.load(config_path=out / 'config.yaml', overrides=None)
  schedule = optim.Schedule(
    epochs=config['train']['epochs'],
    batch_size=config['train']['batch_size'],
    steps_per_epoch=config['synthetic']['num_train'] // config['train']['batch_size'],
    recipe=config_lib.recipe(config),
  )
  hparams = optim.hyperparams(2, schedule=schedule)
  snapshot, after = np.load(out / 'snapshot.npz'), np.load(out / 'float64' / 'weights.npz')
  shift = change = 0.0
  for key in snapshot.files:
    if not key.startswith('momentum/'):
      continue
    name = key.removeprefix('momentum/')
    if name.endswith('.bias'):
      group = optim.BIAS
    elif name.endswith('.implicit') or '.bn.' in name:
      group = optim.NO_DECAY
    else:
      group = optim.DECAY
    lost = hparams.lrs[group] * hparams.momentum**2 * snapshot[key].astype(np.float64)
    shift += np.sum(lost**2)
    change += np.sum((after[f'raw/{name}'] - snapshot[f'model/{name}']) ** 2)
  assert snapshot['step'] == 2 and snapshot['updates'] == 2
  assert np.sqrt(shift / change) > 1e-2  # a thousand times the bound
