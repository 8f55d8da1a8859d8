"""Validating weights on a dataset split, as ``reorg-jax val`` does: check, detect, score.

Glossary: ``B`` batch, ``S`` image side, ``C`` classes.

:func:`prepare` reads and checks everything before any work (the weights, the
dataset, the model and its variables (:mod:`reorg_jax.program.network`), the
sizes) and returns a :class:`Plan`, raising
:class:`BadInput` (one line) for what cannot be used. :func:`validate` runs
the model over the split's letterboxed images as the training run's
evaluation does (:func:`reorg_jax.program.evaluation.timed_detector`: the
network and the detection selection timed apart) and scores the detections
with ``pycocotools`` (:func:`reorg_jax.evaluate.compute_by_class`), and with
``save_json`` also in each image's own pixels (the letterbox undone).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np

from reorg_jax import boxes as box_lib
from reorg_jax import evaluate
from reorg_jax.data import dataset, loader, prefetch
from reorg_jax.models import yolo
from reorg_jax.program import config as config_lib
from reorg_jax.program import evaluation, network
from reorg_jax.program import weights as weights_lib
from reorg_jax.program.network import DEFAULT_IMAGE_SIZE, BadInput
from reorg_jax.training import step as train_lib

__all__ = [
  'DEFAULT_BATCH_SIZE',
  'DEFAULT_IMAGE_SIZE',
  'BadInput',
  'Outcome',
  'Plan',
  'prepare',
  'validate',
]

DEFAULT_BATCH_SIZE = 16


@dataclasses.dataclass(frozen=True)
class Plan:
  """Everything :func:`validate` needs, read and checked.

  Attributes:
    weights: the ``--weights`` read.
    model: the network, ``C`` classes.
    model_name: what it is, in words.
    variables: its ``{'params', 'batch_stats'}``, every tensor from the file.
    data_path: the dataset YAML.
    split: the images validated.
    image_size: ``S``.
    batch_size: ``B``.
    image_ids: per image of ``split``, its COCO ``image_id`` (with --save-json).
  """

  weights: weights_lib.Weights
  model: yolo.YOLO
  model_name: str
  variables: dict[str, Any]
  data_path: Path
  split: dataset.YoloDataset
  image_size: int
  batch_size: int
  image_ids: tuple[int | str, ...]


def _image_ids(split: dataset.YoloDataset) -> tuple[int | str, ...]:
  """COCO ``image_id`` of each image: its stem, an integer when numeric (upstream's rule)."""
  ids: dict[int | str, Path] = {}
  for path in split.image_paths:
    stem = path.stem
    image_id = int(stem) if stem.isnumeric() else stem
    if image_id in ids:
      raise BadInput(
        f'--save-json: images {ids[image_id]} and {path} would share image_id {image_id!r} '
        '(the file stem)'
      )
    ids[image_id] = path
  return tuple(ids)


def prepare(
  *,
  weights: str | Path,
  data: str | Path | None,
  model: str | None,
  image_size: int | None,
  batch_size: int | None,
  max_detections: int,
  split_name: str,
  save_json: bool,
  workdir: str | Path,
) -> Plan:
  """Reads and checks the weights, dataset, model and sizes; writes nothing.

  Args:
    weights: ``--weights`` (see :func:`reorg_jax.program.weights.read`; EMA weights).
    data: the dataset YAML; ``None``: the one a run of ours trained on.
    model: ``'p6_nano'`` or a model YAML; ``None``: what the weights carry.
    image_size: ``S``; ``None``: a run's own, else :data:`DEFAULT_IMAGE_SIZE`.
    batch_size: ``B``; ``None``: :data:`DEFAULT_BATCH_SIZE` rounded up to the devices.
    max_detections: detections kept per image (the model must predict as many boxes).
    split_name: ``'val'`` or ``'train'``.
    save_json: number the images for COCO results (their file stems).
    workdir: where the results will go (refused when it holds a training run).

  Raises:
    BadInput: any of them unusable (one line).
    reorg_jax.program.weights.WeightsError: the weights unreadable.
    reorg_jax.data.dataset.DatasetError: the dataset malformed.
  """
  workdir = Path(workdir)
  if workdir.exists() and not workdir.is_dir():
    raise BadInput(f'--workdir {workdir} exists and is not a folder')
  if (workdir / 'config.yaml').is_file() and (workdir / 'checkpoints').is_dir():
    raise BadInput(
      f'--workdir {workdir} holds a training run (its results.csv would be replaced): give '
      'another --workdir'
    )
  weights = weights_lib.read(weights, use_ema=True)
  run = weights.run
  options = network.run_options(run) if run is not None else {}
  if data is not None:
    data_path = Path(data)
  elif run is not None:
    data_path = Path(options['data']) if options['data'] else run / 'data' / 'data.yaml'
  else:
    raise BadInput(f'--weights {weights.path} is not a run of ours: give --data')
  classes = dataset.read_data_config(data_path).num_classes
  expected = network.class_count(weights)
  if expected is not None and expected != classes:
    raise BadInput(
      f'--weights {weights.path} has {expected} classes, --data {data_path} {classes} (nc)'
    )
  net, model_name = network.build_model(weights, model=model, num_classes=classes)
  size = image_size or options.get('image_size', DEFAULT_IMAGE_SIZE)
  if size % net.max_stride:
    raise BadInput(
      f"--img-size {size} is not a multiple of {model_name}'s largest stride {net.max_stride}"
    )
  boxes = config_lib.boxes_per_image(net, image_size=size)
  if boxes < max_detections:
    raise BadInput(
      f'--img-size {size} is too small for --max-det {max_detections}: {model_name} predicts '
      f'{boxes} boxes per image there'
    )
  variables = network.fill(weights, net, model_name=model_name)
  split = dataset.load_dataset(data_path, split=split_name, strict=True)
  devices = jax.device_count()
  return Plan(
    weights=weights,
    model=net,
    model_name=model_name,
    variables=variables,
    data_path=data_path,
    split=split,
    image_size=size,
    batch_size=batch_size or -(-DEFAULT_BATCH_SIZE // devices) * devices,
    image_ids=_image_ids(split) if save_json else (),
  )


@dataclasses.dataclass
class Outcome:
  """What :func:`validate` measured.

  Attributes:
    metrics: :func:`reorg_jax.evaluate.compute_by_class`'s all-class numbers.
    classes: its per-class rows.
    seen: images validated.
    seconds: ``(inference, nms)`` summed over the batches.
    detections: COCO results in the images' own pixels (with --save-json).
    ground_truth: the split's labels as a COCO dataset in those pixels, images
      numbered from 1 in split order (with --save-json).
    scored: ``detections`` with those image numbers (with --save-json).
  """

  metrics: dict[str, float]
  classes: dict[int, dict[str, float]]
  seen: int
  seconds: tuple[float, float]
  detections: list[dict[str, Any]]
  ground_truth: dict[str, Any]
  scored: list[dict[str, Any]]


def validate(
  plan: Plan,
  *,
  score_threshold: float,
  iou_threshold: float,
  max_detections: int,
  max_candidates: int,
  save_json: bool,
  progress: str = '',
) -> Outcome:
  """Detects on every image of the split and scores the detections.

  Args:
    plan: from :func:`prepare`.
    score_threshold: detections below it are dropped (``--conf-thres``).
    iou_threshold: non-maximum suppression's (``--iou-thres``).
    max_detections: kept per image (``--max-det``).
    max_candidates: boxes entering non-maximum suppression.
    save_json: also the COCO results in each image's own pixels.
    progress: the progress bar's text (shown on a terminal only).

  Raises:
    reorg_jax.data.dataset.DatasetError: an image that can no longer be read.
  """
  from jax.sharding import Mesh, NamedSharding, PartitionSpec
  from tqdm import tqdm

  mesh = Mesh(np.asarray(jax.devices()), ('data',))
  variables = train_lib.place(plan.variables, NamedSharding(mesh, PartitionSpec()))
  detect = evaluation.timed_detector(
    plan.model,
    variables,
    batch_sharding=NamedSharding(mesh, PartitionSpec('data')),
    score_threshold=score_threshold,
    iou_threshold=iou_threshold,
    max_detections=max_detections,
    max_candidates=max_candidates,
  )
  split, size = plan.split, plan.image_size
  scorer = evaluate.DetectionEvaluator(num_classes=split.num_classes, max_detections=max_detections)
  feed = loader.BatchLoader(
    split,
    batch_size=plan.batch_size,
    image_size=size,
    max_boxes=loader.max_boxes_bound(split, None),
    seed=0,
    config=None,
    shuffle=False,
    drop_last=False,
    num_threads=2,
  )
  inference = nms = 0.0
  detections: list[dict[str, Any]] = []
  scored: list[dict[str, Any]] = []
  images: list[dict[str, Any]] = []
  annotations: list[dict[str, Any]] = []
  bar = tqdm(
    total=feed.steps_per_epoch, desc=progress, file=sys.stderr, disable=not sys.stderr.isatty()
  )
  with feed, bar, prefetch.Prefetcher(feed.epoch(0), buffer_size=2) as batches:
    for step, batch in enumerate(batches):
      if step == 0:
        detect(batch.images)  # compiles both steps; not timed
      found, inference_s, nms_s = detect(batch.images)
      inference, nms = inference + inference_s, nms + nms_s
      scorer.add_batch(
        boxes=found.boxes,
        scores=found.scores,
        classes=found.classes,
        valid=found.valid,
        targets=batch.targets,
        image_hw=(size, size),
        real=batch.real,
      )
      bar.update()
      if not save_json:
        continue
      for slot in np.flatnonzero(batch.real):
        index = int(batch.indices[slot])
        image = split.load_image(index)
        hw = image.shape[:2]
        number = len(images) + 1
        images.append({'id': number, 'height': int(hw[0]), 'width': int(hw[1])})
        labels = split.labels[index]
        xywh = box_lib.normalized_cxcywh_to_pixel_xywh(
          np.asarray(labels[:, 1:], np.float64), width=hw[1], height=hw[0], xp=np
        )
        for box, category in zip(xywh.tolist(), labels[:, 0].astype(int).tolist(), strict=True):
          annotations.append(
            {
              'id': len(annotations) + 1,
              'image_id': number,
              'category_id': category,
              'bbox': box,
              'area': box[2] * box[3],
              'iscrowd': 0,
            }
          )
        kept = found.valid[slot]
        corners = evaluation.to_original_pixels(found.boxes[slot][kept], original_hw=hw, size=size)
        for box, category, score in zip(
          box_lib.xyxy_to_xywh(corners, xp=np).tolist(),
          found.classes[slot][kept].tolist(),
          found.scores[slot][kept].tolist(),
          strict=True,
        ):
          result = {
            'category_id': int(category),
            'bbox': [round(v, 3) for v in box],  # upstream's rounding
            'score': float(score),
          }
          detections.append({'image_id': plan.image_ids[index], **result})
          scored.append({'image_id': number, **result})
  metrics, classes = evaluate.compute_by_class(scorer)
  ground_truth = {
    'images': images,
    'annotations': annotations,
    'categories': [{'id': c, 'name': name} for c, name in enumerate(split.names)],
  }
  return Outcome(
    metrics=metrics,
    classes=classes,
    seen=scorer.num_images,
    seconds=(inference, nms),
    detections=detections,
    ground_truth=ground_truth,
    scored=scored,
  )
