"""Training checkpoints with orbax: periodic (keep the last ``k``) and best by a metric.

A checkpoint holds one training-state pytree (arrays of any kind, typed PRNG
keys included, Python scalars) and a small JSON dict of metadata (epoch,
data-loader position, best metric so far, ...). On disk::

  <directory>/steps/<step>/   every ``save_every`` steps, the newest ``keep_last`` kept
  <directory>/best/<step>/    the single best checkpoint by the metric given to ``save_best``

Each step directory holds ``state/`` (the pytree, orbax's standard format)
and ``meta/`` (JSON).

Atomicity: orbax writes a checkpoint into ``<step>.orbax-checkpoint-tmp``,
writes its commit marker (``commit_success.txt``) there, then renames it to
``<step>``. A save cut short therefore leaves only a temporary directory,
which listing ignores and opening a writable :class:`Checkpoints` deletes. A step
directory *without* the commit marker (a copy cut short, say) is never
restored: opening the directory (unless ``read_only``) renames it to
``<step>.incomplete-<n>``, where orbax no longer sees it, and restoring skips
it in any case.

Integrity (:mod:`reorg_jax.training.integrity`): each save records a SHA-256
digest of every leaf in ``meta/``, which orbax writes before the commit
marker. Restoring recomputes them and raises
:class:`~reorg_jax.training.integrity.CheckpointError` naming the step and the
first damaged leaf; a checkpoint orbax cannot read (a truncated array file, an
emptied ``_METADATA``) raises it too. :meth:`Checkpoints.restore_latest`
falls back to the newest checkpoint that verifies and reports the ones it
skipped in :attr:`Restored.skipped`; a writable :class:`Checkpoints` then
renames each skipped one to ``<step>.damaged-<n>`` (kept for inspection, out
of orbax's sight, so the resumed run can write that step again).
Checkpoints written without digests (by earlier versions) restore with a
logged warning. Typed PRNG keys are saved as their key data and come back as
typed keys; a failed write raises
:class:`~reorg_jax.training.integrity.CheckpointWriteError`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import pathlib
import sys
from collections.abc import Iterator
from typing import Any, Literal

import jax
import numpy as np
import orbax.checkpoint as ocp

from reorg_jax.training import integrity

__all__ = ['Checkpoints', 'Restored']

_log = logging.getLogger(__name__)

PyTree = Any


def _first_line(error: BaseException, *, limit: int = 200) -> str:
  """``'Type: first line of the message'``, cut to about ``limit`` characters."""
  lines = str(error).strip().splitlines()
  first = lines[0].split(' See full TensorStore details')[0] if lines else ''
  text = f'{type(error).__name__}: {first}'
  return text if len(text) <= limit else text[: limit - 3] + '...'


def _drop_abandoned_reads() -> None:
  """Collects the read coroutines a failed orbax restore leaves behind, quietly.

  When one array of a restore fails, orbax closes its event loop with the
  other reads pending; collecting them later prints an "Exception ignored"
  traceback per array, burying the one-line error.
  """
  hook = sys.unraisablehook
  sys.unraisablehook = lambda _: None
  try:
    gc.collect()
  finally:
    sys.unraisablehook = hook


@dataclasses.dataclass(frozen=True)
class Restored:
  """A restored checkpoint.

  Attributes:
    step: the step it was saved at.
    state: the pytree, structured like the ``like`` tree given to restore.
    metadata: the JSON dict given at save (empty if none).
    skipped: for :meth:`Checkpoints.restore_latest`, one line per newer
      checkpoint that was damaged and skipped (empty when none was).
  """

  step: int
  state: PyTree
  metadata: dict[str, Any]
  skipped: tuple[str, ...] = ()


def _quarantine_uncommitted(directory: pathlib.Path) -> None:
  """Renames step directories without orbax's commit marker out of orbax's sight."""
  if not directory.is_dir():
    return
  marker = ocp.path.atomicity.COMMIT_SUCCESS_FILE
  for path in sorted(directory.iterdir()):
    if path.is_dir() and path.name.isdigit() and not (path / marker).exists():
      n = 0
      while (target := path.with_name(f'{path.name}.incomplete-{n}')).exists():
        n += 1
      _log.warning('checkpoint %s has no commit marker; moved to %s', path, target.name)
      path.rename(target)


def _metric(metrics: dict[str, float]) -> float:
  """The score a best checkpoint is ranked by, from the metrics orbax stores with it."""
  return metrics['metric']


class _DropReadOnlyNotice(logging.Filter):
  """Drops orbax's warnings that a manager opened ``read_only`` will not write (as asked)."""

  NOTICES = ('Given directory is read only', 'CheckpointManagerOptions.read_only=True')

  def filter(self, record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(self.NOTICES)


@contextlib.contextmanager
def _quiet_read_only_notice() -> Iterator[None]:
  """Within the block, orbax's read-only notices do not reach the user's terminal."""
  notice = _DropReadOnlyNotice()
  logger = logging.getLogger('absl')
  logger.addFilter(notice)
  try:
    yield
  finally:
    logger.removeFilter(notice)


class Checkpoints:
  """Periodic and best-by-metric checkpoints of one training run.

  Usage::

    with Checkpoints(run_dir / 'checkpoints', save_every=1000) as ckpt:
      start = 0
      restored = ckpt.restore_latest(like=state)  # state: freshly initialised
      if restored is not None:  # saved after `restored.step` steps: the next is that one
        state, start = restored.state, restored.step
      for step in range(start, total):
        state = train_step(state, ...)
        done = step + 1  # checkpoints are labelled by the steps they hold, as python -m train does
        ckpt.save(done, state, metadata={'epoch': epoch, 'loader_step': i})
        if done % eval_every == 0:
          ckpt.save_best(done, state, metric=evaluator.compute()['map50_95'])

  Args:
    directory: root of the run's checkpoints (created if missing), on a local
      or mounted filesystem (the commit-marker checks use ``pathlib``).
    save_every: :meth:`save` writes at steps that are multiples of it.
    keep_last: periodic checkpoints kept (older ones deleted).
    best_mode: ``'max'`` (higher metric is better, e.g. mAP) or ``'min'``.
    asynchronous: write in a background thread (arrays are copied to the
      host before :meth:`save` returns); :meth:`wait`, :meth:`close` or the
      ``with`` block's end wait for it. Restoring waits too.
    read_only: only restore, touching nothing on disk (for a second process,
      e.g. an evaluator, reading a live run: a writer cleans up temporary
      directories when it opens, which would break the other's save).
  """

  def __init__(
    self,
    directory: str | pathlib.Path,
    *,
    save_every: int,
    keep_last: int = 3,
    best_mode: Literal['max', 'min'] = 'max',
    asynchronous: bool = True,
    read_only: bool = False,
  ):
    if save_every < 1 or keep_last < 1:
      raise ValueError(f'save_every and keep_last must be >= 1, got {save_every} and {keep_last}')
    if best_mode not in ('max', 'min'):
      raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
    self.directory = pathlib.Path(directory).resolve()
    self._pending: dict[str, int] = {}  # kind -> step of the newest save started
    self.best_mode = best_mode
    self.read_only = read_only
    common = {
      'enable_async_checkpointing': asynchronous,
      'cleanup_tmp_directories': not read_only,
      'read_only': read_only,
      'create': not read_only,
    }
    if not read_only and jax.process_index() == 0:  # one process renames, for all
      _quarantine_uncommitted(self.directory / 'steps')
      _quarantine_uncommitted(self.directory / 'best')
    # Orbax names its cross-process barriers after the step (``async_write_complete.2``), so
    # the two managers saving the same step would meet at one barrier, a process's periodic
    # write paired with the other's best write: each manager gets its own prefix.
    policies = ocp.checkpoint_managers
    with _quiet_read_only_notice():
      self._steps = ocp.CheckpointManager(
        self.directory / 'steps',
        item_names=('state', 'meta'),
        options=ocp.CheckpointManagerOptions(
          save_decision_policy=policies.FixedIntervalPolicy(save_every),
          preservation_policy=policies.LatestN(keep_last),
          multiprocessing_options=ocp.options.MultiprocessingOptions(
            barrier_sync_key_prefix='steps'
          ),
          **common,
        ),
      )
      self._best = ocp.CheckpointManager(
        self.directory / 'best',
        item_names=('state', 'meta'),
        options=ocp.CheckpointManagerOptions(
          preservation_policy=policies.BestN(
            get_metric_fn=_metric,
            reverse=best_mode == 'min',
            n=1,
            keep_checkpoints_without_metrics=False,
          ),
          # Orbax writes a checkpoint's metrics only when ``best_fn`` is set, even with ``BestN``.
          best_fn=_metric,
          best_mode=best_mode,
          multiprocessing_options=ocp.options.MultiprocessingOptions(
            barrier_sync_key_prefix='best'
          ),
          **common,
        ),
      )

  def __enter__(self) -> Checkpoints:
    return self

  def __exit__(self, *exc_info: object) -> None:
    self.close()

  def _writing(self, what: str, step: int | None):
    """Context turning a failed write into :class:`integrity.CheckpointWriteError`."""
    return integrity.WriteGuard(
      what=what, step=step, directory=self.directory, latest_step=lambda: self.latest_step
    )

  def wait(self) -> None:
    """Blocks until background writes are on disk.

    Raises:
      integrity.CheckpointWriteError: a background write failed (disk full, read-only).
    """
    with self._writing('periodic', self._pending.get('periodic')):
      self._steps.wait_until_finished()
    with self._writing('best', self._pending.get('best')):
      self._best.wait_until_finished()

  def close(self) -> None:
    """Waits for background writes and releases the managers.

    Raises:
      integrity.CheckpointWriteError: as :meth:`wait` (the managers are released anyway).
    """
    try:
      self.wait()
    finally:
      for manager in (self._steps, self._best):
        try:
          manager.close()
        except Exception:  # the write error was raised by wait() already
          _log.debug('closing %s after a failed write', manager.directory, exc_info=True)

  @staticmethod
  def _complete(manager: ocp.CheckpointManager) -> list[int]:
    """Steps of ``manager`` whose directory carries the commit marker, ascending."""
    marker = ocp.path.atomicity.COMMIT_SUCCESS_FILE
    return [s for s in manager.all_steps() if (manager.directory / str(s) / marker).exists()]

  @property
  def latest_step(self) -> int | None:
    """The newest complete periodic checkpoint (finished writes only)."""
    steps = self._complete(self._steps)
    return steps[-1] if steps else None

  @property
  def best(self) -> tuple[int, float] | None:
    """``(step, metric)`` of the best checkpoint, or ``None`` before the first."""
    scored = [(float(self._best.metrics(s)['metric']), s) for s in self._complete(self._best)]
    if not scored:
      return None
    metric, step = max(scored) if self.best_mode == 'max' else min(scored)
    return step, metric

  def _check_writable(self) -> None:
    if self.read_only:
      raise PermissionError(f'checkpoints in {self.directory} were opened read_only')

  def _args(self, step: int, state: PyTree, metadata: dict[str, Any] | None) -> Any:
    metadata = {} if metadata is None else metadata
    try:
      json.dumps(metadata)
    except TypeError as error:
      raise ValueError(f'metadata must be JSON-serialisable (use int/float/str): {error}') from None
    integrity.check_savable(state)
    meta = {'step': step, 'metadata': metadata, 'digests': integrity.digests(state)}
    return ocp.args.Composite(
      state=ocp.args.StandardSave(integrity.unwrap_keys(state)), meta=ocp.args.JsonSave(meta)
    )

  def is_due(self, step: int) -> bool:
    """Whether :meth:`save` at ``step`` writes a periodic checkpoint (without ``force``)."""
    return not self.read_only and self._steps.should_save(step)

  def save(
    self, step: int, state: PyTree, *, metadata: dict[str, Any] | None = None, force: bool = False
  ) -> bool:
    """Saves a periodic checkpoint if ``step`` is due (or ``force``).

    Args:
      step: the training step (non-negative); must exceed the newest saved one.
      state: the training-state pytree.
      metadata: small JSON-serialisable dict restored with the state.
      force: save even when ``step`` is not a multiple of ``save_every``.

    Returns:
      Whether a checkpoint was written (started, when asynchronous).

    Raises:
      PermissionError: opened ``read_only``.
    """
    self._check_writable()
    if not force and not self._steps.should_save(step):
      return False
    args = self._args(step, state, metadata)
    with self._writing('periodic', self._pending.get('periodic', step)):
      self._steps.wait_until_finished()
    self._pending['periodic'] = step
    with self._writing('periodic', step):
      return self._steps.save(step, args=args, force=force)

  def save_best(
    self, step: int, state: PyTree, *, metric: float, metadata: dict[str, Any] | None = None
  ) -> bool:
    """Saves ``state`` as the best checkpoint if ``metric`` beats the best so far.

    The previous best checkpoint is deleted once the new one is written. A
    best checkpoint already at ``step`` (from a run that was resumed from an
    earlier step) is replaced when ``metric`` beats it.

    Args:
      step: the training step.
      state: the training-state pytree.
      metric: the score (higher is better for ``best_mode='max'``).
      metadata: small JSON-serialisable dict restored with the state.

    Returns:
      Whether a checkpoint was written.

    Raises:
      ValueError: ``metric`` is NaN or infinite (e.g. the mAP of an empty
        validation set).
      PermissionError: opened ``read_only``.
    """
    self._check_writable()
    metric = float(metric)
    if not np.isfinite(metric):
      raise ValueError(f'save_best needs a finite metric, got {metric}')
    with self._writing('best', self._pending.get('best', step)):
      self._best.wait_until_finished()
    best = self.best
    if best is not None:
      better = metric > best[1] if self.best_mode == 'max' else metric < best[1]
      if not better:
        return False
    if step in self._best.all_steps():
      self._best.delete(step)
    args = self._args(step, state, metadata)
    self._pending['best'] = step
    with self._writing('best', step):
      return self._best.save(step, args=args, metrics={'metric': metric}, force=True)

  def _restore(self, manager: ocp.CheckpointManager, step: int, like: PyTree) -> Restored:
    """Restores and verifies ``step``; raises :class:`integrity.CheckpointError` if damaged."""
    where = f'checkpoint step {step} in {manager.directory}'
    target = integrity.abstract_state(like)
    try:
      meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
      saved, metadata = meta.get('digests'), dict(meta['metadata'])
      # Restore in the saved dtypes, so the digests see the saved bytes; cast afterwards.
      restore_as = target if saved is None else integrity.as_saved(target, saved)
      restored = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(restore_as))
      )['state']
    except Exception as error:  # orbax and tensorstore raise many kinds on damaged files
      _drop_abandoned_reads()
      raise integrity.CheckpointError(
        f'{where} cannot be read: {_first_line(error)}', step=step
      ) from error
    if saved is None:
      _log.warning('%s has no digests (written by an earlier version); not verified', where)
    else:
      found = integrity.digests(restored)
      damaged = [
        path
        for path, entry in saved.items()
        if None not in (entry, found.get(path)) and found[path] != entry
      ]
      if damaged:
        more = f' (and {len(damaged) - 1} more)' if len(damaged) > 1 else ''
        raise integrity.CheckpointError(
          f'{where} is damaged: state{damaged[0]}{more} does not match the digest saved with it',
          step=step,
        )
    state = integrity.wrap_keys(integrity.cast_like(restored, target), like=like)
    return Restored(step=step, state=state, metadata=metadata)

  def _set_aside(self, manager: ocp.CheckpointManager, step: int) -> str:
    """Renames a damaged step directory to ``<step>.damaged-<n>``; returns the new name."""
    path = manager.directory / str(step)
    n = 0
    while (target := path.with_name(f'{step}.damaged-{n}')).exists():
      n += 1
    path.rename(target)
    manager.reload()
    return target.name

  def restore_latest(self, *, like: PyTree) -> Restored | None:
    """Restores the newest complete periodic checkpoint that verifies; ``None`` if there is none.

    A damaged newer checkpoint is skipped (:attr:`Restored.skipped` says
    which and why) and, unless ``read_only``, renamed to
    ``<step>.damaged-<n>``, never deleted. Damaged checkpoints are renamed
    only once an older one has restored, so a ``like`` that fits no
    checkpoint renames nothing.

    Args:
      like: the live training state (or one of the same structure, shapes and
        dtypes): the restored state has its structure, jax arrays come back
        with its shardings, NumPy arrays as NumPy, typed keys as typed keys.

    Raises:
      integrity.CheckpointError: every complete checkpoint is damaged (each one named).
    """
    self.wait()
    failures: list[integrity.CheckpointError] = []
    for step in reversed(self._complete(self._steps)):
      try:
        restored = self._restore(self._steps, step, like)
      except integrity.CheckpointError as error:
        failures.append(error)
        continue
      skipped = []
      for failure in failures:
        note = str(failure)
        if not self.read_only:
          note += f'; moved to {self._set_aside(self._steps, failure.step)}'
        skipped.append(note)
      return dataclasses.replace(restored, skipped=tuple(skipped))
    if failures:
      raise integrity.CheckpointError(
        'no checkpoint restores: ' + '; '.join(str(f) for f in failures), step=failures[0].step
      )
    return None

  def restore_best(self, *, like: PyTree) -> Restored | None:
    """Restores the best checkpoint (see :meth:`restore_latest`); ``None`` if there is none.

    Raises:
      integrity.CheckpointError: it is damaged.
    """
    self.wait()
    best = self.best
    return None if best is None else self._restore(self._best, best[0], like)

  def restore_step(self, step: int, *, like: PyTree) -> Restored:
    """Restores the periodic checkpoint of ``step`` (see :meth:`restore_latest`).

    Raises:
      FileNotFoundError: no complete checkpoint at ``step``, listing those there are.
      integrity.CheckpointError: it is damaged.
    """
    self.wait()
    steps = self._complete(self._steps)
    if step not in steps:
      raise FileNotFoundError(f'no complete checkpoint at step {step} in {self.directory}: {steps}')
    return self._restore(self._steps, step, like)
