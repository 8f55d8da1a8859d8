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

Typed PRNG keys (``jax.random.key``) are stored as their key data
(:func:`unwrap_keys`) and wrapped again on restore (:func:`wrap_keys`), with
the implementation taken from the matching key in the ``like`` tree.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
from typing import Any, Literal

import jax
import numpy as np
import orbax.checkpoint as ocp

__all__ = ['Checkpoints', 'Restored', 'abstract_state', 'unwrap_keys', 'wrap_keys']

_log = logging.getLogger(__name__)

PyTree = Any


def _is_key(leaf: Any) -> bool:
  """Whether ``leaf`` is (the shape of) a typed PRNG key array."""
  dtype = getattr(leaf, 'dtype', None)
  return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def unwrap_keys(tree: PyTree) -> PyTree:
  """Replaces typed PRNG key arrays by their raw data (``jax.random.key_data``).

  A key array of shape ``[...]`` becomes ``uint32 [..., k]`` (``k = 2`` for
  the default threefry keys); every other leaf is returned as is.
  """
  return jax.tree.map(lambda leaf: jax.random.key_data(leaf) if _is_key(leaf) else leaf, tree)


def wrap_keys(tree: PyTree, *, like: PyTree) -> PyTree:
  """Inverse of :func:`unwrap_keys`: wraps key data where ``like`` holds typed keys.

  Args:
    tree: the pytree with raw key data, structured like ``like``.
    like: a pytree whose typed-key leaves are concrete keys (their
      implementation, e.g. threefry or rbg, is read from them).

  Raises:
    TypeError: ``like`` holds an abstract key (``jax.ShapeDtypeStruct``),
      whose implementation cannot be read.
  """

  def wrap(leaf: Any, reference: Any) -> Any:
    if not _is_key(reference):
      return leaf
    if not isinstance(reference, jax.Array):
      raise TypeError(
        f'cannot restore a typed PRNG key from an abstract target {reference}; '
        'pass a concrete key (e.g. jax.random.key(0)) in its place'
      )
    return jax.random.wrap_key_data(leaf, impl=jax.random.key_impl(reference))

  return jax.tree.map(wrap, tree, like)


def abstract_state(like: PyTree) -> PyTree:
  """The restore target for a state shaped like ``like``, keys unwrapped.

  ``jax.Array`` leaves become ``jax.ShapeDtypeStruct`` with their sharding
  (restored onto the same devices); NumPy arrays become shape/dtype structs
  without sharding (restored as NumPy); Python scalars and
  ``ShapeDtypeStruct`` leaves stay as they are.
  """
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, unwrap_keys(like))


def _check_savable(state: PyTree) -> None:
  """Raises ``ValueError`` for leaves orbax cannot save (zero-size arrays)."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    if getattr(leaf, 'size', 1) == 0:
      raise ValueError(
        f'orbax cannot save zero-size arrays: state{jax.tree_util.keystr(path)} has shape '
        f'{leaf.shape}; drop it from the state or give it a non-empty shape'
      )


@dataclasses.dataclass(frozen=True)
class Restored:
  """A restored checkpoint.

  Attributes:
    step: the step it was saved at.
    state: the pytree, structured like the ``like`` tree given to restore.
    metadata: the JSON dict given at save (empty if none).
  """

  step: int
  state: PyTree
  metadata: dict[str, Any]


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


class Checkpoints:
  """Periodic and best-by-metric checkpoints of one training run.

  Usage::

    with Checkpoints(run_dir / 'checkpoints', save_every=1000) as ckpt:
      start = 0
      restored = ckpt.restore_latest(like=state)  # state: freshly initialised
      if restored is not None:
        state, start = restored.state, restored.step + 1
      for step in range(start, total):
        state = train_step(state, ...)
        ckpt.save(step, state, metadata={'epoch': epoch, 'loader_step': i})
        if step % eval_every == 0:
          ckpt.save_best(step, state, metric=evaluator.compute()['map50_95'])

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
    self.best_mode = best_mode
    self.read_only = read_only
    policies = ocp.checkpoint_managers
    common = {
      'enable_async_checkpointing': asynchronous,
      'cleanup_tmp_directories': not read_only,
      'read_only': read_only,
    }
    if not read_only:
      _quarantine_uncommitted(self.directory / 'steps')
      _quarantine_uncommitted(self.directory / 'best')
    self._steps = ocp.CheckpointManager(
      self.directory / 'steps',
      item_names=('state', 'meta'),
      options=ocp.CheckpointManagerOptions(
        save_decision_policy=policies.FixedIntervalPolicy(save_every),
        preservation_policy=policies.LatestN(keep_last),
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
        **common,
      ),
    )

  def __enter__(self) -> Checkpoints:
    return self

  def __exit__(self, *exc_info: object) -> None:
    self.close()

  def wait(self) -> None:
    """Blocks until background writes are on disk; re-raises their errors."""
    self._steps.wait_until_finished()
    self._best.wait_until_finished()

  def close(self) -> None:
    """Waits for background writes and releases the managers."""
    self._steps.close()
    self._best.close()

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
    _check_savable(state)
    return ocp.args.Composite(
      state=ocp.args.StandardSave(unwrap_keys(state)),
      meta=ocp.args.JsonSave({'step': step, 'metadata': metadata}),
    )

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
    return self._steps.save(step, args=self._args(step, state, metadata), force=force)

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
    self._best.wait_until_finished()
    best = self.best
    if best is not None:
      better = metric > best[1] if self.best_mode == 'max' else metric < best[1]
      if not better:
        return False
    if step in self._best.all_steps():
      self._best.delete(step)
    return self._best.save(
      step, args=self._args(step, state, metadata), metrics={'metric': metric}, force=True
    )

  def _restore(self, manager: ocp.CheckpointManager, step: int, like: PyTree) -> Restored:
    restored = manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state(like)), meta=ocp.args.JsonRestore()
      ),
    )
    state = wrap_keys(restored['state'], like=like)
    return Restored(step=step, state=state, metadata=dict(restored['meta']['metadata']))

  def restore_latest(self, *, like: PyTree) -> Restored | None:
    """Restores the newest complete periodic checkpoint; ``None`` if there is none.

    Args:
      like: the live training state (or one of the same structure, shapes and
        dtypes): the restored state has its structure, jax arrays come back
        with its shardings, NumPy arrays as NumPy, typed keys as typed keys.
    """
    self.wait()
    step = self.latest_step
    return None if step is None else self._restore(self._steps, step, like)

  def restore_best(self, *, like: PyTree) -> Restored | None:
    """Restores the best checkpoint (see :meth:`restore_latest`); ``None`` if there is none."""
    self.wait()
    best = self.best
    return None if best is None else self._restore(self._best, best[0], like)

  def restore_step(self, step: int, *, like: PyTree) -> Restored:
    """Restores the periodic checkpoint of ``step`` (see :meth:`restore_latest`).

    Raises:
      FileNotFoundError: no complete checkpoint at ``step``, listing those there are.
    """
    self.wait()
    steps = self._complete(self._steps)
    if step not in steps:
      raise FileNotFoundError(f'no complete checkpoint at step {step} in {self.directory}: {steps}')
    return self._restore(self._steps, step, like)
