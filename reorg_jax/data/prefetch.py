"""Background prefetch: an iterator run ahead in a thread, with its errors handed over.

:class:`Prefetcher` keeps the next batches (from :class:`reorg_jax.data.loader.BatchLoader`)
ready while the training step runs.
"""

from __future__ import annotations

import queue
import threading
import weakref
from collections.abc import Iterable, Iterator

__all__ = ['Prefetcher']


class Prefetcher:
  """Runs an iterator in a background thread, ``buffer_size`` items ahead.

  Yields exactly what the wrapped iterator yields, in order; an exception
  raised there is re-raised here, at the item where it happened. Use as a
  context manager (or call :meth:`close`) to stop the thread early; an
  abandoned prefetcher stops its thread when it is garbage collected.
  """

  def __init__(self, items: Iterable, *, buffer_size: int = 2):
    if buffer_size < 1:
      raise ValueError(f'buffer_size must be >= 1, got {buffer_size}')
    self._queue: queue.Queue = queue.Queue(maxsize=buffer_size)
    self._stop = threading.Event()
    self._finished = False
    # The thread must not reference self, or an abandoned prefetcher would never be collected.
    self._thread = threading.Thread(
      target=_produce, args=(iter(items), self._queue, self._stop), daemon=True
    )
    self._thread.start()
    weakref.finalize(self, self._stop.set)

  def __iter__(self) -> Prefetcher:
    return self

  def __next__(self):
    if self._finished:
      raise StopIteration
    item, error = self._queue.get()
    if item is _END:
      self._finished = True
      self._thread.join()
      if error is not None:
        raise error
      raise StopIteration
    return item

  def close(self) -> None:
    """Stops the background thread; further iteration ends."""
    self._stop.set()
    self._finished = True
    self._thread.join()

  def __enter__(self) -> Prefetcher:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


_END = object()


def _produce(items: Iterator, out: queue.Queue, stop: threading.Event) -> None:
  """Body of a :class:`Prefetcher` thread: items, then ``_END`` with the error if one."""

  def put(entry: tuple) -> bool:
    while not stop.is_set():
      try:
        out.put(entry, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  try:
    for item in items:
      if not put((item, None)):
        return
  except BaseException as error:  # Handed to the consumer, who re-raises it.
    put((_END, error))
    return
  put((_END, None))
