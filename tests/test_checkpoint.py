"""Checkpoints: exact round trips (typed keys included), retention, best-by-metric, atomicity."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from reorg_jax.training import checkpoint, integrity


@flax.struct.dataclass
class _State:
  params: dict
  opt_state: optax.OptState
  key: jax.Array
  step: jax.Array


def _state(seed: int) -> dict:
  key = jax.random.key(seed)
  params = {'conv': {'kernel': jax.random.normal(key, (3, 3, 4, 8))}, 'bias': jnp.zeros(8)}
  return {
    'train': _State(
      params=params,
      opt_state=optax.adam(1e-3).init(params),
      key=jax.random.key(seed + 1),
      step=jnp.asarray(seed, jnp.int32),
    ),
    'keys': jax.random.split(jax.random.key(seed + 2), 4),
    'rbg_key': jax.random.key(seed, impl='rbg'),
    'raw_key': jax.random.PRNGKey(seed),
    'half': jnp.linspace(0, 1, 5, dtype=jnp.bfloat16),
    'host': np.arange(seed, seed + 3, dtype=np.int64),
    'count': seed,
  }


def _assert_same(restored, expected) -> None:
  assert jax.tree.structure(restored) == jax.tree.structure(expected)
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(expected), strict=True):
    assert type(got) is type(want)
    if isinstance(want, jax.Array) and jax.dtypes.issubdtype(want.dtype, jax.dtypes.prng_key):
      assert got.dtype == want.dtype
      got, want = jax.random.key_data(got), jax.random.key_data(want)
    if isinstance(want, jax.Array):
      assert got.sharding == want.sharding
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert np.asarray(got).dtype == np.asarray(want).dtype


def _steps(directory) -> list[int]:
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


@pytest.mark.parametrize('asynchronous', [True, False])
def test_round_trip_is_exact(tmp_path, asynchronous):
  state = _state(3)
  with checkpoint.Checkpoints(tmp_path, save_every=1, asynchronous=asynchronous) as ckpt:
    assert ckpt.restore_latest(like=state) is None
    assert ckpt.save(7, state, metadata={'epoch': 2, 'loader': [2, 15], 'best_map': 0.25})
  with checkpoint.Checkpoints(tmp_path, save_every=1) as ckpt:
    restored = ckpt.restore_latest(like=_state(0))
  assert restored.step == 7
  assert restored.metadata == {'epoch': 2, 'loader': [2, 15], 'best_map': 0.25}
  _assert_same(restored.state, state)
  # The restored keys work as keys.
  np.testing.assert_array_equal(
    jax.random.uniform(restored.state['train'].key, (3,)),
    jax.random.uniform(state['train'].key, (3,)),
  )


def test_key_helpers_round_trip():
  tree = {'a': jax.random.split(jax.random.key(0), 3), 'b': jnp.ones(2), 'c': 1}
  data = integrity.unwrap_keys(tree)
  assert data['a'].dtype == jnp.uint32 and data['a'].shape == (3, 2)
  _assert_same(integrity.wrap_keys(data, like=tree), tree)
  abstract = jax.eval_shape(lambda: tree)
  with pytest.raises(TypeError, match='abstract target'):
    integrity.wrap_keys(data, like=abstract)


def test_keeps_last_k_every_n_steps(tmp_path):
  state = {'w': jnp.zeros(3)}
  with checkpoint.Checkpoints(tmp_path, save_every=3, keep_last=2) as ckpt:
    saved = [step for step in range(11) if ckpt.save(step, {'w': jnp.full(3, step)})]
    assert saved == [0, 3, 6, 9]
    assert ckpt.save(10, state, force=True)
    ckpt.wait()
    assert ckpt.latest_step == 10
    assert ckpt.restore_step(9, like=state).state['w'].tolist() == [9, 9, 9]
    with pytest.raises(FileNotFoundError, match='step 3'):
      ckpt.restore_step(3, like=state)
  assert _steps(tmp_path / 'steps') == [9, 10]


def test_best_checkpoint_is_kept_separately(tmp_path):
  def state(step):
    return {'w': jnp.full(2, float(step))}

  with checkpoint.Checkpoints(tmp_path, save_every=2, keep_last=1) as ckpt:
    assert ckpt.best is None and ckpt.restore_best(like=state(0)) is None
    written = []
    for step, metric in [(1, 0.2), (2, 0.1), (3, 0.4), (4, 0.3), (5, 0.4)]:
      ckpt.save(step, state(step))
      written.append(ckpt.save_best(step, state(step), metric=metric, metadata={'map': metric}))
    assert written == [True, False, True, False, False]  # strictly better only
    ckpt.wait()
    assert ckpt.best == (3, pytest.approx(0.4))
    assert ckpt.latest_step == 4
    with pytest.raises(ValueError, match='finite metric'):
      ckpt.save_best(6, state(6), metric=float('nan'))
  assert _steps(tmp_path / 'best') == [3]
  assert _steps(tmp_path / 'steps') == [4]

  with checkpoint.Checkpoints(tmp_path, save_every=2) as ckpt:  # reopened: best remembered
    best = ckpt.restore_best(like=state(0))
    assert (best.step, best.metadata, best.state['w'].tolist()) == (3, {'map': 0.4}, [3.0, 3.0])
    assert not ckpt.save_best(4, state(4), metric=0.35)
    assert ckpt.save_best(3, state(30), metric=0.5)  # replayed step after a resume: replaced
    ckpt.wait()
    assert ckpt.best == (3, pytest.approx(0.5))
    assert ckpt.restore_best(like=state(0)).state['w'].tolist() == [30.0, 30.0]


def test_best_mode_min(tmp_path):
  with checkpoint.Checkpoints(tmp_path, save_every=1, best_mode='min') as ckpt:
    for step, loss in [(1, 3.0), (2, 1.0), (3, 2.0)]:
      ckpt.save_best(step, {'w': jnp.full(1, step)}, metric=loss)
    ckpt.wait()
    assert ckpt.best == (2, 1.0)
  assert _steps(tmp_path / 'best') == [2]


def test_half_written_checkpoints_are_never_restored(tmp_path):
  like = {'w': jnp.zeros(4)}
  with checkpoint.Checkpoints(tmp_path, save_every=1) as ckpt:
    for step in (1, 2):
      ckpt.save(step, {'w': jnp.full(4, float(step))})
  steps = tmp_path / 'steps'
  # A copy cut short: a step directory without the commit marker, one file truncated.
  shutil.copytree(steps / '2', steps / '9')
  (steps / '9' / 'commit_success.txt').unlink()
  data = next(path for path in (steps / '9' / 'state').rglob('*') if path.is_file())
  data.write_bytes(data.read_bytes()[:3])
  # What a save killed before its rename leaves.
  shutil.copytree(steps / '2', steps / '12.orbax-checkpoint-tmp')

  with checkpoint.Checkpoints(tmp_path, save_every=1, read_only=True) as reader:
    assert reader.restore_latest(like=like).step == 2
    with pytest.raises(PermissionError, match='read_only'):
      reader.save(3, like)
  assert {'9', '12.orbax-checkpoint-tmp'} <= set(os.listdir(steps))  # a reader touches nothing

  with checkpoint.Checkpoints(tmp_path, save_every=1) as ckpt:
    assert ckpt.latest_step == 2
    restored = ckpt.restore_latest(like=like)
    assert (restored.step, restored.state['w'].tolist()) == (2, [2.0] * 4)
    assert ckpt.save(3, {'w': jnp.full(4, 3.0)})  # not blocked by the stray higher steps
    ckpt.wait()
    assert ckpt.restore_latest(like=like).step == 3
  names = set(os.listdir(steps))
  assert '9' not in names and '9.incomplete-0' in names
  assert '12.orbax-checkpoint-tmp' not in names


_SAVE_LOOP = textwrap.dedent(
  """
  import sys
  import jax.numpy as jnp
  from reorg_jax.training import checkpoint, integrity

  with checkpoint.Checkpoints(sys.argv[1], save_every=1, keep_last=2) as ckpt:
    for step in range(1, 10_000):
      ckpt.save(step, {'w': jnp.full((1 << 21,), float(step))}, metadata={'step': step})
      print(step, flush=True)
  """
)


def test_killed_save_loop_restores_last_complete_step(tmp_path):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  process = subprocess.Popen(
    [sys.executable, '-c', _SAVE_LOOP, str(tmp_path)],
    stdout=subprocess.PIPE,
    stderr=subprocess.DEVNULL,
    text=True,
    env=env,
  )
  try:
    for _ in range(5):  # five saves started; the sixth is likely in flight
      assert process.stdout.readline(), 'the save loop ended early'
    process.send_signal(signal.SIGKILL)
  finally:
    process.kill()
    process.wait(timeout=30)
  assert process.returncode == -signal.SIGKILL

  with checkpoint.Checkpoints(tmp_path, save_every=1) as ckpt:
    restored = ckpt.restore_latest(like={'w': jnp.zeros(1 << 21)})
  assert restored is not None and restored.step >= 4
  assert restored.metadata == {'step': restored.step}
  np.testing.assert_array_equal(restored.state['w'], float(restored.step))
  assert not any('tmp' in name for name in os.listdir(tmp_path / 'steps'))


def test_clear_errors(tmp_path):
  with checkpoint.Checkpoints(tmp_path, save_every=1) as ckpt:
    with pytest.raises(ValueError, match=r"zero-size arrays: state\['empty'\]"):
      ckpt.save(1, {'empty': jnp.zeros((0, 3)), 'w': jnp.ones(1)})
    with pytest.raises(ValueError, match='JSON'):
      ckpt.save(1, {'w': jnp.ones(1)}, metadata={'epoch': np.int64(1)})
  with pytest.raises(ValueError, match='best_mode'):
    checkpoint.Checkpoints(tmp_path, save_every=1, best_mode='largest')
  with pytest.raises(ValueError, match='save_every'):
    checkpoint.Checkpoints(tmp_path, save_every=0)
