"""Training and evaluation batches: samples, deterministic epochs, background prefetch.

Glossary: ``B`` batch size, ``M`` max boxes per image, ``N`` label rows,
``S`` image side (square batches ``[B, S, S, 3]``).

Everything a batch contains is a function of ``(seed, epoch, step)``: the
epoch's order comes from ``(seed, epoch)`` and every sample draws its
augmentations from a generator seeded with ``(seed, epoch, dataset index)``.
So :meth:`BatchLoader.batch` can build any batch directly, a resumed run
continues exactly at ``(epoch, step)``, and loading threads cannot change
the result.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import weakref
from collections.abc import Iterable, Iterator
from concurrent import futures

import numpy as np

from reorg_jax import augment, dataset, targets

# Seed tags: generators are seeded with (seed, epoch, TAG, ...), keeping the streams apart.
_ORDER_TAG = 1
_SAMPLE_TAG = 2


def load_sample(
  data: dataset.YoloDataset,
  index: int,
  *,
  image_size: int,
  config: augment.AugmentConfig | None,
  rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
  """One training (``config`` given) or evaluation (``config=None``) sample.

  Training follows upstream's order: with probability ``mosaic`` a random
  mosaic of this and three random images (nine with probability ``mosaic9``),
  with probability ``mixup`` blended with a second such mosaic, else the image
  letterboxed and randomly warped; then HSV jitter; then, with probability
  ``paste_in`` and only when the dataset has segments, objects cut out of
  random mosaics (:func:`paste_objects`) pasted in; then up-down and
  left-right flips. Mosaics are warped segment-aware when their images have
  segments; the single-image warp uses the boxes, as upstream's. Evaluation
  only resizes the longer side to ``S`` and pads to a square.

  A draw for an option that cannot matter (``mosaic9`` at 0, ``paste_in``
  at 0 or without segments) is not made, so such options leave the samples
  of box-only datasets exactly as they were without them.

  Returns:
    ``(image, labels)``: ``[S, S, 3]`` uint8 RGB and ``[N, 5]`` float32 rows
    ``(class, cx, cy, w, h)`` normalised to the returned image.
  """
  square = (image_size, image_size)

  def fitted(i: int) -> augment.Tile:
    image = augment.fit_long_side(data.load_image(i), size=image_size, antialias=config is None)
    return image, data.labels[i], data.segments_of(i)

  def boxed(i: int) -> tuple[np.ndarray, np.ndarray]:
    image, labels, _ = fitted(i)
    h, w = image.shape[:2]
    pixels = augment.normalized_to_pixels(labels, width=w, height=h)
    image, pixels, _, _ = augment.letterbox(image, pixels, size=square, scaleup=True)
    return image, pixels

  if config is None:
    image, labels = boxed(index)
    return image, augment.pixels_to_normalized(labels, width=image_size, height=image_size)

  def random_mosaic(first: int) -> tuple[np.ndarray, np.ndarray]:
    nine = config.mosaic9 > 0 and rng.random() < config.mosaic9
    others = rng.integers(0, len(data), 8 if nine else 3)
    tiles = [fitted(i) for i in (first, *others.tolist())]
    return augment.random_mosaic(tiles, rng=rng, size=image_size, config=config)

  if rng.random() < config.mosaic:
    image, labels = random_mosaic(index)
    if rng.random() < config.mixup:
      image, labels = augment.mixup(
        (image, labels), random_mosaic(int(rng.integers(len(data)))), rng=rng
      )
  else:
    image, labels = augment.random_affine(
      *boxed(index),
      rng=rng,
      out_size=square,
      degrees=config.degrees,
      translate=config.translate,
      scale=config.scale,
      shear=config.shear,
      perspective=config.perspective,
    )
  image = augment.augment_hsv(
    image, rng=rng, hgain=config.hsv_h, sgain=config.hsv_s, vgain=config.hsv_v
  )
  if config.paste_in > 0 and data.has_segments and rng.random() < config.paste_in:
    objects = paste_objects(data, image_size=image_size, rng=rng)
    image, labels = augment.paste_in(image, labels, objects, rng=rng)
  if rng.random() < config.flipud:
    image, labels = augment.flip_ud(image, labels)
  if rng.random() < config.fliplr:
    image, labels = augment.flip_lr(image, labels)
  return image, augment.pixels_to_normalized(labels, width=image_size, height=image_size)


def paste_objects(
  data: dataset.YoloDataset, *, image_size: int, rng: np.random.Generator
) -> list[tuple[int, np.ndarray, np.ndarray]]:
  """Objects for :func:`augment.paste_in`, gathered as upstream's ``paste_in`` does.

  Repeatedly: a 4-image mosaic of random images around a random centre (not
  warped), of which :func:`augment.cut_objects` cuts a random half of the
  objects, until :data:`augment.PASTE_POOL` objects are gathered, or none
  came from the first mosaic.

  Returns:
    ``(class, patch [h, w, 3] uint8, mask [h, w] bool)`` per object.
  """
  objects: list[tuple[int, np.ndarray, np.ndarray]] = []
  while len(objects) < augment.PASTE_POOL:
    chosen = rng.integers(0, len(data), 4).tolist()
    tiles = [
      (
        augment.fit_long_side(data.load_image(i), size=image_size, antialias=False),
        data.labels[i],
        data.segments_of(i),
      )
      for i in chosen
    ]
    center = tuple(int(v) for v in rng.uniform(image_size // 2, image_size + image_size // 2, 2))
    canvas, labels, segments = augment.mosaic(tiles, size=image_size, center=center)
    if segments is not None:
      objects += augment.cut_objects(canvas, labels, segments, rng=rng)
    if not objects:
      break
  return objects


def augment_notes(data: dataset.YoloDataset, config: augment.AugmentConfig | None) -> list[str]:
  """One-line notes on options that the dataset makes ineffective (printed at start)."""
  notes = []
  if config is not None and config.paste_in > 0 and not data.has_segments:
    notes.append(
      f'note: augment.paste_in = {config.paste_in} has no effect: the training labels have no '
      'segments (polygon rows "class x1 y1 x2 y2 ..."), so there is nothing to cut out'
    )
  return notes


def max_boxes_bound(data: dataset.YoloDataset, config: augment.AugmentConfig | None) -> int:
  """A ``max_boxes`` no sample can exceed: the most boxes of one image, times 4
  with mosaic (9 when 9-image mosaics are on) and times 2 more with mixup, plus
  one per paste_in attempt when the dataset has segments (augmentation removes
  boxes otherwise)."""
  if config is None:
    return max(1, data.max_labels)
  factor = 1
  if config.mosaic > 0:
    factor = 9 if config.mosaic9 > 0 else 4
    factor *= 2 if config.mixup > 0 else 1
  pasted = len(augment.PASTE_SCALES) if config.paste_in > 0 and data.has_segments else 0
  return max(1, data.max_labels * factor + pasted)


@dataclasses.dataclass(frozen=True, eq=False)
class Batch:
  """One batch.

  Attributes:
    images: ``[B, S, S, 3]`` uint8 RGB (divide by 255 for ``[0, 1]`` floats;
      kept as bytes so the host-to-device copy is 4 times smaller).
    targets: the boxes, packed with :meth:`Targets.from_yolo`.
    labels: ``[N, 6]`` float32 upstream rows ``(image, class, cx, cy, w, h)``.
    indices: ``[B]`` int64 dataset index of each image; ``-1`` marks padding
      (only in the last batch of an epoch without ``drop_last``).
    epoch: epoch of the batch.
    step: position of the batch in its epoch.
  """

  images: np.ndarray
  targets: targets.Targets
  labels: np.ndarray
  indices: np.ndarray
  epoch: int
  step: int

  @property
  def real(self) -> np.ndarray:
    """``[B]`` bool: which images are real (not padding)."""
    return self.indices >= 0


class BatchLoader:
  """Deterministic, resumable batches of a dataset.

  ``drop_last=True`` (for training) gives ``len(data) // B`` steps per epoch;
  the left-over images differ from epoch to epoch when shuffling.
  ``drop_last=False`` (for evaluation) gives ``ceil(len(data) / B)`` steps and
  fills the last batch up to ``B`` with grey padding images without boxes,
  marked by ``indices == -1``; every image is then seen exactly once.

  Args:
    data: the split.
    batch_size: ``B``.
    image_size: ``S``.
    max_boxes: ``M``; a sample with more boxes makes :meth:`Targets.from_yolo`
      raise. :func:`max_boxes_bound` gives a value that can never be exceeded.
    seed: seed of orders and augmentations.
    config: augmentations, or ``None`` for plain letterboxed images.
    shuffle: a new order each epoch; otherwise dataset order.
    drop_last: see above.
    num_threads: samples of a batch are loaded by this many threads
      (OpenCV releases the GIL while decoding and warping).
  """

  def __init__(
    self,
    data: dataset.YoloDataset,
    *,
    batch_size: int,
    image_size: int,
    max_boxes: int,
    seed: int,
    config: augment.AugmentConfig | None,
    shuffle: bool,
    drop_last: bool,
    num_threads: int = 1,
  ):
    if batch_size < 1 or image_size < 1 or max_boxes < 1 or num_threads < 1:
      raise ValueError(
        'batch_size, image_size, max_boxes and num_threads must be >= 1, got '
        f'{batch_size}, {image_size}, {max_boxes}, {num_threads}'
      )
    if seed < 0:
      raise ValueError(f'seed must be non-negative, got {seed}')
    if drop_last and len(data) < batch_size:
      raise ValueError(f'drop_last with {len(data)} images and batch_size {batch_size}: no batches')
    self.data = data
    self.batch_size = batch_size
    self.image_size = image_size
    self.max_boxes = max_boxes
    self.seed = seed
    self.config = config
    self.shuffle = shuffle
    self.drop_last = drop_last
    self._pool = futures.ThreadPoolExecutor(num_threads) if num_threads > 1 else None

  @property
  def steps_per_epoch(self) -> int:
    """Batches in one epoch."""
    full, rest = divmod(len(self.data), self.batch_size)
    return full + (1 if rest and not self.drop_last else 0)

  def order(self, epoch: int) -> np.ndarray:
    """``[len(data)]`` dataset indices in the order of ``epoch``."""
    if not self.shuffle:
      return np.arange(len(self.data))
    return np.random.default_rng([self.seed, epoch, _ORDER_TAG]).permutation(len(self.data))

  def sample(self, epoch: int, index: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`load_sample` of dataset image ``index`` as drawn in ``epoch``."""
    rng = np.random.default_rng([self.seed, epoch, _SAMPLE_TAG, index])
    return load_sample(self.data, index, image_size=self.image_size, config=self.config, rng=rng)

  def batch(self, epoch: int, step: int) -> Batch:
    """Batch ``step`` of ``epoch``, built from scratch."""
    if epoch < 0 or not 0 <= step < self.steps_per_epoch:
      raise IndexError(f'no batch (epoch {epoch}, step {step}): {self.steps_per_epoch} per epoch')
    chosen = self.order(epoch)[step * self.batch_size : (step + 1) * self.batch_size].tolist()

    def load(index: int) -> tuple[np.ndarray, np.ndarray]:
      try:
        return self.sample(epoch, index)
      except dataset.DatasetError:
        raise
      except Exception as error:
        path = self.data.image_paths[index]
        raise RuntimeError(f'loading {path} (index {index}, epoch {epoch}) failed') from error

    samples = list(self._pool.map(load, chosen) if self._pool else map(load, chosen))
    size = self.image_size
    images = np.full((self.batch_size, size, size, 3), augment.PAD_VALUE, np.uint8)
    rows = []
    for slot, (image, labels) in enumerate(samples):
      images[slot] = image
      rows.append(np.concatenate([np.full((len(labels), 1), slot, np.float32), labels], axis=1))
    labels = np.concatenate(rows, axis=0) if rows else np.zeros((0, 6), np.float32)
    try:
      packed = targets.Targets.from_yolo(
        labels, self.batch_size, self.max_boxes, num_classes=self.data.num_classes
      )
    except ValueError as error:
      names = ', '.join(str(self.data.image_paths[i]) for i in chosen)
      raise ValueError(f'batch (epoch {epoch}, step {step}) of {names}: {error}') from error
    indices = np.full(self.batch_size, -1, np.int64)
    indices[: len(chosen)] = chosen
    return Batch(
      images=images, targets=packed, labels=labels, indices=indices, epoch=epoch, step=step
    )

  def epoch(self, epoch: int, *, start_step: int = 0) -> Iterator[Batch]:
    """The batches of ``epoch`` from ``start_step`` on."""
    for step in range(start_step, self.steps_per_epoch):
      yield self.batch(epoch, step)

  def forever(self, *, start_epoch: int = 0, start_step: int = 0) -> Iterator[Batch]:
    """Epoch after epoch, starting at ``(start_epoch, start_step)``."""
    epoch = start_epoch
    while True:
      yield from self.epoch(epoch, start_step=start_step)
      epoch, start_step = epoch + 1, 0

  def close(self) -> None:
    """Stops the loading threads."""
    if self._pool is not None:
      self._pool.shutdown(wait=True)

  def __enter__(self) -> BatchLoader:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


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
