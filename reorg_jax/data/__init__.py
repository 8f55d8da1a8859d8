"""Input pipeline: reading YOLO datasets, upstream's augmentation, batches.

Modules: :mod:`~reorg_jax.data.dataset` (data YAML, images and label files,
checked), :mod:`~reorg_jax.data.augment` (upstream's augmentation settings and
per-image steps), :mod:`~reorg_jax.data.geometry` (the random warp that re-boxes
objects), :mod:`~reorg_jax.data.mosaic` (mosaics, paste_in, mixup),
:mod:`~reorg_jax.data.loader` (batches as a pure function of
``(seed, epoch, step)``, in threads or worker processes, per-process shards),
:mod:`~reorg_jax.data.prefetch` (background prefetch),
:mod:`~reorg_jax.data.synthetic` (the embedded synthetic dataset).
"""

from reorg_jax.data.augment import AugmentConfig
from reorg_jax.data.dataset import DatasetError, YoloDataset, load_dataset
from reorg_jax.data.loader import Batch, BatchLoader
from reorg_jax.data.prefetch import Prefetcher

__all__ = [
  'AugmentConfig',
  'Batch',
  'BatchLoader',
  'DatasetError',
  'Prefetcher',
  'YoloDataset',
  'load_dataset',
]
