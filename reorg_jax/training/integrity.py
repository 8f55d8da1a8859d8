"""Checkpoint integrity: the state restored is the state saved, or an error says why not.

:class:`reorg_jax.training.checkpoint.Checkpoints` writes and reads through
these pieces:

* Typed PRNG keys (``jax.random.key``) are stored as their key data
  (:func:`unwrap_keys`) and wrapped again on restore (:func:`wrap_keys`), with
  the implementation taken from the matching key in the ``like`` tree;
  :func:`abstract_state` is the restore target of such a tree.
* Orbax does not checksum array data, so each save records a SHA-256 digest
  of every leaf (:func:`digests`: dtype, shape and bytes) in the checkpoint's
  JSON metadata, which orbax writes before its commit marker. A restore reads
  the arrays in their saved dtypes (:func:`as_saved`), recomputes the digests,
  and only then casts to the caller's dtypes (:func:`cast_like`). A mismatch,
  or a checkpoint orbax cannot read, is a :class:`CheckpointError` naming the
  step (and the first damaged leaf).
* A write that fails (disk full, read-only directory) is a
  :class:`CheckpointWriteError`, an ``OSError`` naming the step, the directory
  and the newest complete checkpoint (:class:`WriteGuard` raises it from
  whatever orbax or tensorstore threw).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import pathlib
import re
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

__all__ = [
  'CheckpointError',
  'CheckpointWriteError',
  'WriteGuard',
  'abstract_state',
  'as_saved',
  'cast_like',
  'check_savable',
  'digests',
  'unwrap_keys',
  'wrap_keys',
]

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


def check_savable(state: PyTree) -> None:
  """Raises ``ValueError`` for leaves orbax cannot save (zero-size arrays)."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    if getattr(leaf, 'size', 1) == 0:
      raise ValueError(
        f'orbax cannot save zero-size arrays: state{jax.tree_util.keystr(path)} has shape '
        f'{leaf.shape}; drop it from the state or give it a non-empty shape'
      )


class CheckpointError(RuntimeError):
  """A checkpoint is damaged: unreadable, or its arrays do not match their digests.

  Attributes:
    step: the checkpoint's step.
  """

  def __init__(self, message: str, *, step: int):
    super().__init__(message)
    self.step = step


def _host_value(leaf: Any) -> np.ndarray | None:
  """The full value of ``leaf`` on this host, or ``None`` if no local device holds all of it."""
  if isinstance(leaf, jax.Array):
    if leaf.is_fully_addressable:
      return np.asarray(leaf)
    for shard in leaf.addressable_shards:
      if shard.data.shape == leaf.shape:  # replicated across processes
        return np.asarray(shard.data)
    return None
  return np.asarray(leaf)


def _digest(leaf: Any) -> dict[str, str] | None:
  value = _host_value(leaf)
  if value is None:
    return None
  value = np.ascontiguousarray(value)
  digest = hashlib.sha256(f'{value.dtype}{value.shape}'.encode())
  digest.update(value.reshape(-1).view(np.uint8))  # hashlib releases the GIL on large buffers
  return {'dtype': str(value.dtype), 'sha256': digest.hexdigest()}


def digests(state: PyTree) -> dict[str, dict[str, str] | None]:
  """The saved dtype and SHA-256 (of dtype, shape and bytes) of every leaf, by ``keystr`` path.

  Typed keys are digested as their key data (what is saved). Leaves are
  hashed in parallel threads. A leaf sharded across processes, whose full
  value no local device holds, gets ``None`` (not verified).
  """
  leaves = jax.tree_util.tree_leaves_with_path(unwrap_keys(state))
  workers = min(len(leaves), os.cpu_count() or 1) or 1
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    values = list(pool.map(_digest, [leaf for _, leaf in leaves]))
  return {
    jax.tree_util.keystr(path): value for (path, _), value in zip(leaves, values, strict=True)
  }


def as_saved(target: PyTree, saved: dict[str, Any]) -> PyTree:
  """``target`` with each array leaf's dtype replaced by the one it was saved with.

  Args:
    target: a restore target (:func:`abstract_state`).
    saved: the :func:`digests` recorded at save.
  """

  def retype(path: Any, leaf: Any) -> Any:
    entry = saved.get(jax.tree_util.keystr(path))
    if not isinstance(leaf, jax.ShapeDtypeStruct) or entry is None:
      return leaf
    return jax.ShapeDtypeStruct(leaf.shape, jax.numpy.dtype(entry['dtype']), sharding=leaf.sharding)

  return jax.tree_util.tree_map_with_path(retype, target)


def cast_like(tree: PyTree, target: PyTree) -> PyTree:
  """``tree``'s array leaves cast to the dtypes of ``target`` (the caller's restore target)."""

  def cast(leaf: Any, want: Any) -> Any:
    if not isinstance(want, jax.ShapeDtypeStruct) or leaf.dtype == want.dtype:
      return leaf
    return leaf.astype(want.dtype)

  return jax.tree.map(cast, tree, target)


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (disk full, read-only directory, ...).

  ``errno`` is the operating system's error code when known; the message
  names the step, the directory and the newest complete periodic checkpoint.
  The partial write lies in a ``*.orbax-checkpoint-tmp`` directory, which
  restoring never reads and the next writable
  :class:`~reorg_jax.training.checkpoint.Checkpoints` removes.
  """


_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


def _os_error(error: BaseException) -> OSError | None:
  """The operating-system error behind ``error`` (its chain, or tensorstore's message)."""
  seen = error
  while seen is not None:
    if isinstance(seen, OSError):
      return seen
    code = _OS_ERROR_CODE.search(str(seen))
    if code:
      number = int(code.group(1))
      return OSError(number, os.strerror(number))
    seen = seen.__cause__ or seen.__context__
  return None


class WriteGuard:
  """Context turning an operating-system failure of an orbax write into a write error.

  The failure becomes a :class:`CheckpointWriteError`; any other exception
  passes unchanged.

  Args:
    what: the kind of checkpoint, for the message (``'periodic'``, ``'best'``).
    step: the step being written (``None`` if unknown).
    directory: the checkpoints' root, for the message.
    latest_step: gives the newest complete periodic checkpoint; called only
      when a write has failed.
  """

  def __init__(
    self,
    *,
    what: str,
    step: int | None,
    directory: pathlib.Path,
    latest_step: Callable[[], int | None],
  ):
    self.what, self.step, self.directory, self.latest_step = what, step, directory, latest_step

  def __enter__(self) -> None:
    return None

  def __exit__(self, kind: Any, error: BaseException | None, _: Any) -> bool:
    if error is None or isinstance(error, CheckpointWriteError):
      return False
    cause = _os_error(error)
    if cause is None:
      return False
    latest = self.latest_step()
    message = (
      f'{self.what} checkpoint step {self.step} in {self.directory} was not written: '
      f'{cause.strerror or cause}; newest complete checkpoint: '
      + ('none' if latest is None else f'step {latest}')
    )
    if cause.errno is None:
      raise CheckpointWriteError(message) from error
    raise CheckpointWriteError(cause.errno, message) from error
