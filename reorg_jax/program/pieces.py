"""The pieces of a training run: its dataset, what :func:`reorg_jax.program.loop.setup` builds, its records.

Glossary: ``B`` batch size (all devices), ``S`` image side, ``C`` classes.

:func:`dataset_yaml` names the run's dataset YAML, writing the built-in
synthetic dataset into the run directory first when the configuration names
none; :func:`load_splits` loads its train and val splits and checks them
against the batch. :class:`Run` holds what :func:`reorg_jax.program.loop.setup` builds
from them (loaders, model, schedule, loss gains, the state on the devices,
the jitted step); :class:`Reports` holds where the run records itself
(tables, TensorBoard, the progress bar, checkpoints).
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

from reorg_jax.data import dataset, loader, synthetic
from reorg_jax.loss import LossConfig
from reorg_jax.models import yolo
from reorg_jax.program import config as config_lib
from reorg_jax.program import report
from reorg_jax.program.sections import RunConfig
from reorg_jax.training import checkpoint, optim
from reorg_jax.training import step as train_lib

__all__ = ['Reports', 'Run', 'dataset_yaml', 'load_splits', 'write_synthetic']


def dataset_yaml(config: RunConfig, *, workdir: Path) -> Path:
  """The dataset YAML of the run; writes the synthetic dataset first when needed.

  The synthetic dataset goes to ``<workdir>/data`` through a temporary
  directory renamed at the end, so an interrupted write is redone.
  """
  if config.data.yaml is not None:
    return Path(config.data.yaml)
  root = workdir / 'data'
  if jax.process_count() > 1:  # the first process writes, the others wait for it
    if jax.process_index() == 0:
      _write_synthetic(config, workdir=workdir)
    multihost_utils.sync_global_devices('synthetic dataset written')
  else:
    _write_synthetic(config, workdir=workdir)
  return root / 'data.yaml'


def _write_synthetic(config: RunConfig, *, workdir: Path) -> None:
  root = workdir / 'data'
  if not (root / 'data.yaml').is_file():
    spec = config.synthetic
    write_synthetic(
      root,
      num_train=spec.num_train,
      num_val=spec.num_val,
      image_size=spec.image_size,
      seed=spec.seed,
      polygons=spec.polygons,
    )


def write_synthetic(
  root: Path, *, num_train: int, num_val: int, image_size: int, seed: int, polygons: bool
) -> None:
  """The synthetic dataset at ``root``, written under ``<root>.partial`` and renamed when complete.

  Whatever ``root`` held is replaced; an interrupted write leaves only the partial folder,
  which the next write removes. Raises ``OSError`` when a write fails (the partial folder
  is then removed).
  """
  partial = root.with_name(root.name + '.partial')
  shutil.rmtree(partial, ignore_errors=True)
  try:
    synthetic.write_dataset(
      partial,
      num_train=num_train,
      num_val=num_val,
      image_size=image_size,
      seed=seed,
      polygons=polygons,
    )
  except OSError:
    shutil.rmtree(partial, ignore_errors=True)
    raise
  shutil.rmtree(root, ignore_errors=True)
  partial.rename(root)


def load_splits(
  config: RunConfig, data_path: Path
) -> tuple[dataset.YoloDataset, dataset.YoloDataset]:
  """The train and val splits, checked to fill at least one training batch."""
  strict = config.data.strict
  train_data = dataset.load_dataset(data_path, split='train', strict=strict)
  val_data = dataset.load_dataset(data_path, split='val', strict=strict)
  batch = config.train.batch_size
  if len(train_data) < batch:
    raise config_lib.ConfigError(
      f'{data_path}: the train split has {len(train_data)} images, fewer than '
      f'train.batch_size = {batch} (every batch is full); lower train.batch_size'
    )
  return train_data, val_data


@dataclasses.dataclass
class Run:
  """The pieces of a training run, built once by :func:`reorg_jax.program.loop.setup`.

  Attributes:
    config: the resolved configuration.
    train_data: the train split.
    val_data: the validation split.
    feed: training batches (the run's seed and augmentation, full batches).
    val_feed: validation batches (letterboxed, every image once).
    model: the network, with the dataset's ``C`` classes.
    schedule: epochs, batch size, steps per epoch and recipe.
    loss_config: the loss with the run's gains scaled for ``S``.
    train_setup: the static parts of the step.
    state: the initial state (``jax.random.key(seed)``), replicated on the
      devices; the first step of :func:`reorg_jax.program.loop.run` donates (deletes) it.
    state_sharding: the state's placement (:func:`reorg_jax.training.step.data_parallel`).
    batch_sharding: a batch's placement, split along ``B``.
    step_fn: the jitted step (state donated).
    total_steps: steps the run trains: all epochs, or ``train.max_steps`` if fewer.
  """

  config: RunConfig
  train_data: dataset.YoloDataset
  val_data: dataset.YoloDataset
  feed: loader.BatchLoader
  val_feed: loader.BatchLoader
  model: yolo.YOLO
  schedule: optim.Schedule
  loss_config: LossConfig
  train_setup: train_lib.TrainSetup
  state: train_lib.TrainState
  state_sharding: Any
  batch_sharding: NamedSharding
  step_fn: Callable[..., tuple[train_lib.TrainState, dict[str, jax.Array]]]
  total_steps: int

  @property
  def num_classes(self) -> int:
    """``C``."""
    return self.train_data.num_classes

  def close(self) -> None:
    """Stops the loaders' threads."""
    self.feed.close()
    self.val_feed.close()


@dataclasses.dataclass
class Reports:
  """Where a run records itself: tables, TensorBoard, the progress bar, checkpoints."""

  steps: report.Table
  epochs: report.Table
  scalars: report.Scalars
  progress: report.Progress
  ckpt: checkpoint.Checkpoints
  plots: bool
  workdir: Path

  def close(self) -> None:
    """Ends the progress bar, then closes the checkpoints and the TensorBoard writer."""
    self.progress.end_epoch()
    try:
      self.ckpt.close()
    finally:
      self.scalars.close()
