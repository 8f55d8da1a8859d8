"""Detecting objects in images and videos, as ``reorg-jax detect`` does (upstream's detect.py).

Glossary: ``S`` the input side (``--img-size``), ``H``/``W`` an image's own
height and width, ``h``/``w`` its network input's (multiples of the model's
largest stride, at most ``S``), ``C`` classes, ``D`` detections kept per
image.

:func:`prepare` reads and checks everything before any work (the source's
images and videos (:func:`list_source`), the weights, the model and its
variables (:mod:`reorg_jax.program.network`), the class names, the sizes,
where the results go) and returns a :class:`Plan`, raising
:class:`~reorg_jax.program.network.BadInput` (one line) for what cannot be
used. :func:`run` then detects on every image and video frame, one at a
time, as upstream's detection does (:mod:`reorg_jax.program.detect_steps`:
letterbox, network, selection, back to the image's pixels), and writes the
results (:mod:`reorg_jax.program.detect_outputs`).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import cv2
import jax
import numpy as np

from reorg_jax.data import dataset
from reorg_jax.models import yolo
from reorg_jax.program import detect_outputs, detect_steps, network
from reorg_jax.program import weights as weights_lib
from reorg_jax.program.network import DEFAULT_IMAGE_SIZE, BadInput

__all__ = [
  'DEFAULT_IMAGE_SIZE',
  'MAX_LISTED',
  'VIDEO_SUFFIXES',
  'BadInput',
  'Outcome',
  'Plan',
  'describe_files',
  'list_source',
  'prepare',
  'run',
]


# Video files read through OpenCV (upstream's list).
VIDEO_SUFFIXES = ('.mov', '.avi', '.mp4', '.mpg', '.mpeg', '.m4v', '.wmv', '.mkv')
# How many files a message names before counting the rest.
MAX_LISTED = 20


def describe_files(paths: Sequence[Path | str]) -> str:
  """``a.jpg, b.jpg and 3 more``: at most :data:`MAX_LISTED` of ``paths`` named."""
  shown = ', '.join(str(p) for p in paths[:MAX_LISTED])
  return shown + (f' and {len(paths) - MAX_LISTED} more' if len(paths) > MAX_LISTED else '')


def list_source(source: str | os.PathLike) -> tuple[tuple[Path, ...], tuple[Path, ...]]:
  """``(images, videos)`` of ``--source``: a file, a folder (not its subfolders) or a glob.

  Files are taken by suffix (:data:`reorg_jax.data.dataset.IMAGE_SUFFIXES`,
  :data:`VIDEO_SUFFIXES`; others are ignored), each kind sorted by path, as
  upstream's ``LoadImages``. A glob pattern (``*``, ``?``, ``[``; ``**``
  recurses) matches files.

  Raises:
    BadInput: nothing there, or no image or video among it.
  """
  text = os.fspath(source)
  if any(c in text for c in '*?['):
    files = [Path(p) for p in sorted(glob.glob(text, recursive=True))]
  elif Path(text).is_dir():
    files = sorted(p for p in Path(text).iterdir())
  elif Path(text).is_file():
    files = [Path(text)]
  else:
    raise BadInput(f'--source {text}: no such file or directory')
  files = [p for p in files if p.is_file()]
  images = tuple(p for p in files if p.suffix.lower() in dataset.IMAGE_SUFFIXES)
  videos = tuple(p for p in files if p.suffix.lower() in VIDEO_SUFFIXES)
  if not images and not videos:
    raise BadInput(
      f'--source {text}: no images ({" ".join(dataset.IMAGE_SUFFIXES)}) or videos '
      f'({" ".join(VIDEO_SUFFIXES)}) found'
    )
  return images, videos


@dataclasses.dataclass(frozen=True)
class Plan:
  """Everything :func:`run` needs, read and checked.

  Attributes:
    weights: the ``--weights`` read.
    model: the network, ``C`` classes.
    model_name: what it is, in words.
    variables: its ``{'params', 'batch_stats'}``, every tensor from the file.
    names: the ``C`` class names.
    names_from: where the names come from, in words.
    images: the source's images, in order.
    videos: the source's videos, after the images.
    image_size: ``S``.
    workdir: where the results go.
  """

  weights: weights_lib.Weights
  model: yolo.YOLO
  model_name: str
  variables: dict[str, Any]
  names: tuple[str, ...]
  names_from: str
  images: tuple[Path, ...]
  videos: tuple[Path, ...]
  image_size: int
  workdir: Path


def _check_videos(videos: Sequence[Path]) -> None:
  for path in videos:
    capture = cv2.VideoCapture(str(path))
    try:
      readable = capture.isOpened() and capture.read()[0]
    finally:
      capture.release()
    if not readable:
      raise BadInput(f'--source: OpenCV cannot read the video {path}')


def _check_outputs(
  workdir: Path, images: Sequence[Path], videos: Sequence[Path], *, files: bool
) -> None:
  """Refuses outputs that would overwrite a source or each other."""
  if workdir.exists() and not workdir.is_dir():
    raise BadInput(f'--workdir {workdir} exists and is not a folder')
  if (workdir / 'config.yaml').is_file() and (workdir / 'checkpoints').is_dir():
    raise BadInput(f'--workdir {workdir} holds a training run: give another --workdir')
  if not files:
    return
  seen: dict[str, Path] = {}
  for path in (*images, *videos):
    if path.stem in seen:
      raise BadInput(
        f'--source: {seen[path.stem]} and {path} would write the same results in --workdir '
        f'{workdir} (the same file stem)'
      )
    seen[path.stem] = path
    if (workdir / path.name).resolve() == path.resolve():
      raise BadInput(f'--workdir {workdir} holds the source {path}, which would be overwritten')


def prepare(
  *,
  weights: str | os.PathLike,
  source: str | os.PathLike,
  data: str | os.PathLike | None,
  model: str | None,
  image_size: int | None,
  classes: Sequence[int] | None,
  workdir: str | os.PathLike,
  writes_files: bool,
) -> Plan:
  """Reads and checks the source, weights, model, class names and sizes; writes nothing.

  Args:
    weights: ``--weights`` (see :func:`reorg_jax.program.weights.read`; EMA weights).
    source: ``--source`` (see :func:`list_source`); each video must open in OpenCV.
    data: a dataset YAML for the class names; ``None``: the names the weights
      carry, else the class indices.
    model: ``'p6_nano'`` or a model YAML; ``None``: what the weights carry.
    image_size: ``S``; ``None``: a run's own, else :data:`DEFAULT_IMAGE_SIZE`.
    classes: ``--classes``, each below ``C``.
    workdir: where the results will go.
    writes_files: images, videos or label files go to ``workdir`` (one per
      source file stem, never over a source).

  Raises:
    BadInput: any of them unusable (one line).
    reorg_jax.program.weights.WeightsError: the weights unreadable.
    reorg_jax.data.dataset.DatasetError: ``data`` unreadable.
  """
  images, videos = list_source(source)
  _check_videos(videos)
  workdir = Path(workdir)
  _check_outputs(workdir, images, videos, files=writes_files)
  weights = weights_lib.read(weights, use_ema=True)
  known = network.class_count(weights)
  names, names_from = weights.class_names, f'--weights {weights.path}'
  if data is not None:
    names, names_from = dataset.read_data_config(data).names, f'--data {data}'
    if known is not None and known != len(names):
      raise BadInput(f'--weights {weights.path} has {known} classes, --data {data} {len(names)}')
  count = known or (len(names) if names else None) or network.head_class_count(weights.state_dict)
  if count is None:
    raise BadInput(f'--weights {weights.path}: cannot tell its number of classes: give --data')
  if names is None:
    names, names_from = tuple(str(c) for c in range(count)), 'the class indices'
  net, model_name = network.build_model(weights, model=model, num_classes=count)
  options = network.run_options(weights.run) if weights.run is not None else {}
  size = image_size or options.get('image_size', DEFAULT_IMAGE_SIZE)
  if size % net.max_stride:
    raise BadInput(
      f"--img-size {size} is not a multiple of {model_name}'s largest stride {net.max_stride}"
    )
  wrong = [c for c in classes or () if not 0 <= c < count]
  if wrong:
    raise BadInput(f'--classes {wrong}: {model_name} has classes 0 to {count - 1}')
  variables = network.fill(weights, net, model_name=model_name)
  return Plan(
    weights=weights,
    model=net,
    model_name=model_name,
    variables=variables,
    names=tuple(names),
    names_from=names_from,
    images=images,
    videos=videos,
    image_size=size,
    workdir=workdir,
  )


class _Item(NamedTuple):
  """One image or video frame to detect on."""

  number: int  # of its file among the source's, from 1
  path: Path
  frame: int  # from 1; 0: an image
  frames: int  # the video's frame count as its file says; 0: an image
  image: np.ndarray  # [H, W, 3] BGR


def _items(plan: Plan, unreadable: list[Path]) -> Iterator[_Item]:
  """Every image, then every video's frames; appends the images that cannot be read."""
  for number, path in enumerate(plan.images, start=1):
    try:
      data = np.fromfile(path, np.uint8)
    except OSError:  # no permission, gone since listed
      data = np.zeros(0, np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
      unreadable.append(path)
      continue
    yield _Item(number, path, 0, 0, image)
  for number, path in enumerate(plan.videos, start=len(plan.images) + 1):
    capture = cv2.VideoCapture(str(path))
    try:
      frames = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
      frame = 0
      while True:
        ok, image = capture.read()
        if not ok:
          break
        frame += 1
        yield _Item(number, path, frame, frames, image)
    finally:
      capture.release()


@dataclasses.dataclass
class Outcome:
  """What :func:`run` did.

  Attributes:
    images: images detected on.
    frames: video frames detected on.
    detections: boxes found over all of them.
    unreadable: images that could not be read (skipped).
    incomplete: ``(file, frame)`` whose candidates exceeded ``max_candidates``
      with fewer than ``D`` detections kept (suppression took the best
      ``max_candidates`` of them).
    seconds: ``(inference, nms)`` summed, compilations included.
    written: the files written, in order (the JSON last).
  """

  images: int = 0
  frames: int = 0
  detections: int = 0
  unreadable: list[Path] = dataclasses.field(default_factory=list)
  incomplete: list[tuple[Path, int]] = dataclasses.field(default_factory=list)
  seconds: tuple[float, float] = (0.0, 0.0)
  written: list[Path] = dataclasses.field(default_factory=list)


def _summary(classes: np.ndarray, names: Sequence[str]) -> str:
  """``2 cats, 1 dog`` (upstream's counts, by class index), or ``no detections``."""
  if not len(classes):
    return 'no detections'
  counts = np.bincount(classes)
  return ', '.join(f'{n} {names[c]}{"s" * (n > 1)}' for c, n in enumerate(counts.tolist()) if n)


def run(
  plan: Plan,
  *,
  score_threshold: float,
  iou_threshold: float,
  max_detections: int,
  max_candidates: int,
  classes: Sequence[int] | None,
  class_agnostic: bool,
  save_images: bool,
  save_txt: bool,
  save_conf: bool,
  log: Callable[[str], None],
) -> Outcome:
  """Detects on every image and video frame of the plan and writes the results to its workdir.

  Written (:mod:`reorg_jax.program.detect_outputs`; each file complete or
  not at all): with ``save_images`` each image with its boxes drawn
  (:func:`~reorg_jax.program.detect_outputs.draw`) under its own name, each
  video likewise (MPEG-4, the source's frame rate); with ``save_txt``
  ``labels/<stem>.txt`` per image (``<stem>_<frame>.txt`` per frame, from 1)
  with :func:`~reorg_jax.program.detect_outputs.label_lines`, none where
  nothing was found; and ``detections.json`` (see ``reorg-jax detect
  --help``). Nothing at all when no image could be read.

  Args:
    plan: from :func:`prepare`.
    score_threshold, iou_threshold, max_detections, max_candidates, classes,
      class_agnostic: as :func:`reorg_jax.program.detect_steps.select`.
    save_images: write the images and videos with their boxes drawn.
    save_txt: write the label files.
    save_conf: the label lines end with the score.
    log: called with one line per image or frame.

  Raises:
    BadInput: no image could be read and the source has no video.
    OSError: a result could not be written.
  """
  outcome = Outcome()
  variables = jax.device_put(plan.variables)
  stride, size, workdir = plan.model.max_stride, plan.image_size, plan.workdir
  shapes: set[tuple[int, int]] = set()
  records: list[dict[str, Any]] = []
  video: detect_outputs.VideoOut | None = None
  inference_s = nms_s = 0.0
  total = len(plan.images) + len(plan.videos)
  try:
    for item in _items(plan, outcome.unreadable):
      h0, w0 = item.image.shape[:2]
      rgb = detect_steps.letterbox(
        cv2.cvtColor(item.image, cv2.COLOR_BGR2RGB), size=size, stride=stride
      )
      input_hw = rgb.shape[:2]
      started = time.perf_counter()
      decoded = jax.block_until_ready(detect_steps.decode(plan.model, variables, rgb[None]))
      inferred = time.perf_counter()
      (found,) = detect_steps.select(
        decoded,
        score_threshold=score_threshold,
        iou_threshold=iou_threshold,
        max_detections=max_detections,
        max_candidates=max_candidates,
        classes=classes,
        class_agnostic=class_agnostic,
      )
      selected = time.perf_counter()
      inference_s += inferred - started
      nms_s += selected - inferred
      compiled = input_hw not in shapes
      shapes.add(input_hw)
      boxes = detect_steps.to_original_pixels(found.boxes, input_hw=input_hw, original_hw=(h0, w0))
      if not found.complete:
        outcome.incomplete.append((item.path, item.frame))
      outcome.detections += len(boxes)
      if item.frame:
        outcome.frames += 1
      else:
        outcome.images += 1
      where = f'image {item.number}/{total}'
      if item.frame:
        where = f'video {item.number}/{total} ({item.frame}/{item.frames})'
      log(
        f'{where} {item.path}: {h0}x{w0} -> {input_hw[0]}x{input_hw[1]}: '
        f'{_summary(found.classes, plan.names)}; {1e3 * (inferred - started):.1f} ms inference'
        f'{" (first at this shape: compiled)" if compiled else ""}, '
        f'{1e3 * (selected - inferred):.1f} ms NMS'
      )
      records.append(
        detect_outputs.record(
          item.path,
          boxes,
          found.scores,
          found.classes,
          frame=item.frame,
          original_hw=(h0, w0),
          input_hw=input_hw,
          candidates=found.candidates,
          names=plan.names,
        )
      )
      stem = item.path.stem + (f'_{item.frame}' if item.frame else '')
      if save_txt:
        label_path = workdir / 'labels' / f'{stem}.txt'
        if detect_outputs.save_labels(
          label_path,
          boxes,
          found.scores,
          found.classes,
          original_hw=(h0, w0),
          with_score=save_conf,
        ):
          outcome.written.append(label_path)
      if not save_images:
        continue
      drawn = detect_outputs.draw(item.image, boxes, found.scores, found.classes, names=plan.names)
      if not item.frame:
        detect_outputs.save_image(workdir / item.path.name, drawn)
        outcome.written.append(workdir / item.path.name)
        continue
      if video is None or video.path != workdir / item.path.name:
        if video is not None:
          video.close(complete=True)
          outcome.written.append(video.path)
          video = None
        video = detect_outputs.VideoOut(
          workdir / item.path.name, fps=detect_outputs.source_fps(item.path), size=(w0, h0)
        )
      video.write(drawn)
    if video is not None:
      video.close(complete=True)
      outcome.written.append(video.path)
      video = None
  finally:
    if video is not None:
      video.close(complete=False)
  outcome.seconds = (inference_s, nms_s)
  if not records:
    raise BadInput(
      f'--source: none of its {len(outcome.unreadable)} images could be read: '
      f'{describe_files(outcome.unreadable)}'
    )
  document = {
    'weights': str(plan.weights.path),
    'model': plan.model_name,
    'image_size': size,
    'conf_thres': score_threshold,
    'iou_thres': iou_threshold,
    'classes': None if classes is None else [int(c) for c in classes],
    'names': list(plan.names),
    'images': records,
    'unreadable': [str(p) for p in outcome.unreadable],
  }
  detect_outputs.write_bytes(workdir / 'detections.json', json.dumps(document).encode())
  outcome.written.append(workdir / 'detections.json')
  return outcome
