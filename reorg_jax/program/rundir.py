"""The run directory: one writer at a time, a run it may continue, one-line write failures.

* :class:`RunLock` holds ``run.lock`` (one file per process of a
  multi-process run, :func:`lock_path`) for the run's life; a second run
  into the same directory fails at once naming the holder's pid.
* :func:`check_workdir` refuses a fresh start over another run's
  checkpoints, and a resume with options that would change the run
  (:data:`reorg_jax.program.config.FIXED_ON_RESUME`).
* :func:`write_failure` turns a failed write (disk full, read-only
  directory) into one :class:`RunError` line naming the path and the newest
  complete checkpoint to resume from.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Any

import jax

from reorg_jax.program import config as config_lib
from reorg_jax.training import checkpoint, integrity

__all__ = [
  'RunError',
  'RunLock',
  'WorkdirError',
  'check_workdir',
  'check_workdir_path',
  'lock_path',
  'newest_complete',
  'resume_hint',
  'write_failure',
]


class RunError(RuntimeError):
  """The run directory or devices do not fit the requested run."""


class WorkdirError(ValueError):
  """``--workdir`` cannot be the run asked for: not a folder, or nothing in it to resume."""


def check_workdir_path(workdir: Path, *, resume: bool) -> None:
  """Raises :class:`WorkdirError` before anything is read or written, when

  * ``workdir`` exists and is not a folder;
  * ``resume`` and ``workdir`` holds no complete periodic checkpoint (a
    misspelled or empty ``--workdir`` would otherwise start afresh).
  """
  if workdir.exists() and not workdir.is_dir():
    raise WorkdirError(f'--workdir {workdir} exists and is not a folder')
  if not resume:
    return
  if not workdir.exists():
    raise WorkdirError(f'--resume: {workdir} does not exist, so there is no run to resume')
  if newest_complete(workdir) == 'none yet':
    raise WorkdirError(
      f'--resume: {workdir} holds no complete checkpoint (in {workdir / "checkpoints" / "steps"}) '
      'to resume from; start the run without --resume'
    )


def check_workdir(workdir: Path, current: dict[str, Any], *, resume: bool) -> None:
  """Raises :class:`RunError` when ``workdir`` holds a run this one may not start or continue.

  Args:
    workdir: the run directory.
    current: the resolved configuration of this run.
    resume: whether this run continues the one in ``workdir``.
  """
  saved_path = workdir / 'config.yaml'
  # A run that stopped before its first complete checkpoint left nothing to resume (and
  # --resume refuses it): it may start again.
  has_run = any(
    path.name.isdigit()
    for kind in ('steps', 'best')
    for path in (workdir / 'checkpoints' / kind).glob('*')
  )
  if not resume and has_run:
    raise RunError(
      f'{workdir} already holds the checkpoints of a run: pass --resume to continue it, '
      'or choose another --workdir'
    )
  if resume and saved_path.is_file():
    conflicts = config_lib.resume_conflicts(config_lib.read_yaml(saved_path), current)
    if conflicts:
      raise RunError('cannot resume with options that change the run: ' + '; '.join(conflicts))


class RunLock:
  """An advisory lock (``fcntl.flock``) on a file in the run directory.

  The holder writes its pid into the file; a second holder fails at once
  with :class:`RunError` naming that pid. The lock ends with the process
  (even on ``kill -9``); the file stays.

  Args:
    path: the lock file (created if missing).
  """

  def __init__(self, path: str | os.PathLike):
    self.path = Path(path)
    self._fd: int | None = None

  def __enter__(self) -> RunLock:
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 32, 0).decode(errors='replace').strip() or 'unknown'
      os.close(fd)
      raise RunError(
        f'{self.path.parent} is in use by another run (pid {holder}, holding {self.path}); '
        'wait for it to end or choose another --workdir'
      ) from None
    except BaseException:
      os.close(fd)
      raise
    try:
      os.ftruncate(fd, 0)
      os.pwrite(fd, f'{os.getpid()}\n'.encode(), 0)
    except BaseException:
      os.close(fd)  # closing releases the lock
      raise
    self._fd = fd
    return self

  def __exit__(self, *exc_info: object) -> None:
    if self._fd is not None:
      os.close(self._fd)
      self._fd = None


def lock_path(workdir: Path) -> Path:
  """This process's lock file in ``workdir`` (one per process of a multi-process run)."""
  if jax.process_count() == 1:
    return workdir / 'run.lock'
  return workdir / f'run.{jax.process_index()}.lock'


def newest_complete(workdir: Path) -> str:
  """The newest periodic checkpoint with its commit marker, in words (no orbax involved)."""
  steps = workdir / 'checkpoints' / 'steps'
  marker = checkpoint.ocp.path.atomicity.COMMIT_SUCCESS_FILE
  done = sorted(int(p.name) for p in steps.glob('*') if p.name.isdigit() and (p / marker).exists())
  return f'step {done[-1]} in {steps}' if done else 'none yet'


def resume_hint(workdir: Path) -> str:
  """Where ``--resume`` would continue from, in words, for a run that stopped."""
  newest = newest_complete(workdir)
  if newest == 'none yet':
    return 'no checkpoint was complete yet (start the run again without --resume)'
  return f'newest complete checkpoint: {newest} (--resume continues from it)'


def write_failure(error: OSError, workdir: Path) -> RunError:
  """One line for a failed write: the path, the reason and the checkpoint to resume from."""
  if isinstance(error, integrity.CheckpointWriteError):
    return RunError(f'{error.strerror or error}; resume with --resume once the disk has room')
  path = error.filename or workdir
  reason = error.strerror or str(error)
  return RunError(
    f'cannot write {path}: {reason}; newest complete checkpoint: {newest_complete(workdir)} '
    '(--resume continues from it)'
  )
