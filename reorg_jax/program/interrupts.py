"""Ctrl-C and SIGTERM end a command with one line and the shell's exit status, at any moment.

Without this, SIGINT raises :class:`KeyboardInterrupt` wherever the main
thread is (a traceback of dozens of lines), and SIGTERM ends the process
at once, leaving an orbax checkpoint half-written in its temporary folder.

:func:`handling` installs a handler for both signals for the life of a
command. The first signal is taken by one of two parties, whichever can:

* **The main thread**, as an :class:`Interrupted` error that unwinds like
  any other: closing files, waiting for checkpoint writes in flight; the
  command then prints its line and returns :attr:`Interrupted.status`. By
  default the handler raises it wherever the main thread is. Within
  :func:`on_stop` with ``deferred=True`` (the training loop) it is raised
  only at the loop's safe points, :func:`check`, never in the middle of a
  checkpoint write.
* **A watcher thread**, woken by the signal through
  :func:`signal.set_wakeup_fd`, when the main thread has not taken the
  signal within :data:`GRACE_S`: it is inside a long call that Python cannot
  interrupt (XLA compiling a step, a slow step, an evaluation between two
  safe points). The watcher waits for the checkpoint writes in flight
  (:func:`on_stop`'s ``settle``), removes orbax's temporary folders, prints
  the same line and ends the process (``os._exit``) with the same status.

A second signal while the first is being handled stops the process at once
in the watcher's way, abandoning writes in flight (the line says so; their
temporary folders are removed, and a resume ignores them anyway).

The exit status is ``128 + signal``, as a shell reports a process killed by
it: 130 for SIGINT, 143 for SIGTERM.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = [
  'GRACE_S',
  'SETTLE_S',
  'SIGNALS',
  'Interrupted',
  'check',
  'finish',
  'handling',
  'line',
  'on_stop',
  'remove_temporaries',
]

SIGNALS = (signal.SIGINT, signal.SIGTERM)
# How long the watcher leaves the main thread to take a signal before stopping the process.
GRACE_S = 1.0
# How long a stop waits for checkpoint writes in flight before abandoning them.
SETTLE_S = 120.0


class Interrupted(BaseException):  # noqa: N818 (like KeyboardInterrupt, not caught as an Exception)
  """A signal ended the command; raised in the main thread by the handler.

  A :class:`BaseException`, as :class:`KeyboardInterrupt`, so that
  ``except Exception`` clauses on the way do not swallow it.

  Attributes:
    signum: the signal.
    detail: what the command adds to the line (set on the way up, e.g. the
      step and the checkpoint a resume continues from).
  """

  def __init__(self, signum: int):
    super().__init__(signal.Signals(signum).name)
    self.signum = signum
    self.detail = ''

  @property
  def name(self) -> str:
    """``'SIGINT'`` or ``'SIGTERM'``."""
    return signal.Signals(self.signum).name

  @property
  def status(self) -> int:
    """The exit status a shell expects: ``128 + signum``."""
    return 128 + self.signum


@dataclasses.dataclass
class _Stop:
  """What the watcher needs to stop the process in the command's name."""

  describe: Callable[[], str] = lambda: ''
  settle: Callable[[], None] | None = None
  temporaries: tuple[Path, ...] = ()
  deferred: bool = False


_printed = threading.Lock()  # held by whoever prints the final line; the other never prints
_owner = threading.Lock()  # held by whoever handles the first signal (main thread or watcher)
_taken = threading.Event()  # the main thread took the first signal
_stop = _Stop()
_pending: int | None = None  # a signal the main thread will raise at its next check()


def line(signum: int, detail: str = '', *, abandoned: bool = False) -> str:
  """``interrupted by SIGINT[; detail][; writes in flight abandoned]``, without ``error:``."""
  text = f'interrupted by {signal.Signals(signum).name}'
  if detail:
    text += f' {detail}'
  if abandoned:
    text += '; checkpoint writes in flight were abandoned'
  return text


def _print_once(text: str) -> bool:
  """Prints ``error: text`` on stderr unless another thread has printed; returns whether it did."""
  if not _printed.acquire(blocking=False):
    return False
  print(f'error: {text}', file=sys.stderr, flush=True)
  return True


def remove_temporaries(folders: tuple[Path, ...]) -> int:
  """Deletes orbax's temporary checkpoint folders (``*.orbax-checkpoint-tmp*``) in ``folders``.

  Returns:
    How many there were (writes cut short).
  """
  removed = 0
  for folder in folders:
    if folder.is_dir():
      for path in folder.glob('*.orbax-checkpoint-tmp*'):
        shutil.rmtree(path, ignore_errors=True)
        removed += 1
  return removed


def _stop_now(signum: int, *, abandoned: bool) -> None:
  """The watcher's stop: settle the writes (unless abandoning them), clean, print, exit."""
  stop = _stop
  if stop.settle is not None and not abandoned:
    settler = threading.Thread(target=_quietly(stop.settle), daemon=True)
    settler.start()
    settler.join(SETTLE_S)
    abandoned = settler.is_alive()
  remove_temporaries(stop.temporaries)
  try:
    detail = stop.describe()
  except Exception:  # noqa: BLE001 (the line must come out whatever the state)
    detail = ''
  if _print_once(line(signum, detail, abandoned=abandoned)):
    os._exit(128 + signum)
  # The main thread is printing the line itself: let it finish and exit.


def _quietly(function: Callable[[], None]) -> Callable[[], None]:
  def run() -> None:
    with contextlib.suppress(BaseException):
      function()

  return run


def _watch(read_fd: int) -> None:
  """The watcher thread: wakes on each signal byte the C handler writes."""
  count = 0
  while True:
    try:
      data = os.read(read_fd, 1)
    except OSError:
      return
    if not data:
      return
    count += 1
    signum = data[0]
    if count == 1:
      if _taken.wait(GRACE_S) or not _owner.acquire(blocking=False):
        continue  # the main thread is unwinding; a second signal stops at once
    _stop_now(signum, abandoned=count > 1)


def _take(signum: int) -> None:
  """The main thread takes the signal: raises :class:`Interrupted` unless the watcher has."""
  if _owner.acquire(blocking=False):
    _taken.set()
    raise Interrupted(signum)
  threading.Event().wait()  # the watcher is stopping the process


def _handler(signum: int, frame: object) -> None:
  global _pending
  if _owner.locked():
    return  # the first signal is being handled; the watcher stops at a second one
  if _stop.deferred:
    _pending = signum
    return
  _take(signum)


def check() -> None:
  """A safe point of a ``deferred`` block: raises :class:`Interrupted` if a signal came."""
  if _pending is not None and not _taken.is_set():
    _take(_pending)


@contextlib.contextmanager
def handling() -> Iterator[None]:
  """Handles SIGINT and SIGTERM as the module docstring says, within the block.

  Must be entered in the main thread. Outside the main thread (a command run
  from a worker thread, as some tests do) it does nothing.
  """
  global _printed, _owner, _taken, _pending
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  _printed, _owner, _taken, _pending = threading.Lock(), threading.Lock(), threading.Event(), None
  read_fd, write_fd = os.pipe()
  os.set_blocking(write_fd, False)
  previous = {signum: signal.getsignal(signum) for signum in SIGNALS}
  previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
  for signum in SIGNALS:
    signal.signal(signum, _handler)
  watcher = threading.Thread(target=_watch, args=(read_fd,), name='interrupts', daemon=True)
  watcher.start()
  try:
    yield
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)
    signal.set_wakeup_fd(previous_fd)
    os.close(write_fd)  # the watcher reads end-of-file and returns
    watcher.join(5)
    os.close(read_fd)


@contextlib.contextmanager
def on_stop(
  *,
  describe: Callable[[], str],
  settle: Callable[[], None] | None = None,
  temporaries: tuple[Path, ...] = (),
  deferred: bool = False,
) -> Iterator[None]:
  """Tells the watcher, within the block, how to stop the process in the command's name.

  Args:
    describe: the detail of the line (``at step 40; newest complete
      checkpoint: ...``), computed when the signal comes.
    settle: waits for the checkpoint writes in flight (called from another
      thread, abandoned after :data:`SETTLE_S`).
    temporaries: folders whose orbax temporary folders the stop removes.
    deferred: the main thread raises :class:`Interrupted` only at
      :func:`check` (the signals between two checks wait for the next one, or
      for the watcher after :data:`GRACE_S`).
  """
  global _stop
  saved = _stop
  _stop = _Stop(describe=describe, settle=settle, temporaries=temporaries, deferred=deferred)
  try:
    yield
  finally:
    _stop = saved


def finish(error: Interrupted) -> int:
  """Prints the line for ``error`` (unless the watcher did) and returns its exit status."""
  if not _print_once(line(error.signum, error.detail)):
    threading.Event().wait()  # the watcher prints and exits the process
  return error.status
