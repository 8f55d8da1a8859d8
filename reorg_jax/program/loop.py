"""The training run: data, model, steps, evaluation, checkpoints and reports.

Glossary: ``B`` batch size (all devices), ``S`` image side, ``g`` the
global step (batches trained so far; equals ``TrainState.step``).

:func:`setup` builds a run's pieces once (:class:`reorg_jax.program.pieces.Run`: splits,
loaders, model, schedule, loss gains, the initial state on the devices and
the jitted step); :func:`run` trains them in a run directory. The run's
position is ``g`` alone: the batch of step ``g`` is batch
``g % steps_per_epoch`` of epoch ``g // steps_per_epoch``, which
:class:`reorg_jax.data.loader.BatchLoader` builds as a pure function of
``(seed, epoch, batch)``. A checkpoint therefore holds the whole state
(weights, BatchNorm statistics, optimiser and accumulation state, EMA,
``g``), and resuming from it repeats exactly the steps an uninterrupted run
would have taken.

The host never waits for a step. Steps are dispatched one after another
(each batch is placed on the devices while the step before it runs), and
their metrics stay on the devices until they are fetched together every
``log.every_steps`` steps, at the end of each epoch, before each checkpoint
and at the end of the run. A fetch checks every fetched step in order and
raises :class:`reorg_jax.training.step.NonFiniteError` naming the first whose loss
or gradient was not finite; such a step changes nothing but the step
counter (see :func:`reorg_jax.training.step.train_step`), and since a fetch
precedes every checkpoint, nothing is saved after it.

At the end of an epoch the EMA weights are evaluated on the validation split
and the best checkpoint kept (:func:`reorg_jax.program.evaluation.end_epoch`); then the
periodic checkpoint is written. A run
killed at any point resumes from the newest complete periodic checkpoint
that verifies against its digests (a damaged newer one is skipped, said in
one line, and kept as ``<step>.damaged-<n>``).

Before anything is written, the configuration has been checked
(:func:`reorg_jax.program.config.load`), the model file parsed, and a dataset YAML's
splits loaded and sized against the batch. The run directory's rules (one
writer at a time, refusing another run's checkpoints, one-line write
failures) are :mod:`reorg_jax.program.rundir`'s.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from pathlib import Path
from typing import Any

import jax

from reorg_jax.data import dataset, fingerprint, loader, prefetch, synthetic
from reorg_jax.models import yolo
from reorg_jax.program import config as config_lib
from reorg_jax.program import evaluation, interrupts, report, rundir, weights
from reorg_jax.program.pieces import Reports, Run, dataset_yaml, load_splits
from reorg_jax.program.rundir import RunError
from reorg_jax.program.sections import RunConfig
from reorg_jax.training import assembly, checkpoint, integrity, optim
from reorg_jax.training import step as train_lib

__all__ = ['FINGERPRINT', 'Result', 'RunError', 'run', 'setup', 'start_from']

# The run directory's record of the dataset it trains on.
FINGERPRINT = 'dataset.json.gz'


@dataclasses.dataclass
class Result:
  """What :func:`run` returns.

  Attributes:
    state: the final :class:`reorg_jax.training.step.TrainState`.
    model: the network it is the state of (e.g. for
      :func:`reorg_jax.models.convert.export_state_dict`).
    steps: steps done (``g``) at the end.
    epochs: the ``results.csv`` rows (one per evaluated epoch).
    best: ``(epoch, value)`` of the best validation metric, or ``None``.
    best_metric: its name (``'map50'`` or ``'map50_95'``).
  """

  state: train_lib.TrainState
  model: yolo.YOLO
  steps: int
  epochs: list[dict[str, float]]
  best: tuple[int, float] | None
  best_metric: str


def setup(
  config: RunConfig,
  *,
  data_path: Path,
  splits: tuple[dataset.YoloDataset, dataset.YoloDataset] | None = None,
  variables: dict[str, Any] | None = None,
) -> Run:
  """Builds the pieces of the run ``config`` describes (nothing is trained or written).

  Args:
    config: the resolved configuration (:func:`reorg_jax.program.config.load`).
    data_path: the dataset YAML (:func:`reorg_jax.program.pieces.dataset_yaml`).
    splits: the splits of ``data_path`` if already loaded
      (:func:`reorg_jax.program.pieces.load_splits`).
    variables: start from these ``{'params', 'batch_stats'}`` (``--weights``)
      instead of a fresh initialisation from ``jax.random.key(seed)``.

  Raises:
    RunError: a batch size is not a multiple of the device count.
    reorg_jax.program.config.ConfigError: the train split is smaller than one batch.
  """
  tcfg, ecfg = config.train, config.eval
  devices = jax.device_count()
  for name, size in (
    ('train.batch_size', tcfg.batch_size),
    ('eval.batch_size', ecfg.batch_size),
  ):
    if size % devices:
      raise RunError(f'{name} = {size} is not a multiple of the {devices} devices')
  train_data, val_data = splits if splits is not None else load_splits(config, data_path)
  size, seed = tcfg.image_size, config.seed
  feed = loader.BatchLoader(
    train_data,
    batch_size=tcfg.batch_size,
    image_size=size,
    max_boxes=loader.max_boxes_bound(train_data, config.augment),
    seed=seed,
    config=config.augment,
    shuffle=True,
    drop_last=True,
    num_threads=tcfg.loader_threads,
    num_workers=tcfg.loader_workers,
    shard_index=jax.process_index(),  # each process loads only its rows of every batch
    shard_count=jax.process_count(),
  )
  val_feed = loader.BatchLoader(
    val_data,
    batch_size=ecfg.batch_size,
    image_size=size,
    max_boxes=loader.max_boxes_bound(val_data, None),
    seed=seed,
    config=None,
    shuffle=False,
    drop_last=False,
    num_threads=tcfg.loader_threads,
  )
  model = config_lib.build_model(config.model.name, num_classes=train_data.num_classes)
  schedule = optim.Schedule(
    epochs=tcfg.epochs,
    batch_size=tcfg.batch_size,
    steps_per_epoch=feed.steps_per_epoch,
    recipe=config.recipe,
  )
  pieces = assembly.assemble(
    model,
    image_size=size,
    schedule=schedule,
    gains=config.loss,
    rng=jax.random.key(seed),
    compute_dtype=config.model.dtype,
    variables=variables,
    frozen_layers=tcfg.freeze,
    remat=yolo.Remat(tcfg.remat),
  )
  _, state_sharding, batch_sharding = train_lib.data_parallel(pieces.state)
  train_lib.process_shard(batch_sharding)  # the feed's row blocks match the devices
  total = schedule.total_steps
  if tcfg.max_steps is not None:
    total = min(total, tcfg.max_steps)
  return Run(
    config=config,
    train_data=train_data,
    val_data=val_data,
    feed=feed,
    val_feed=val_feed,
    model=model,
    schedule=schedule,
    loss_config=pieces.loss_config,
    train_setup=pieces.setup,
    state=train_lib.place(pieces.state, state_sharding),
    state_sharding=state_sharding,
    batch_sharding=batch_sharding,
    step_fn=pieces.jit_step(state_sharding=state_sharding),
    total_steps=total,
  )


def run(
  config: RunConfig,
  *,
  workdir: str | Path,
  resume: bool,
  start: weights.Weights | None = None,
  allow_partial: bool = False,
  accept_changed_data: bool = False,
) -> Result:
  """Trains as ``config`` says, writing everything under ``workdir``.

  Args:
    config: the resolved configuration (:func:`reorg_jax.program.config.load`).
    workdir: the run directory (created if missing).
    resume: continue from the newest checkpoint in ``workdir`` that verifies
      (a ``workdir`` without a complete checkpoint is an error); without it, a
      ``workdir`` holding checkpoints is an error.
    start: weights to start from (``--weights``), transferred by name and
      shape (:func:`reorg_jax.program.weights.transfer`) before anything is
      written; ``None``: a fresh initialisation from ``jax.random.key(seed)``.
    allow_partial: go on when fewer than
      :data:`~reorg_jax.program.weights.PARTIAL_SHARE` of the model's tensors transfer.
    accept_changed_data: resume although the dataset differs from the
      fingerprint the run recorded (:mod:`reorg_jax.data.fingerprint`).

  Raises:
    reorg_jax.program.weights.WeightsError: ``start`` transfers nothing, or
      too little without ``allow_partial``.
    reorg_jax.training.step.NonFiniteError: a step's loss or gradient was not
      finite (nothing from that step is saved).
    reorg_jax.data.dataset.DatasetError: malformed dataset (file and line named),
      or, on resume, a dataset that changed since the run recorded it.
    reorg_jax.program.config.ConfigError: unusable options, model file or dataset size
      (raised before anything is written).
    reorg_jax.program.rundir.WorkdirError: ``workdir`` is not a folder, or
      ``resume`` finds no complete checkpoint in it (nothing written).
    reorg_jax.program.interrupts.Interrupted: SIGINT or SIGTERM (the writes in
      flight waited for; its ``detail`` says where the run stopped).
    RunError: the run directory is in use by another run, holds another run,
      cannot be written (disk full, read-only), or all its checkpoints are
      damaged.
  """
  workdir = Path(workdir)
  rundir.check_workdir_path(workdir, resume=resume)
  splits = None
  if config.data.yaml is not None:  # read-only checks before anything is written
    splits = load_splits(config, Path(config.data.yaml))
  num_classes = len(synthetic.CLASS_NAMES) if splits is None else splits[0].num_classes
  model = config_lib.build_model(config.model.name, num_classes=num_classes)
  if config.train.freeze > len(model.specs):
    raise config_lib.ConfigError(
      f'train.freeze = {config.train.freeze} (--freeze) exceeds the {len(model.specs)} layers '
      f'of {config.model.name}'
    )
  variables, notes = None, ()
  if start is not None:
    variables, notes = start_from(
      start,
      model,
      image_size=config.train.image_size,
      seed=config.seed,
      allow_partial=allow_partial,
    )
  position = _Position()

  def describe() -> str:
    """Where an interrupted run stands, for the line it ends with."""
    if position.step is None:
      done = 'before training'
    else:
      done = f'after {position.step} of {position.total} steps'
    return f'{done}; {rundir.resume_hint(workdir)}'

  def settle() -> None:
    if position.checkpoints is not None:
      position.checkpoints.wait()

  temporaries = (workdir / 'checkpoints' / 'steps', workdir / 'checkpoints' / 'best')
  try:
    with interrupts.on_stop(
      describe=describe,
      settle=settle,
      temporaries=temporaries,
      deferred=True,
    ):
      workdir.mkdir(parents=True, exist_ok=True)
      with rundir.RunLock(rundir.lock_path(workdir)):
        rundir.check_workdir(workdir, config.options, resume=resume)
        data_path = dataset_yaml(config, workdir=workdir)  # writes the synthetic data once
        if splits is None:
          splits = load_splits(config, data_path)
        dataset_notes = _check_dataset(
          workdir, data_path, splits, resume=resume, accept_changed=accept_changed_data
        )
        if jax.process_index() == 0:
          for name, split in zip(('train', 'val'), splits, strict=True):
            print(split.counts.line(name) if split.counts else f'{name}: {len(split)} images')
          for note in dataset_notes:
            print(note)
          config_lib.dump(config.options, workdir / 'config.yaml')
          fingerprint.write(_fingerprint_of(splits), workdir / FINGERPRINT)
        pieces = setup(config, data_path=data_path, splits=splits, variables=variables)
        try:
          return _train(pieces, workdir=workdir, resume=resume, notes=notes, position=position)
        finally:
          pieces.close()
  except OSError as error:
    raise rundir.write_failure(error, workdir) from None
  except interrupts.Interrupted as stop:  # the writes in flight have been waited for
    cut = interrupts.remove_temporaries(temporaries)
    stop.detail = describe() + ('; a checkpoint write cut short was removed' if cut else '')
    raise


def _fingerprint_of(
  splits: tuple[dataset.YoloDataset, dataset.YoloDataset],
) -> fingerprint.Fingerprint:
  return fingerprint.of_splits(dict(zip(('train', 'val'), splits, strict=True)))


def _check_dataset(
  workdir: Path,
  data_path: Path,
  splits: tuple[dataset.YoloDataset, dataset.YoloDataset],
  *,
  resume: bool,
  accept_changed: bool,
) -> tuple[str, ...]:
  """On resume, compares the dataset with the fingerprint the run recorded; the notes to print.

  Raises:
    reorg_jax.data.dataset.DatasetError: the dataset changed and not ``accept_changed``.
  """
  path = workdir / FINGERPRINT
  if not resume:
    return ()
  if not path.is_file():
    return (f'the run directory had no dataset fingerprint ({FINGERPRINT}): recording it now',)
  try:
    before = fingerprint.read(path)
  except ValueError as error:
    return (f'{error}: recording it anew',)
  changes = fingerprint.compare(before, _fingerprint_of(splits))
  if not changes:
    return ()
  what = fingerprint.describe(changes)
  if not accept_changed:
    raise dataset.DatasetError(
      f'{data_path}: the dataset changed since this run last started ({what}); '
      'pass --accept-changed-data to resume on it as it is now'
    )
  return (f'the dataset changed since this run last started ({what}): going on with it',)


@dataclasses.dataclass
class _Position:
  """How far a run has come, for an interruption's line.

  Attributes:
    step: steps done or dispatched (``None`` before training starts).
    total: steps of the run (``None`` before training starts).
    checkpoints: the run's checkpoints, whose writes a stop waits for.
  """

  step: int | None = None
  total: int | None = None
  checkpoints: checkpoint.Checkpoints | None = None


@dataclasses.dataclass
class _Pending:
  """Steps dispatched whose metrics are still on the devices.

  Attributes:
    steps: ``(g, epoch, learning rate of the decay group)`` of each.
    metrics: their metrics, unfetched.
  """

  steps: list[tuple[int, int, float]] = dataclasses.field(default_factory=list)
  metrics: list[dict[str, jax.Array]] = dataclasses.field(default_factory=list)

  def fetch(self, reports: Reports) -> dict[str, float]:
    """One transfer of every pending step's metrics: checked in order, then recorded.

    Returns the last step's values. Raises
    :class:`reorg_jax.training.step.NonFiniteError` at the first non-finite step
    (the steps before it are recorded).
    """
    fetched = jax.device_get(self.metrics)
    rows = []
    try:
      for (g, epoch, lr), metrics in zip(self.steps, fetched, strict=True):
        train_lib.check_finite(metrics, step=g)
        values = {k: float(metrics[name]) for k, name in report.LOSS_COLUMNS.items()}
        values.update({k: float(metrics[k]) for k in report.ASSIGNMENT_COLUMNS})
        values['lr'] = lr
        rows.append({'step': g, 'epoch': epoch, **values})
        reports.scalars.add(values, step=g, prefix='train')
    finally:
      reports.steps.extend(rows)
      self.steps.clear()
      self.metrics.clear()
    return rows[-1]


def start_from(
  start: weights.Weights, model: yolo.YOLO, *, image_size: int, seed: int, allow_partial: bool
) -> tuple[dict[str, Any], tuple[str, ...]]:
  """The variables ``--weights`` gives ``model`` and the lines that say what was taken.

  The tensors of ``start`` that fit ``model`` by name and shape are transferred
  (upstream's intersect_dicts); the others keep a fresh initialisation from ``seed``.

  Args:
    start: the weights read from ``--weights`` (:func:`reorg_jax.program.weights.read`).
    model: the network to start.
    image_size: the input side ``S`` in pixels the fresh variables are initialised at.
    seed: the seed of the fresh initialisation (the tensors that do not transfer).
    allow_partial: go on when fewer than
      :data:`~reorg_jax.program.weights.PARTIAL_SHARE` of the model's tensors transfer.

  Returns:
    ``(variables, lines)``: the model's variables (``params`` and ``batch_stats``) with
    the transferred tensors, and the lines that say what was taken and what was not.

  Raises:
    reorg_jax.program.weights.WeightsError: nothing transferred, or less than
      :data:`~reorg_jax.program.weights.PARTIAL_SHARE` without ``allow_partial``.
  """
  # What transfers depends on names and shapes only: checked before initialising the model.
  moved = weights.transfer(start, model, assembly.zero_variables(model))
  share = len(moved.transferred) / moved.total
  if not moved.transferred or (share < weights.PARTIAL_SHARE and not allow_partial):
    first = '; '.join(f'{key} ({why})' for key, why in moved.skipped[:3])
    unused = f"; the file's own tensors begin {', '.join(moved.unused[:3])}" if moved.unused else ''
    advice = 'pass --allow-partial to go on' if moved.transferred else 'another architecture?'
    raise weights.WeightsError(
      f'--weights {start.path}: only {len(moved.transferred)}/{moved.total} tensors fit the '
      f'model (first differences: {first}{unused}); {advice}'
    )
  fresh = assembly.initial_variables(model, image_size=image_size, rng=jax.random.key(seed))
  moved = weights.transfer(start, model, fresh)
  return moved.variables, tuple(moved.lines(start))


def _train(
  pieces: Run, *, workdir: Path, resume: bool, notes: tuple[str, ...], position: _Position
) -> Result:
  """:func:`run` once the run directory is locked and checked; keeps ``position`` current."""
  config = pieces.config
  is_main_process = jax.process_index() == 0  # the process that writes and prints
  tcfg, ccfg, lcfg = config.train, config.checkpoint, config.log
  state, total, spe = pieces.state, pieces.total_steps, pieces.feed.steps_per_epoch
  ckpt = checkpoint.Checkpoints(
    workdir / 'checkpoints', save_every=ccfg.save_every, keep_last=ccfg.keep_last
  )
  start = 0
  skipped: tuple[str, ...] = ()
  if resume:
    try:
      restored = ckpt.restore_latest(like=state)
    except integrity.CheckpointError as error:
      ckpt.close()
      raise RunError(f'cannot resume: {error}') from None
    if restored is not None:
      state, start, skipped = restored.state, int(restored.state.step), restored.skipped
  position.step, position.total, position.checkpoints = start, total, ckpt

  reports = Reports(
    steps=report.Table(
      workdir / 'steps.csv',
      columns=report.STEP_COLUMNS,
      keep_below=start,
      key='step',
      writable=is_main_process,
    ),
    epochs=report.Table(
      workdir / 'results.csv',
      columns=report.EPOCH_COLUMNS,
      keep_below=start + 1,
      key='step',
      writable=is_main_process,
    ),
    scalars=report.Scalars(
      workdir / 'tensorboard' if lcfg.tensorboard and is_main_process else None,
      purge_step=start if resume else None,
    ),
    progress=report.Progress(
      enabled=lcfg.progress,
      total_steps=total,
      batch_size=tcfg.batch_size,
      silent=not is_main_process,
    ),
    ckpt=ckpt,
    plots=lcfg.plots and is_main_process,
    workdir=workdir,
  )
  progress = reports.progress
  if is_main_process:
    if skipped:
      progress.write(
        f'resuming from step {start}, skipping damaged checkpoints: ' + '; '.join(skipped)
      )
    progress.write(
      f'training {config.model.name} ({pieces.num_classes} classes) on '
      f'{len(pieces.train_data)} images ({spe} steps of {tcfg.batch_size} per epoch), '
      f'validating on {len(pieces.val_data)}; {jax.device_count()} '
      f'{jax.devices()[0].platform} device(s); run directory {workdir}'
      + (f'; resumed at step {start}' if start else '')
    )
    for note in (*notes, *loader.augment_notes(pieces.train_data, config.augment)):
      progress.write(note)

  g = start
  pending = _Pending()
  rate = 0.0
  meta = {'seed': config.seed}
  try:
    while g < total:
      epoch, first = divmod(g, spe)
      last = min(spe, total - epoch * spe)
      progress.start_epoch(epoch=epoch, epochs=pieces.schedule.epochs, steps=last, done=first)
      epoch_started = time.perf_counter()
      batches = itertools.islice(pieces.feed.epoch(epoch, start_step=first), last - first)
      with prefetch.Prefetcher(batches, buffer_size=tcfg.prefetch) as prefetched:
        tick, ticked = time.perf_counter(), g
        for batch in prefetched:
          hparams = optim.hyperparams(g, schedule=pieces.schedule)
          sharded = train_lib.shard_batch(
            {'images': batch.images, 'targets': batch.targets, 'hparams': hparams},
            pieces.batch_sharding,
          )
          state, metrics = pieces.step_fn(state, sharded)  # dispatched; the host goes on
          pending.steps.append((g, epoch, float(hparams.lrs[optim.DECAY])))
          pending.metrics.append(metrics)
          g += 1
          position.step = g
          interrupts.check()  # a signal stops the run here, between two steps
          epoch_done = g % spe == 0
          if not (
            len(pending.steps) >= lcfg.every_steps or epoch_done or g == total or ckpt.is_due(g)
          ):
            continue
          values = pending.fetch(reports)
          now = time.perf_counter()
          if ticked > start:  # the first step of a process includes compilation
            seen = (g - ticked) * tcfg.batch_size / (now - tick)
            rate = seen if rate == 0 else 0.5 * rate + 0.5 * seen
          progress.update(metrics=values, images_per_s=rate, step=g, steps=g - ticked)
          tick, ticked = now, g
          if epoch_done:
            progress.end_epoch()
            evaluation.end_epoch(
              pieces,
              state,
              reports,
              epoch=epoch,
              g=g,
              lr=values['lr'],
              seconds=time.perf_counter() - epoch_started,
            )
          if not ckpt.save(g, state, metadata={'epoch': epoch, **meta}) and g == total:
            ckpt.save(g, state, metadata={'epoch': epoch, **meta}, force=True)
      progress.end_epoch()
    if start == total and ckpt.latest_step != total:
      ckpt.save(total, state, metadata={'epoch': (total - 1) // spe, **meta}, force=True)
  finally:
    reports.close()  # waits for the checkpoint writes in flight

  metric_name = ccfg.best_metric
  best = evaluation.best_epoch(reports.epochs.rows, metric_name)
  if is_main_process:
    if best is None:
      line = f'done: {g} steps; no epoch was evaluated'
    else:
      line = (
        f'done: {g} steps; best {evaluation.METRIC_LABELS[metric_name]} {best[1]:.4f} at epoch '
        f'{best[0] + 1} (best checkpoint in {workdir / "checkpoints" / "best"})'
      )
    print(line, flush=True)
  return Result(
    state=state,
    model=pieces.model,
    steps=g,
    epochs=list(reports.epochs.rows),
    best=best,
    best_metric=metric_name,
  )
