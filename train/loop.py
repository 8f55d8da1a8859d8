"""The training run: data, model, steps, evaluation, checkpoints and reports.

Glossary: ``B`` batch size (all devices), ``S`` image side, ``g`` the
global step (batches trained so far; equals ``TrainState.step``).

:func:`run` trains from a configuration (see ``train/configs/default.yaml``)
in a run directory. The run's position is ``g`` alone: the batch of step
``g`` is batch ``g % steps_per_epoch`` of epoch ``g // steps_per_epoch``,
which :class:`reorg_jax.loader.BatchLoader` builds as a pure function of
``(seed, epoch, batch)``. A checkpoint therefore holds the whole state
(weights, BatchNorm statistics, optimiser and accumulation state, EMA,
``g``), and resuming from it repeats exactly the steps an uninterrupted run
would have taken.

Order within a step: train, check the loss is finite (raising
:class:`reorg_jax.train.NonFiniteError` before anything is saved), log, at
the end of an epoch evaluate the EMA weights on the validation split and
keep the best checkpoint, then write the periodic checkpoint. A run killed
at any point resumes from the newest complete periodic checkpoint that
verifies against its digests (a damaged newer one is skipped, said in one
line, and kept as ``<step>.damaged-<n>``).

Before anything is written, the configuration has been checked
(:func:`train.config.load`), the model file parsed, and a dataset YAML's
splits loaded and sized against the batch. One process at a time writes a
run directory: :class:`RunLock` holds ``run.lock`` there for the run's life,
and a second run exits at once naming the holder's pid. A failed write
(disk full, read-only directory) ends the run with one :class:`RunError`
line naming the path and the newest complete checkpoint; the tables and
``config.yaml`` are replaced atomically and a cut-short checkpoint is never
read, so the run resumes from that checkpoint once there is room.
"""

from __future__ import annotations

import dataclasses
import fcntl
import itertools
import os
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import reorg_jax
from reorg_jax import checkpoint, dataset, evaluate, loader, optim, synthetic, yolo
from reorg_jax import train as train_lib
from reorg_jax.inference import predict
from train import config as config_lib
from train import report

METRIC_LABELS = {'map50': 'mAP@0.5', 'map50_95': 'mAP@0.5:0.95'}


class RunError(RuntimeError):
  """The run directory or devices do not fit the requested run."""


@dataclasses.dataclass
class Result:
  """What :func:`run` returns.

  Attributes:
    state: the final :class:`reorg_jax.train.TrainState`.
    steps: steps done (``g``) at the end.
    epochs: the ``results.csv`` rows (one per evaluated epoch).
    best: ``(epoch, value)`` of the best validation metric, or ``None``.
    best_metric: its name (``'map50'`` or ``'map50_95'``).
  """

  state: train_lib.TrainState
  steps: int
  epochs: list[dict[str, float]]
  best: tuple[int, float] | None
  best_metric: str


def dataset_yaml(config: dict[str, Any], *, workdir: Path) -> Path:
  """The dataset YAML of the run; writes the synthetic dataset first when needed.

  The synthetic dataset goes to ``<workdir>/data`` through a temporary
  directory renamed at the end, so an interrupted write is redone.
  """
  if config['data']['yaml'] is not None:
    return Path(config['data']['yaml'])
  root = workdir / 'data'
  if not (root / 'data.yaml').is_file():
    partial = workdir / 'data.partial'
    shutil.rmtree(partial, ignore_errors=True)
    spec = config['synthetic']
    synthetic.write_dataset(
      partial,
      num_train=spec['num_train'],
      num_val=spec['num_val'],
      image_size=spec['image_size'],
      seed=spec['seed'],
      polygons=spec['polygons'],
    )
    shutil.rmtree(root, ignore_errors=True)
    partial.rename(root)
  return root / 'data.yaml'


def evaluate_split(
  model: yolo.YOLO,
  variables: dict[str, Any],
  feed: loader.BatchLoader,
  *,
  batch_sharding: Any,
  num_classes: int,
  score_threshold: float,
  iou_threshold: float,
  max_detections: int,
  max_candidates: int,
) -> dict[str, float]:
  """COCO metrics of ``variables`` on every image of ``feed`` (see :mod:`reorg_jax.evaluate`).

  ``feed`` yields letterboxed ``[B, S, S, 3]`` batches; boxes are scored in
  that frame.
  """
  scorer = evaluate.DetectionEvaluator(num_classes=num_classes, max_detections=max_detections)
  size = feed.image_size
  with loader.Prefetcher(feed.epoch(0), buffer_size=2) as batches:
    for batch in batches:
      images = jax.device_put(batch.images, batch_sharding)
      detections = predict(
        model,
        variables,
        images.astype(jnp.float32) / 255.0,
        max_detections=max_detections,
        max_candidates=max_candidates,
        score_threshold=score_threshold,
        iou_threshold=iou_threshold,
      )
      detections = jax.device_get(detections)
      scorer.add_batch(
        boxes=detections.boxes,
        scores=detections.scores,
        classes=detections.classes,
        valid=detections.valid,
        targets=batch.targets,
        image_hw=(size, size),
        real=batch.real,
      )
  return scorer.compute()


def _epoch_means(rows: list[dict[str, float]], epoch: int) -> dict[str, float]:
  chosen = [r for r in rows if r['epoch'] == epoch]
  return {k: float(np.mean([r[k] for r in chosen])) for k in ('loss', 'box', 'obj', 'cls')}


def _check_workdir(workdir: Path, current: dict[str, Any], *, resume: bool) -> None:
  saved_path = workdir / 'config.yaml'
  has_run = (workdir / 'checkpoints').is_dir() and any((workdir / 'checkpoints').iterdir())
  if not resume and has_run:
    raise RunError(
      f'{workdir} already holds the checkpoints of a run: pass --resume to continue it, '
      'or choose another --workdir'
    )
  if resume and saved_path.is_file():
    conflicts = config_lib.resume_conflicts(config_lib.read_yaml(saved_path), current)
    if conflicts:
      raise RunError('cannot resume with options that change the run: ' + '; '.join(conflicts))


class RunLock:
  """An advisory lock (``fcntl.flock``) on a file in the run directory.

  The holder writes its pid into the file; a second holder fails at once
  with :class:`RunError` naming that pid. The lock ends with the process
  (even on ``kill -9``); the file stays.

  Args:
    path: the lock file (created if missing).
  """

  def __init__(self, path: str | os.PathLike):
    self.path = Path(path)
    self._fd: int | None = None

  def __enter__(self) -> RunLock:
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 32, 0).decode(errors='replace').strip() or 'unknown'
      os.close(fd)
      raise RunError(
        f'{self.path.parent} is in use by another run (pid {holder}, holding {self.path}); '
        'wait for it to end or choose another --workdir'
      ) from None
    except BaseException:
      os.close(fd)
      raise
    try:
      os.ftruncate(fd, 0)
      os.pwrite(fd, f'{os.getpid()}\n'.encode(), 0)
    except BaseException:
      os.close(fd)  # closing releases the lock
      raise
    self._fd = fd
    return self

  def __exit__(self, *exc_info: object) -> None:
    if self._fd is not None:
      os.close(self._fd)
      self._fd = None


def lock_path(workdir: Path) -> Path:
  """This process's lock file in ``workdir`` (one per process of a multi-process run)."""
  if jax.process_count() == 1:
    return workdir / 'run.lock'
  return workdir / f'run.{jax.process_index()}.lock'


def _newest_complete(workdir: Path) -> str:
  """The newest periodic checkpoint with its commit marker, in words (no orbax involved)."""
  steps = workdir / 'checkpoints' / 'steps'
  marker = checkpoint.ocp.path.atomicity.COMMIT_SUCCESS_FILE
  done = sorted(int(p.name) for p in steps.glob('*') if p.name.isdigit() and (p / marker).exists())
  return f'step {done[-1]} in {steps}' if done else 'none yet'


def _write_failure(error: OSError, workdir: Path) -> RunError:
  """One line for a failed write: the path, the reason and the checkpoint to resume from."""
  if isinstance(error, checkpoint.CheckpointWriteError):
    return RunError(f'{error.strerror or error}; resume with --resume once the disk has room')
  path = error.filename or workdir
  reason = error.strerror or str(error)
  return RunError(
    f'cannot write {path}: {reason}; newest complete checkpoint: {_newest_complete(workdir)} '
    '(--resume continues from it)'
  )


def _load_splits(
  config: dict[str, Any], data_path: Path
) -> tuple[dataset.YoloDataset, dataset.YoloDataset]:
  """The train and val splits, checked to fill at least one training batch."""
  strict = config['data']['strict']
  train_data = dataset.load_dataset(data_path, split='train', strict=strict)
  val_data = dataset.load_dataset(data_path, split='val', strict=strict)
  batch = config['train']['batch_size']
  if len(train_data) < batch:
    raise config_lib.ConfigError(
      f'{data_path}: the train split has {len(train_data)} images, fewer than '
      f'train.batch_size = {batch} (every batch is full); lower train.batch_size'
    )
  return train_data, val_data


def run(config: dict[str, Any], *, workdir: str | Path, resume: bool) -> Result:
  """Trains as ``config`` says, writing everything under ``workdir``.

  Args:
    config: the resolved configuration (:func:`train.config.load`).
    workdir: the run directory (created if missing).
    resume: continue from the newest checkpoint in ``workdir`` that verifies
      (a fresh start when there is none); without it, a ``workdir`` holding
      checkpoints is an error.

  Raises:
    reorg_jax.train.NonFiniteError: a step's loss or gradient was not
      finite (nothing from that step is saved).
    reorg_jax.dataset.YoloDatasetError: malformed dataset (file and line named).
    train.config.ConfigError: unusable options, model file or dataset size
      (raised before anything is written).
    RunError: the run directory is in use by another run, holds another run,
      cannot be written (disk full, read-only), or all its checkpoints are
      damaged.
  """
  workdir = Path(workdir)
  splits = None
  if config['data']['yaml'] is not None:  # read-only checks before anything is written
    splits = _load_splits(config, Path(config['data']['yaml']))
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    with RunLock(lock_path(workdir)):
      return _run_locked(config, workdir=workdir, resume=resume, splits=splits)
  except OSError as error:
    raise _write_failure(error, workdir) from None


def _run_locked(
  config: dict[str, Any],
  *,
  workdir: Path,
  resume: bool,
  splits: tuple[dataset.YoloDataset, dataset.YoloDataset] | None,
) -> Result:
  """:func:`run` once the run directory is locked."""
  _check_workdir(workdir, config, resume=resume)
  config_lib.dump(config, workdir / 'config.yaml')
  lead = jax.process_index() == 0
  tcfg, ecfg, ccfg, lcfg = config['train'], config['eval'], config['checkpoint'], config['log']

  devices = jax.device_count()
  for name, size in (
    ('train.batch_size', tcfg['batch_size']),
    ('eval.batch_size', ecfg['batch_size']),
  ):
    if size % devices:
      raise RunError(f'{name} = {size} is not a multiple of the {devices} devices')

  if splits is None:
    splits = _load_splits(config, dataset_yaml(config, workdir=workdir))
  train_data, val_data = splits
  num_classes = train_data.num_classes

  aug = config_lib.augmentation(config)
  size, seed = tcfg['image_size'], config['seed']
  feed = loader.BatchLoader(
    train_data,
    batch_size=tcfg['batch_size'],
    image_size=size,
    max_boxes=loader.max_boxes_bound(train_data, aug),
    seed=seed,
    config=aug,
    shuffle=True,
    drop_last=True,
    num_threads=tcfg['loader_threads'],
  )
  val_feed = loader.BatchLoader(
    val_data,
    batch_size=ecfg['batch_size'],
    image_size=size,
    max_boxes=loader.max_boxes_bound(val_data, None),
    seed=seed,
    config=None,
    shuffle=False,
    drop_last=False,
    num_threads=tcfg['loader_threads'],
  )

  model = config_lib.build_model(config, num_classes=num_classes)
  schedule = optim.Schedule(
    epochs=tcfg['epochs'],
    batch_size=tcfg['batch_size'],
    steps_per_epoch=feed.steps_per_epoch,
    recipe=config_lib.recipe(config),
  )
  loss_config = optim.scaled_loss_gains(
    reorg_jax.LossConfig(
      num_classes=num_classes,
      anchors=model.anchors,
      strides=model.strides,
      balance=reorg_jax.config.upstream_balance(len(model.strides)),
      **config['loss'],
    ),
    image_size=size,
  )
  dtype = jnp.bfloat16 if config['model']['compute_dtype'] == 'bfloat16' else jnp.float32
  setup, state = train_lib.create_train_state(
    model,
    rng=jax.random.key(seed),
    image_size=size,
    schedule=schedule,
    loss_config=loss_config,
    compute_dtype=dtype,
  )
  _, state_sharding, batch_sharding = train_lib.data_parallel(state)
  state = jax.device_put(state, state_sharding)
  step_fn = train_lib.jit_train_step(setup, state_sharding=state_sharding)

  spe = feed.steps_per_epoch
  total = schedule.total_steps
  if tcfg['max_steps'] is not None:
    total = min(total, tcfg['max_steps'])
  metric_name = ccfg['best_metric']

  ckpt = checkpoint.Checkpoints(
    workdir / 'checkpoints', save_every=ccfg['save_every'], keep_last=ccfg['keep_last']
  )
  start = 0
  skipped: tuple[str, ...] = ()
  if resume:
    try:
      restored = ckpt.restore_latest(like=state)
    except checkpoint.CheckpointError as error:
      for opened in (ckpt, feed, val_feed):
        opened.close()
      raise RunError(f'cannot resume: {error}') from None
    if restored is not None:
      state, start, skipped = restored.state, int(restored.state.step), restored.skipped

  step_table = report.Table(
    workdir / 'steps.csv', columns=report.STEP_COLUMNS, keep_below=start, key='step'
  )
  epoch_table = report.Table(
    workdir / 'results.csv', columns=report.EPOCH_COLUMNS, keep_below=start + 1, key='step'
  )
  scalars = report.Scalars(
    workdir / 'tensorboard' if lcfg['tensorboard'] and lead else None,
    purge_step=start if resume else None,
  )
  progress = report.Progress(
    enabled=lcfg['progress'] and lead, total_steps=total, batch_size=tcfg['batch_size']
  )
  if lead and skipped:
    progress.write(
      f'resuming from step {start}, skipping damaged checkpoints: ' + '; '.join(skipped)
    )
  if lead:
    progress.write(
      f'training {config["model"]["name"]} ({num_classes} classes) on {len(train_data)} images '
      f'({spe} steps of {tcfg["batch_size"]} per epoch), validating on {len(val_data)}; '
      f'{devices} {jax.devices()[0].platform} device(s); run directory {workdir}'
      + (f'; resumed at step {start}' if start else '')
    )
    for note in loader.augment_notes(train_data, aug):
      progress.write(note)

  g = start
  rate = 0.0
  try:
    while g < total:
      epoch, first = divmod(g, spe)
      last = min(spe, total - epoch * spe)
      progress.start_epoch(epoch=epoch, epochs=schedule.epochs, steps=last, done=first)
      epoch_started = time.perf_counter()
      batches = itertools.islice(feed.epoch(epoch, start_step=first), last - first)
      with loader.Prefetcher(batches, buffer_size=tcfg['prefetch']) as prefetched:
        tick = time.perf_counter()
        for batch in prefetched:
          hparams = optim.hyperparams(g, schedule=schedule)
          sharded = train_lib.shard_batch(
            {'images': batch.images, 'targets': batch.targets, 'hparams': hparams}, batch_sharding
          )
          state, metrics = step_fn(state, sharded)
          metrics = jax.device_get(metrics)
          train_lib.check_finite(metrics, step=g)
          g += 1
          now = time.perf_counter()
          if g > start + 1:  # The first step of a process includes compilation.
            seen = tcfg['batch_size'] / (now - tick)
            rate = seen if rate == 0 else 0.9 * rate + 0.1 * seen
          tick = now
          values = {
            'loss': float(metrics['total']),
            'box': float(metrics['box']),
            'obj': float(metrics['obj']),
            'cls': float(metrics['cls']),
            'lr': float(hparams.lrs[optim.DECAY]),
          }
          step_table.append({'step': g - 1, 'epoch': epoch, **values})
          scalars.add(values, step=g - 1, prefix='train')
          progress.update(metrics=values, images_per_s=rate, step=g)
          if g % spe == 0:
            progress.end_epoch()
            _end_epoch(
              epoch=epoch,
              g=g,
              state=state,
              model=model,
              val_feed=val_feed,
              batch_sharding=batch_sharding,
              num_classes=num_classes,
              ecfg=ecfg,
              step_rows=step_table.rows,
              epoch_table=epoch_table,
              scalars=scalars,
              progress=progress,
              ckpt=ckpt,
              metric_name=metric_name,
              lr=values['lr'],
              seconds=time.perf_counter() - epoch_started,
              epochs=schedule.epochs,
              plots=lcfg['plots'] and lead,
              workdir=workdir,
            )
          meta = {'epoch': epoch, 'seed': seed}
          if not ckpt.save(g, state, metadata=meta) and g == total:
            ckpt.save(g, state, metadata=meta, force=True)
      progress.end_epoch()
    if start == total and ckpt.latest_step != total:
      ckpt.save(total, state, metadata={'epoch': (total - 1) // spe, 'seed': seed}, force=True)
  finally:
    progress.end_epoch()
    ckpt.close()
    scalars.close()
    feed.close()
    val_feed.close()

  best = _best(epoch_table.rows, metric_name)
  if lead:
    if best is None:
      line = f'done: {g} steps; no epoch was evaluated'
    else:
      line = (
        f'done: {g} steps; best {METRIC_LABELS[metric_name]} {best[1]:.4f} at epoch '
        f'{best[0] + 1} (best checkpoint in {workdir / "checkpoints" / "best"})'
      )
    print(line, flush=True)
  return Result(
    state=state, steps=g, epochs=list(epoch_table.rows), best=best, best_metric=metric_name
  )


def _best(rows: list[dict[str, float]], metric: str) -> tuple[int, float] | None:
  scored = [(r[metric], -r['epoch']) for r in rows if np.isfinite(r[metric])]
  if not scored:
    return None
  value, negative_epoch = max(scored)
  return int(-negative_epoch), float(value)


def _end_epoch(
  *,
  epoch: int,
  g: int,
  state: train_lib.TrainState,
  model: yolo.YOLO,
  val_feed: loader.BatchLoader,
  batch_sharding: Any,
  num_classes: int,
  ecfg: dict[str, Any],
  step_rows: list[dict[str, float]],
  epoch_table: report.Table,
  scalars: report.Scalars,
  progress: report.Progress,
  ckpt: checkpoint.Checkpoints,
  metric_name: str,
  lr: float,
  seconds: float,
  epochs: int,
  plots: bool,
  workdir: Path,
) -> None:
  """Validates the EMA weights, writes the epoch's row, plots and best checkpoint."""
  started = time.perf_counter()
  metrics = evaluate_split(
    model,
    state.variables(use_ema=True),
    val_feed,
    batch_sharding=batch_sharding,
    num_classes=num_classes,
    score_threshold=ecfg['score_threshold'],
    iou_threshold=ecfg['iou_threshold'],
    max_detections=ecfg['max_detections'],
    max_candidates=ecfg['max_candidates'],
  )
  eval_seconds = time.perf_counter() - started
  losses = _epoch_means(step_rows, epoch)
  row = {
    'epoch': epoch,
    'step': g,
    **losses,
    'precision': metrics['precision'],
    'recall': metrics['recall'],
    'map50': metrics['map50'],
    'map50_95': metrics['map50_95'],
    'lr': lr,
    'seconds': seconds,
  }
  epoch_table.append(row)
  scalars.add(
    {k: row[k] for k in ('precision', 'recall', 'map50', 'map50_95')}, step=g, prefix='val'
  )
  scalars.add(losses, step=g, prefix='epoch')
  if plots:
    report.plot_epochs(epoch_table.rows, workdir)
  progress.write(
    f'epoch {epoch + 1}/{epochs}: loss {losses["loss"]:.4f} (box {losses["box"]:.4f} '
    f'obj {losses["obj"]:.4f} cls {losses["cls"]:.4f})  P {row["precision"]:.3f} '
    f'R {row["recall"]:.3f}  mAP@0.5 {row["map50"]:.4f}  mAP@0.5:0.95 {row["map50_95"]:.4f}  '
    f'[train {seconds:.0f}s, eval {eval_seconds:.0f}s]'
  )
  value = row[metric_name]
  if np.isfinite(value):
    ckpt.save_best(g, state, metric=value, metadata={'epoch': epoch, metric_name: value})
