"""Training and evaluation batches: samples, deterministic epochs, worker processes.

Glossary: ``B`` batch size, ``M`` max boxes per image, ``N`` label rows,
``S`` image side (square batches ``[B, S, S, 3]``).

Everything a batch contains is a function of ``(seed, epoch, step)``: the
epoch's order comes from ``(seed, epoch)`` and every sample draws its
augmentations from a generator seeded with ``(seed, epoch, dataset index)``.
So :meth:`BatchLoader.batch` can build any batch directly, a resumed run
continues exactly at ``(epoch, step)``, and neither loading threads nor
worker processes can change the result. In multi-process training each
process builds only its shard (a contiguous block of rows) of every global
batch; the shards of all processes, stacked, are the global batch.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
from collections.abc import Iterator
from concurrent import futures

import cv2
import numpy as np

from reorg_jax import targets
from reorg_jax.data import augment, dataset, geometry, mosaic

__all__ = [
  'Batch',
  'BatchLoader',
  'augment_notes',
  'load_sample',
  'max_boxes_bound',
  'paste_objects',
]

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

  def fitted(i: int) -> mosaic.Tile:
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
    return mosaic.random_mosaic(tiles, rng=rng, size=image_size, config=config)

  if rng.random() < config.mosaic:
    image, labels = random_mosaic(index)
    if rng.random() < config.mixup:
      image, labels = mosaic.mixup(
        (image, labels), random_mosaic(int(rng.integers(len(data)))), rng=rng
      )
  else:
    image, labels = geometry.random_affine(
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
    image, labels = mosaic.paste_in(image, labels, objects, rng=rng)
  if rng.random() < config.flipud:
    image, labels = augment.flip_ud(image, labels)
  if rng.random() < config.fliplr:
    image, labels = augment.flip_lr(image, labels)
  return image, augment.pixels_to_normalized(labels, width=image_size, height=image_size)


def paste_objects(
  data: dataset.YoloDataset, *, image_size: int, rng: np.random.Generator
) -> list[tuple[int, np.ndarray, np.ndarray]]:
  """Objects for :func:`mosaic.paste_in`, gathered as upstream's ``paste_in`` does.

  Repeatedly: a 4-image mosaic of random images around a random centre (not
  warped), of which :func:`mosaic.cut_objects` cuts a random half of the
  objects, until :data:`mosaic.PASTE_POOL` objects are gathered, or none
  came from the first mosaic.

  Returns:
    ``(class, patch [h, w, 3] uint8, mask [h, w] bool)`` per object.
  """
  objects: list[tuple[int, np.ndarray, np.ndarray]] = []
  while len(objects) < mosaic.PASTE_POOL:
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
    canvas, labels, segments = mosaic.mosaic(tiles, size=image_size, center=center)
    if segments is not None:
      objects += mosaic.cut_objects(canvas, labels, segments, rng=rng)
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
  pasted = len(mosaic.PASTE_SCALES) if config.paste_in > 0 and data.has_segments else 0
  return max(1, data.max_labels * factor + pasted)


@dataclasses.dataclass(frozen=True, eq=False)
class _Sampler:
  """:func:`load_sample` of ``(epoch, index)`` with its seeded generator; sent to workers."""

  data: dataset.YoloDataset
  image_size: int
  config: augment.AugmentConfig | None
  seed: int

  def __call__(self, epoch: int, index: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([self.seed, epoch, _SAMPLE_TAG, index])
    try:
      return load_sample(self.data, index, image_size=self.image_size, config=self.config, rng=rng)
    except dataset.DatasetError:
      raise
    except Exception as error:
      path = self.data.image_paths[index]
      raise RuntimeError(
        f'loading {path} (index {index}, epoch {epoch}) failed: {error}'
      ) from error


# The sampler of a worker process, set once when the worker starts.
_worker_sampler: _Sampler | None = None


def _start_worker(sampler: _Sampler) -> None:
  global _worker_sampler
  _worker_sampler = sampler
  cv2.setNumThreads(1)  # one core per worker, as upstream's DataLoader workers


def _sample_in_worker(epoch: int, index: int) -> tuple[np.ndarray, np.ndarray]:
  assert _worker_sampler is not None, 'worker started without its sampler'
  return _worker_sampler(epoch, index)


@dataclasses.dataclass(frozen=True, eq=False)
class Batch:
  """One batch.

  With a loader of ``shard_count`` shards, ``B`` here is the shard's rows,
  ``batch_size / shard_count``, and image numbers count within the shard.

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
    num_workers: samples are loaded by this many worker processes instead
      (started with ``spawn``, each with one OpenCV thread; they receive the
      dataset once); ``0``: in this process. Use one of ``num_threads`` and
      ``num_workers``.
    shard_index: which shard of every batch this loader builds.
    shard_count: the shards (processes) a batch is split into: shard ``i``
      holds the global batch's rows ``[i * B / n, (i + 1) * B / n)``.

  Raises:
    ValueError: a size or count below 1, a negative seed, both threads and
      workers, a shard outside ``[0, shard_count)`` or a batch size that does
      not split into the shards, or ``drop_last`` with fewer images than
      ``batch_size``.
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
    num_workers: int = 0,
    shard_index: int = 0,
    shard_count: int = 1,
  ):
    if batch_size < 1 or image_size < 1 or max_boxes < 1 or num_threads < 1 or shard_count < 1:
      raise ValueError(
        'batch_size, image_size, max_boxes, num_threads and shard_count must be >= 1, got '
        f'{batch_size}, {image_size}, {max_boxes}, {num_threads}, {shard_count}'
      )
    if seed < 0:
      raise ValueError(f'seed must be non-negative, got {seed}')
    if num_workers < 0:
      raise ValueError(f'num_workers must be >= 0, got {num_workers}')
    if num_workers and num_threads > 1:
      raise ValueError(
        f'num_threads = {num_threads} and num_workers = {num_workers}: use one of them'
      )
    if not 0 <= shard_index < shard_count:
      raise ValueError(f'shard_index {shard_index} is not in [0, {shard_count})')
    if batch_size % shard_count:
      raise ValueError(f'batch_size {batch_size} does not split into {shard_count} shards')
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
    self.shard_index = shard_index
    self.shard_count = shard_count
    self._sampler = _Sampler(data=data, image_size=image_size, config=config, seed=seed)
    self._pool: futures.Executor | None = None
    if num_workers:
      self._pool = futures.ProcessPoolExecutor(
        num_workers,
        mp_context=multiprocessing.get_context('spawn'),
        initializer=_start_worker,
        initargs=(self._sampler,),
      )
    elif num_threads > 1:
      self._pool = futures.ThreadPoolExecutor(num_threads)
    self._workers = num_workers

  @property
  def shard_size(self) -> int:
    """Rows of this loader's shard of every batch (``batch_size / shard_count``)."""
    return self.batch_size // self.shard_count

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
    """:func:`load_sample` of dataset image ``index`` as drawn in ``epoch``.

    Raises:
      DatasetError: the image cannot be read.
      RuntimeError: naming the image, when building the sample failed otherwise.
    """
    return self._sampler(epoch, index)

  def batch(self, epoch: int, step: int) -> Batch:
    """This loader's shard of batch ``step`` of ``epoch``, built from scratch."""
    if epoch < 0 or not 0 <= step < self.steps_per_epoch:
      raise IndexError(f'no batch (epoch {epoch}, step {step}): {self.steps_per_epoch} per epoch')
    first = step * self.batch_size + self.shard_index * self.shard_size
    order = self.order(epoch)
    chosen = order[first : min(first + self.shard_size, (step + 1) * self.batch_size)].tolist()
    epochs = [epoch] * len(chosen)
    if self._workers:
      samples = list(self._pool.map(_sample_in_worker, epochs, chosen))
    elif self._pool is not None:
      samples = list(self._pool.map(self._sampler, epochs, chosen))
    else:
      samples = list(map(self._sampler, epochs, chosen))
    size = self.image_size
    images = np.full((self.shard_size, size, size, 3), augment.PAD_VALUE, np.uint8)
    rows = []
    for slot, (image, labels) in enumerate(samples):
      images[slot] = image
      rows.append(np.concatenate([np.full((len(labels), 1), slot, np.float32), labels], axis=1))
    labels = np.concatenate(rows, axis=0) if rows else np.zeros((0, 6), np.float32)
    try:
      packed = targets.Targets.from_yolo(
        labels, self.shard_size, self.max_boxes, num_classes=self.data.num_classes
      )
    except ValueError as error:
      names = ', '.join(str(self.data.image_paths[i]) for i in chosen)
      raise ValueError(f'batch (epoch {epoch}, step {step}) of {names}: {error}') from error
    indices = np.full(self.shard_size, -1, np.int64)
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
    """Stops the loading threads or worker processes."""
    if self._pool is not None:
      self._pool.shutdown(wait=True, cancel_futures=True)

  def __enter__(self) -> BatchLoader:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
