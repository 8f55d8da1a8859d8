"""Checkpoint digests: damaged array data, truncated files and emptied metadata are refused.

Each test writes two small checkpoints (steps 1 and 2), damages step 2 on
disk and checks that restoring it raises a :class:`CheckpointError` naming
the step (and the leaf, for data that still decodes), and that
``restore_latest`` falls back to step 1, says so, and keeps step 2's files.
"""

from __future__ import annotations

import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reorg_jax.training import checkpoint, integrity


def _state(scale: float) -> dict:
  key = jax.random.key(0)
  return {
    'params': {'conv': {'kernel': scale * jax.random.normal(key, (3, 3, 8, 16))}},
    'opt_state': {'momentum_buffer': scale * jax.random.normal(key, (256, 32))},
    'rng': jax.random.key(1),
    'step': jnp.asarray(int(scale), jnp.int32),
  }


LIKE = _state(0.0)


@pytest.fixture(scope='module')
def pristine(tmp_path_factory):
  """A run directory with complete checkpoints at steps 1 and 2 (copy it before damaging)."""
  root = tmp_path_factory.mktemp('pristine')
  with checkpoint.Checkpoints(root, save_every=1) as ckpt:
    ckpt.save(1, _state(1.0), metadata={'epoch': 0})
    ckpt.save(2, _state(2.0), metadata={'epoch': 1})
  return root


@pytest.fixture
def run_dir(pristine, tmp_path):
  target = tmp_path / 'ckpt'
  shutil.copytree(pristine, target)
  return target


def _data_files(step_dir):
  return [p for p in (step_dir / 'state').rglob('*') if p.is_file() and p.parent.name == 'd']


def _largest_array_file(step_dir):
  return max(_data_files(step_dir), key=lambda p: p.stat().st_size)


def _array_files(step_dir):
  """The data files holding array values (1 KiB and more: the tree's own nodes are smaller).

  How orbax spreads the arrays over them depends on the order of its concurrent writes, so
  a test that damages "the arrays" damages every one of these.
  """
  return sorted(p for p in _data_files(step_dir) if p.stat().st_size >= 1024)


def _restore_step(run_dir, step):
  with checkpoint.Checkpoints(run_dir, save_every=1, read_only=True) as reader:
    return reader.restore_step(step, like=LIKE)


def test_digests_are_saved_and_verified(run_dir):
  restored = _restore_step(run_dir, 2)
  assert restored.metadata == {'epoch': 1} and restored.skipped == ()
  np.testing.assert_array_equal(
    restored.state['opt_state']['momentum_buffer'], _state(2.0)['opt_state']['momentum_buffer']
  )
  assert jax.random.key_impl(restored.state['rng']) == jax.random.key_impl(LIKE['rng'])
  saved = integrity.digests(_state(2.0))
  assert set(saved) == {
    "['params']['conv']['kernel']",
    "['opt_state']['momentum_buffer']",
    "['rng']",
    "['step']",
  }
  assert saved["['rng']"]['dtype'] == 'uint32'  # typed keys are digested as their key data
  assert saved != integrity.digests(_state(1.0))


def test_flipped_bytes_are_refused_and_resume_falls_back(run_dir):
  """Silent case 1: 64 flipped bytes in array data files restored without complaint."""
  step_dir = run_dir / 'steps' / '2'
  damaged_files = {}
  for data in _array_files(step_dir):
    content = bytearray(data.read_bytes())
    content[100:164] = bytes(b ^ 0xFF for b in content[100:164])
    data.write_bytes(bytes(content))
    damaged_files[data.relative_to(step_dir)] = bytes(content)
  assert damaged_files
  with pytest.raises(integrity.CheckpointError, match='step 2') as error:
    _restore_step(run_dir, 2)
  assert error.value.step == 2
  # Which array is checked first, and where each one's bytes sit, depends on the order of
  # orbax's concurrent writes into its data files; the message names a damaged one.
  damaged = re.search(
    r'is damaged: state(\[.*?\])( \(and 1 more\))? does not match the digest', str(error.value)
  )
  assert damaged is not None, str(error.value)
  assert damaged.group(1) in {"['opt_state']['momentum_buffer']", "['params']['conv']['kernel']"}

  with checkpoint.Checkpoints(run_dir, save_every=1, read_only=True) as reader:
    restored = reader.restore_latest(like=LIKE)
  assert restored.step == 1 and len(restored.skipped) == 1
  assert 'step 2' in restored.skipped[0] and 'moved' not in restored.skipped[0]
  assert '2' in os.listdir(run_dir / 'steps')  # a reader renames nothing

  with checkpoint.Checkpoints(run_dir, save_every=1) as ckpt:
    restored = ckpt.restore_latest(like=LIKE)
    assert restored.step == 1
    assert restored.skipped[0].endswith('moved to 2.damaged-0')
    np.testing.assert_array_equal(
      restored.state['params']['conv']['kernel'], _state(1.0)['params']['conv']['kernel']
    )
    assert ckpt.latest_step == 1
    assert ckpt.save(2, _state(2.0))  # the resumed run writes step 2 again
    ckpt.wait()
    assert ckpt.restore_latest(like=LIKE).step == 2
  names = os.listdir(run_dir / 'steps')
  assert '2.damaged-0' in names and '2' in names  # the damaged copy is kept
  for name, content in damaged_files.items():
    assert (run_dir / 'steps' / '2.damaged-0' / name).read_bytes() == content


def test_truncated_array_file_falls_back(run_dir, capfd):
  data = _largest_array_file(run_dir / 'steps' / '2')
  data.write_bytes(data.read_bytes()[:100])
  with checkpoint.Checkpoints(run_dir, save_every=1) as ckpt:
    restored = ckpt.restore_latest(like=LIKE)
  assert restored.step == 1
  (note,) = restored.skipped
  assert note.startswith(f'checkpoint step 2 in {run_dir / "steps"} cannot be read: ')
  assert 'Exception ignored' not in capfd.readouterr().err


def test_emptied_metadata_falls_back(run_dir):
  (run_dir / 'steps' / '2' / 'state' / '_METADATA').write_bytes(b'')
  with checkpoint.Checkpoints(run_dir, save_every=1) as ckpt:
    restored = ckpt.restore_latest(like=LIKE)
  assert restored.step == 1 and 'step 2' in restored.skipped[0]


def test_swapped_digests_are_refused(run_dir):
  """The digests belong to the checkpoint's own bytes: step 1's record does not fit step 2."""
  steps = run_dir / 'steps'
  shutil.rmtree(steps / '2' / 'meta')
  shutil.copytree(steps / '1' / 'meta', steps / '2' / 'meta')
  with pytest.raises(integrity.CheckpointError, match=r'step 2 .* is damaged: state\[') as error:
    _restore_step(run_dir, 2)
  assert '(and 2 more)' in str(error.value)  # kernel, momentum and step differ; the key does not


def test_every_checkpoint_damaged_is_an_error_and_renames_nothing(run_dir):
  for step in ('1', '2'):
    (run_dir / 'steps' / step / 'state' / '_METADATA').write_bytes(b'')
  with checkpoint.Checkpoints(run_dir, save_every=1) as ckpt:
    with pytest.raises(integrity.CheckpointError, match='no checkpoint restores: .*step 2.*step 1'):
      ckpt.restore_latest(like=LIKE)
  assert sorted(os.listdir(run_dir / 'steps')) == ['1', '2']


def test_a_like_that_fits_no_checkpoint_renames_nothing(run_dir):
  wrong = {**LIKE, 'extra': jnp.zeros(3)}
  with checkpoint.Checkpoints(run_dir, save_every=1) as ckpt:
    with pytest.raises(integrity.CheckpointError, match='no checkpoint restores'):
      ckpt.restore_latest(like=wrong)
  assert sorted(os.listdir(run_dir / 'steps')) == ['1', '2']


def test_restore_into_another_dtype_is_verified_on_the_saved_bytes(run_dir):
  like = {**LIKE, 'step': jnp.zeros((), jnp.float32)}
  with checkpoint.Checkpoints(run_dir, save_every=1, read_only=True) as reader:
    restored = reader.restore_step(2, like=like)
  assert restored.state['step'].dtype == jnp.float32 and float(restored.state['step']) == 2.0
