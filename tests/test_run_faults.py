"""One writer per run directory, and failed writes that end the run in one line.

Nothing here trains: ``main.main`` is stopped by the lock or by a failed
write before the model is initialised (a guard fails the test otherwise),
and the checkpoint and table faults are exercised on small states and files.
Disk-full and read-only errors are raised by monkeypatching (the tests run
as root, whom permissions do not stop).
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest

from reorg_jax.data import synthetic
from reorg_jax.program import config as config_lib
from reorg_jax.program import loop, report, rundir, runtime
from reorg_jax.program.commands import train as main
from reorg_jax.training import checkpoint, integrity


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp('faults')
  return synthetic.write_dataset(root / 'data', num_train=8, num_val=2, image_size=64, seed=0)


@pytest.fixture
def no_training(monkeypatch):
  """Fails the test if a run gets as far as building its train state."""

  def refuse(*args, **kwargs):
    raise AssertionError('the run should have stopped before training')

  monkeypatch.setattr(loop.train_lib, 'create_train_state', refuse)


_HOLDER = textwrap.dedent(
  """
  import fcntl, os, sys
  fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
  fcntl.flock(fd, fcntl.LOCK_EX)
  os.write(fd, f'{os.getpid()}\\n'.encode())
  print('held', flush=True)
  sys.stdin.read()
  """
)


def test_second_run_into_a_held_directory_exits_naming_the_pid(data, tmp_path, capsys, no_training):
  """Silent case 2: two runs into one --workdir both wrote every row."""
  workdir = tmp_path / 'run'
  workdir.mkdir()
  holder = subprocess.Popen(
    [sys.executable, '-c', _HOLDER, str(workdir / 'run.lock')],
    stdin=subprocess.PIPE,
    stdout=subprocess.PIPE,
    text=True,
  )
  try:
    assert holder.stdout.readline().strip() == 'held'
    assert main.main(['--data', str(data), '--workdir', str(workdir)]) == 1
  finally:
    holder.communicate('', timeout=30)
  err = capsys.readouterr().err
  assert err == (
    f'error: {workdir} is in use by another run (pid {holder.pid}, holding '
    f'{workdir / "run.lock"}); wait for it to end or choose another --workdir\n'
  )
  assert sorted(os.listdir(workdir)) == ['run.lock']  # nothing else was written


def test_lock_is_exclusive_within_a_process_and_released(tmp_path):
  path = tmp_path / 'run.lock'
  with rundir.RunLock(path):
    assert path.read_text() == f'{os.getpid()}\n'
    with pytest.raises(loop.RunError, match=f'pid {os.getpid()}'):
      with rundir.RunLock(path):
        pass
  with rundir.RunLock(path):  # released at the end of the block
    pass


def _fail_writes(monkeypatch, code: int) -> None:
  def dump(config, path):
    raise OSError(code, os.strerror(code), str(path))

  monkeypatch.setattr(config_lib, 'dump', dump)


def test_read_only_run_directory_is_one_line(data, tmp_path, capsys, monkeypatch, no_training):
  _fail_writes(monkeypatch, errno.EROFS)
  workdir = tmp_path / 'run'
  assert main.main(['--data', str(data), '--workdir', str(workdir)]) == 1
  assert capsys.readouterr().err == (
    f'error: cannot write {workdir / "config.yaml"}: Read-only file system; '
    'newest complete checkpoint: none yet (--resume continues from it)\n'
  )


def test_full_disk_names_the_newest_complete_checkpoint(
  data, tmp_path, capsys, monkeypatch, no_training
):
  workdir = tmp_path / 'run'
  with checkpoint.Checkpoints(workdir / 'checkpoints', save_every=1) as ckpt:
    ckpt.save(3, {'w': jnp.ones(2)})
    ckpt.save(6, {'w': jnp.ones(2)})
  (workdir / 'checkpoints' / 'steps' / '9').mkdir()  # cut short: no commit marker
  _fail_writes(monkeypatch, errno.ENOSPC)
  assert main.main(['--data', str(data), '--workdir', str(workdir), '--resume']) == 1
  steps = workdir / 'checkpoints' / 'steps'
  assert capsys.readouterr().err == (
    f'error: cannot write {workdir / "config.yaml"}: No space left on device; '
    f'newest complete checkpoint: step 6 in {steps} (--resume continues from it)\n'
  )


def _tensorstore_failure(*args, **kwargs):
  """What orbax raises when tensorstore meets a full disk (observed on a 2 MB tmpfs)."""
  raise ValueError(
    'RESOURCE_EXHAUSTED: Error writing "w/0" in OCDBT database: Failed to write 1677665 '
    "bytes to file 4: No space left on device [os_error_code='28']"
  )


def test_failed_checkpoint_write_is_an_os_error_naming_step_and_fallback(tmp_path, monkeypatch):
  with checkpoint.Checkpoints(tmp_path, save_every=1) as ckpt:
    ckpt.save(1, {'w': jnp.ones(2)})
    ckpt.wait()
    monkeypatch.setattr(ckpt._steps, 'save', _tensorstore_failure)
    with pytest.raises(integrity.CheckpointWriteError) as error:
      ckpt.save(2, {'w': jnp.ones(2)})
    monkeypatch.undo()
  assert error.value.errno == errno.ENOSPC
  assert str(error.value) == (
    f'[Errno 28] periodic checkpoint step 2 in {tmp_path} was not written: No space left on '
    'device; newest complete checkpoint: step 1'
  )
  assert isinstance(error.value, OSError)
  line = str(rundir.write_failure(error.value, tmp_path))
  assert line.startswith('periodic checkpoint step 2') and line.endswith('once the disk has room')


def test_background_write_failure_surfaces_at_wait(tmp_path, monkeypatch):
  with checkpoint.Checkpoints(tmp_path, save_every=1) as ckpt:
    ckpt.save(4, {'w': jnp.ones(2)})
    monkeypatch.setattr(ckpt._steps, 'wait_until_finished', _tensorstore_failure)
    with pytest.raises(integrity.CheckpointWriteError, match='periodic checkpoint step 4'):
      ckpt.wait()
    with pytest.raises(integrity.CheckpointWriteError, match='step 4'):
      ckpt.close()  # the managers are released all the same
    monkeypatch.undo()
  with pytest.raises(ValueError, match='not a checkpoint error'):  # other errors pass unchanged
    with integrity.WriteGuard(
      what='periodic', step=1, directory=tmp_path, latest_step=lambda: None
    ):
      raise ValueError('not a checkpoint error')


def test_tables_drop_a_cut_short_row_and_repeated_steps(tmp_path):
  path = tmp_path / 'steps.csv'
  columns = ('step', 'loss')
  # Two runs wrote every row twice, then a full disk cut the last row short.
  path.write_text('step,loss\n0,1.5\n0,1.5\n1,1.25\n1,1.25\n2,1\n3,0.7')
  assert [row['step'] for row in report.read_rows(path)] == [0, 0, 1, 1, 2]
  table = report.Table(path, columns=columns, keep_below=2, key='step')
  assert table.rows == [{'step': 0.0, 'loss': 1.5}, {'step': 1.0, 'loss': 1.25}]
  assert path.read_text() == 'step,loss\n0,1.5\n1,1.25\n'
  path.write_text('step,loss\n0,1.5\n1,oops\n2,1\n')
  with pytest.raises(ValueError, match=f'{path}:3: not a row of numbers'):
    report.read_rows(path)


def test_table_rewrite_on_a_full_disk_keeps_the_old_file(tmp_path, monkeypatch):
  path = tmp_path / 'results.csv'
  path.write_text('step,loss\n0,1.5\n1,1.25\n')

  def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

  monkeypatch.setattr(os, 'replace', full)
  with pytest.raises(OSError, match='No space left'):
    report.Table(path, columns=('step', 'loss'), keep_below=1, key='step')
  with pytest.raises(OSError, match='No space left'):
    config_lib.dump({'seed': 0}, tmp_path / 'config.yaml')
  monkeypatch.undo()
  assert path.read_text() == 'step,loss\n0,1.5\n1,1.25\n'
  assert sorted(os.listdir(tmp_path)) == ['results.csv']  # no temporary file left behind
  np.testing.assert_equal(report.read_rows(path)[1]['loss'], 1.25)


def test_program_hides_only_the_closed_loop_reports_of_abandoned_writes():
  """After a failed write, each abandoned orbax write reports 'Event loop is closed' (thousands
  of lines on a full disk); the program drops those and passes every other report on."""
  seen = []
  hook = runtime._quiet_closed_loops(seen.append)
  assert runtime._quiet_closed_loops(hook) is hook  # installing twice wraps once

  class Report:
    def __init__(self, value):
      self.exc_value = value

  hook(Report(RuntimeError('Event loop is closed')))
  other = Report(RuntimeError('something else'))
  hook(other)
  hook(Report(ValueError('Event loop is closed')))
  assert [r.exc_value.args[0] for r in seen] == ['something else', 'Event loop is closed']


def test_resume_with_nothing_to_resume_is_an_error(data, tmp_path, capsys, no_training):
  """A misspelled or empty --workdir with --resume used to train from step 0 and exit 0."""
  missing = tmp_path / 'runs' / 'typo'
  assert main.main(['--data', str(data), '--workdir', str(missing), '--resume']) == 2
  assert capsys.readouterr().err == (
    f'error: --resume: {missing} does not exist, so there is no run to resume\n'
  )
  assert not missing.exists()
  empty = tmp_path / 'empty'
  (empty / 'checkpoints' / 'steps' / '4.orbax-checkpoint-tmp').mkdir(parents=True)  # cut short
  assert main.main(['--data', str(data), '--workdir', str(empty), '--resume']) == 2
  assert capsys.readouterr().err == (
    f'error: --resume: {empty} holds no complete checkpoint (in {empty / "checkpoints" / "steps"}) '
    'to resume from; start the run without --resume\n'
  )
  assert sorted(p.name for p in empty.rglob('*')) == [
    '4.orbax-checkpoint-tmp',
    'checkpoints',
    'steps',
  ]


def test_run_without_a_complete_checkpoint_may_start_again(tmp_path):
  """Its --resume is refused, so a fresh start over it must not be."""
  (tmp_path / 'checkpoints' / 'steps' / '2.orbax-checkpoint-tmp').mkdir(parents=True)
  (tmp_path / 'checkpoints' / 'best').mkdir()
  rundir.check_workdir(tmp_path, {}, resume=False)  # no error
  (tmp_path / 'checkpoints' / 'best' / '4').mkdir()
  with pytest.raises(loop.RunError, match='already holds the checkpoints of a run'):
    rundir.check_workdir(tmp_path, {}, resume=False)


def test_workdir_that_is_a_file_is_one_line(data, tmp_path, capsys, no_training):
  path = tmp_path / 'notes.txt'
  path.write_text('not a run\n')
  for extra in ([], ['--resume']):
    assert main.main(['--data', str(data), '--workdir', str(path), *extra]) == 2
    assert capsys.readouterr().err == f'error: --workdir {path} exists and is not a folder\n'
  assert path.read_text() == 'not a run\n'


@pytest.mark.parametrize('which', ['config', 'data'])
def test_yaml_syntax_errors_name_file_line_and_column(data, tmp_path, capsys, no_training, which):
  """A tab in the indentation used to give four lines pointing at '<unicode string>'."""
  bad = tmp_path / 'bad.yaml'
  if which == 'config':
    bad.write_text('train:\n\tepochs: 3\n')
    flags = ['--config', str(bad), '--data', str(data)]
  else:
    bad.write_text(data.read_text() + 'names:\n\t- a\n')
    flags = ['--data', str(bad)]
  lines = len(bad.read_text().splitlines())
  assert main.main([*flags, '--workdir', str(tmp_path / 'run')]) == 2
  assert capsys.readouterr().err == (
    f"error: {bad}:{lines}:1: found character '\\t' that cannot start any token "
    '(while scanning for the next token)\n'
  )
  assert not (tmp_path / 'run').exists()
