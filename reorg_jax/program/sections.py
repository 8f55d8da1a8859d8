"""The program's configuration, resolved once into typed sections.

:func:`reorg_jax.program.config.load` merges and checks the options as one
nested mapping (what ``config.yaml`` in a run directory holds), then
:func:`resolve` turns it into a :class:`RunConfig`: one frozen dataclass per
section of ``configs/default.yaml``, the library's own configs where the
library has one (:class:`reorg_jax.training.optim.RecipeConfig`,
:class:`reorg_jax.data.augment.AugmentConfig`) and the loss gains as the
mapping :func:`reorg_jax.training.assembly.loss_config` takes. Everything
after :func:`~reorg_jax.program.config.load` reads these attributes, never
the mapping: a misspelled option is an ``AttributeError`` at the first run,
not a ``KeyError`` deep in a loop.
"""

from __future__ import annotations

import copy
import dataclasses
import types
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from reorg_jax.data import augment
from reorg_jax.training import optim

__all__ = [
  'CheckpointSection',
  'DataSection',
  'EvalSection',
  'LogSection',
  'ModelSection',
  'RunConfig',
  'SyntheticSection',
  'TrainSection',
  'resolve',
]


@dataclasses.dataclass(frozen=True)
class DataSection:
  """``data``: the dataset YAML (``None``: the synthetic dataset) and strict image reading."""

  yaml: str | None
  strict: bool


@dataclasses.dataclass(frozen=True)
class SyntheticSection:
  """``synthetic``: the built-in dataset (:func:`reorg_jax.data.synthetic.write_dataset`)."""

  num_train: int
  num_val: int
  image_size: int
  seed: int
  polygons: bool


@dataclasses.dataclass(frozen=True)
class ModelSection:
  """``model``: ``'p6_nano'`` or a model YAML, and the forward pass's dtype."""

  name: str
  compute_dtype: str

  @property
  def dtype(self) -> Any:
    """``jnp.float32`` or ``jnp.bfloat16``."""
    return jnp.bfloat16 if self.compute_dtype == 'bfloat16' else jnp.float32


@dataclasses.dataclass(frozen=True)
class TrainSection:
  """``train``: epochs, batch (all devices), image side ``S``, recomputation, the loader's workers."""

  epochs: int
  batch_size: int
  image_size: int
  max_steps: int | None
  freeze: int
  remat: str
  loader_threads: int
  loader_workers: int
  prefetch: int


@dataclasses.dataclass(frozen=True)
class EvalSection:
  """``eval``: validation batch, thresholds and detection caps."""

  batch_size: int
  score_threshold: float
  iou_threshold: float
  max_detections: int
  max_candidates: int


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
  """``checkpoint``: periodic saves and the metric of the best checkpoint."""

  save_every: int
  keep_last: int
  best_metric: str


@dataclasses.dataclass(frozen=True)
class LogSection:
  """``log``: fetch interval, progress bar, TensorBoard, plots."""

  every_steps: int
  progress: bool
  tensorboard: bool
  plots: bool


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """A run's resolved configuration.

  Attributes:
    seed: seeds the weights, the data order and the augmentations.
    data: see :class:`DataSection`.
    synthetic: see :class:`SyntheticSection`.
    model: see :class:`ModelSection`.
    train: see :class:`TrainSection`.
    recipe: the optimiser recipe.
    augment: the training augmentation, ``None`` when disabled.
    loss: the loss options (:data:`reorg_jax.program.config.LOSS_OPTIONS`: the gains
      and the speed settings, lists as tuples), read-only.
    eval: see :class:`EvalSection`.
    checkpoint: see :class:`CheckpointSection`.
    log: see :class:`LogSection`.
    options: the same values as the nested mapping, as written to a run
      directory's ``config.yaml`` and compared on ``--resume``.
  """

  seed: int
  data: DataSection
  synthetic: SyntheticSection
  model: ModelSection
  train: TrainSection
  recipe: optim.RecipeConfig
  augment: augment.AugmentConfig | None
  loss: Mapping[str, float | int | tuple[float, ...]]
  eval: EvalSection
  checkpoint: CheckpointSection
  log: LogSection
  options: dict[str, Any] = dataclasses.field(repr=False, compare=False)


def resolve(options: Mapping[str, Any]) -> RunConfig:
  """The typed sections of a merged, checked option mapping.

  Raises:
    TypeError: a section's keys differ from its dataclass's fields (the
      defaults file and these classes disagree: a bug, not bad input).
  """
  aug = dict(options['augment'])
  enabled = aug.pop('enabled')
  return RunConfig(
    seed=options['seed'],
    data=DataSection(**options['data']),
    synthetic=SyntheticSection(**options['synthetic']),
    model=ModelSection(**options['model']),
    train=TrainSection(**options['train']),
    recipe=optim.RecipeConfig(**options['recipe']),
    augment=augment.AugmentConfig(**aug) if enabled else None,
    loss=types.MappingProxyType(
      {k: tuple(v) if isinstance(v, list) else v for k, v in options['loss'].items()}
    ),
    eval=EvalSection(**options['eval']),
    checkpoint=CheckpointSection(**options['checkpoint']),
    log=LogSection(**options['log']),
    options=copy.deepcopy(dict(options)),
  )
