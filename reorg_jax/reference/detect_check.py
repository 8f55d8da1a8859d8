"""Upstream's detection pipeline on our weights, and comparisons of decoded outputs and detections.

Glossary: ``S`` the input side (``--img-size``), ``h``/``w`` a network input's
height and width, ``H``/``W`` an image's own, ``C`` classes, ``R`` decoded
rows (boxes) per image, ``F = 5 + C`` (box centre ``x, y`` and size ``w, h``
in input pixels, objectness, ``C`` class probabilities), ``n`` detections of
an image. A *key* names an image or video frame as ``(file name, frame)``
(frame ``0`` for an image, from ``1`` in a video), as ``reorg-jax detect``'s
``detections.json`` and upstream's ``detect.py`` count them. A detection row
is ``[x1, y1, x2, y2, conf, cls]`` in the image's pixels.

Upstream's side is its own code: ``LoadImages`` (its letterbox),
``Model`` (fused and in evaluation mode, as ``attempt_load`` returns it),
``non_max_suppression`` and ``scale_coords``. torchvision is not installed
here (:mod:`reorg_jax.reference.oracle` registers a stand-in), so its
``ops.nms`` is replaced, within :func:`exact_nms`, by :func:`greedy_nms`, an
exact greedy suppression.

* :func:`upstream_inputs`, :func:`upstream_detections` and
  :func:`upstream_pipeline`: upstream's detection over a source;
* :func:`upstream_model`: upstream's training ``Model`` holding the weights
  of a run or checkpoint (:func:`reorg_jax.program.weights.read`);
* :func:`compare_detections`: one image's detections of ``reorg-jax detect``
  against upstream's;
* :func:`torch_decoded`, :func:`decoded_scale` and :func:`largest_difference`:
  decoded outputs ``[B, R, F]`` of both frameworks, compared divided by their
  scale (stride for centres, anchor for sizes, 1 for probabilities).

Users: ``tests/test_detect.py``, ``tests/test_export.py`` and
``benchmarks/deploy_check.py``. Needs torch and the reference package (the
``test`` or ``verify`` extra).
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from sas_yolov7.models.yolo import Model
from sas_yolov7.utils.datasets import LoadImages
from sas_yolov7.utils.general import box_iou, non_max_suppression, scale_coords

from reorg_jax.reference import oracle  # noqa: F401  (registers the torchvision stand-in)
from reorg_jax.reference.models import flushed_denormals

if TYPE_CHECKING:
  from reorg_jax.models import yolo
  from reorg_jax.program import weights as weights_lib

__all__ = [
  'DEFAULT_CONF',
  'DEFAULT_IOU',
  'UpstreamInput',
  'compare_detections',
  'decoded_scale',
  'exact_nms',
  'greedy_nms',
  'largest_difference',
  'torch_decoded',
  'upstream_detections',
  'upstream_inputs',
  'upstream_model',
  'upstream_nms',
  'upstream_pipeline',
]

# Upstream's detect.py defaults: --conf-thres and --iou-thres.
DEFAULT_CONF = 0.25
DEFAULT_IOU = 0.45

Key = tuple[str, int]


def greedy_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
  """torchvision.ops.nms: indices of the boxes kept, by decreasing score.

  Args:
    boxes: ``[N, 4]`` ``x1, y1, x2, y2``.
    scores: ``[N]``.
    iou_threshold: a box overlapping a kept higher-scoring one by more is dropped.

  Returns:
    ``[K]`` int64 indices into ``boxes``.
  """
  overlaps = box_iou(boxes, boxes) > iou_threshold  # [N, N]
  suppressed = torch.zeros(len(boxes), dtype=torch.bool)
  keep = []
  for i in torch.argsort(scores, descending=True, stable=True).tolist():
    if not suppressed[i]:
      keep.append(i)
      suppressed |= overlaps[i]
  return torch.tensor(keep, dtype=torch.int64)


@contextlib.contextmanager
def exact_nms() -> Iterator[None]:
  """Within the block, ``torchvision.ops.nms`` is :func:`greedy_nms`; restored after."""
  ops = sys.modules['torchvision.ops']  # imported by upstream's utils.general
  missing = object()
  before = ops.__dict__.get('nms', missing)  # the stand-in answers any name it lacks
  ops.nms = greedy_nms
  try:
    yield
  finally:
    if before is missing:
      del ops.nms
    else:
      ops.nms = before


def upstream_nms(prediction: torch.Tensor, **kwargs: Any) -> np.ndarray:
  """Upstream's ``non_max_suppression`` of one image's ``[1, R, F]``: ``[n, 6]`` float64.

  Args:
    prediction: decoded outputs in input pixels (left unchanged).
    **kwargs: ``non_max_suppression``'s options (``conf_thres``, ``iou_thres``,
      ``classes``, ``agnostic``, ...).

  Returns:
    ``[x1, y1, x2, y2, conf, cls]`` rows in input pixels, best first.
  """
  with exact_nms():
    return non_max_suppression(prediction.clone(), **kwargs)[0].numpy().astype(np.float64)


class UpstreamInput(NamedTuple):
  """One image or frame as upstream's ``LoadImages`` gives it to the network."""

  x: torch.Tensor  # [1, 3, h, w] float32 RGB in [0, 1], letterboxed
  original_hw: tuple[int, int]  # (H, W)


def upstream_inputs(
  sources: str | os.PathLike | Sequence[str | os.PathLike], *, image_size: int, stride: int
) -> dict[Key, UpstreamInput]:
  """Upstream's ``LoadImages`` over each source (an image, a video, a folder or a glob).

  Args:
    sources: one source or several, read in order; every image must be readable
      (upstream's loader stops at the first that is not).
    image_size: ``S``.
    stride: the model's largest stride (inputs are padded to its multiples).

  Returns:
    key -> input, in upstream's order (each source's images, then its videos' frames).
  """
  if isinstance(sources, (str, os.PathLike)):
    sources = [sources]
  inputs = {}
  for source in sources:
    loader = LoadImages(str(source), img_size=image_size, stride=stride)
    for path, img, im0, _ in loader:
      frame = getattr(loader, 'frame', 0)  # as upstream's detect.py
      x = torch.from_numpy(img).float()[None] / 255.0
      inputs[(Path(path).name, frame)] = UpstreamInput(x, tuple(im0.shape[:2]))
  return inputs


def upstream_detections(
  model: torch.nn.Module,
  inputs: Mapping[Key, UpstreamInput],
  *,
  conf_thres: float = DEFAULT_CONF,
  iou_thres: float = DEFAULT_IOU,
  **options: Any,
) -> dict[Key, np.ndarray]:
  """Upstream's ``detect.py`` on each input: the model, ``non_max_suppression``, ``scale_coords``.

  Args:
    model: upstream's, in evaluation mode (fused as ``attempt_load`` fuses it).
    inputs: from :func:`upstream_inputs`.
    conf_thres: ``--conf-thres``.
    iou_thres: ``--iou-thres``.
    **options: further ``non_max_suppression`` options (``classes``, ``agnostic``).

  Returns:
    key -> ``[n, 6]`` float64 ``[x1, y1, x2, y2, conf, cls]`` in the image's pixels, best first.
  """
  found = {}
  for key, (x, original_hw) in inputs.items():
    with torch.no_grad():
      prediction = model(x)[0]
    rows = upstream_nms(prediction, conf_thres=conf_thres, iou_thres=iou_thres, **options)
    rows[:, :4] = scale_coords(x.shape[2:], torch.from_numpy(rows[:, :4]), original_hw).numpy()
    found[key] = rows
  return found


def upstream_pipeline(
  model: torch.nn.Module,
  sources: str | os.PathLike | Sequence[str | os.PathLike],
  *,
  image_size: int,
  conf_thres: float = DEFAULT_CONF,
  iou_thres: float = DEFAULT_IOU,
  **options: Any,
) -> dict[Key, np.ndarray]:
  """Upstream's detection over ``sources``: :func:`upstream_inputs`, then :func:`upstream_detections`.

  The inputs are padded to multiples of the model's largest stride, as
  upstream's ``detect.py`` pads them (``int(model.stride.max())``).
  """
  stride = int(model.stride.max())
  inputs = upstream_inputs(sources, image_size=image_size, stride=stride)
  return upstream_detections(model, inputs, conf_thres=conf_thres, iou_thres=iou_thres, **options)


def upstream_model(weights: weights_lib.Weights) -> Model:
  """Upstream's training ``Model`` holding ``weights``: float32, evaluation mode, unfused.

  The model file is the one the weights carry (``p6_nano`` or a mapping) with
  their class count and anchors; the state dict (PyTorch layout, e.g. a run's
  EMA weights as :func:`reorg_jax.program.weights.read` exports them) is loaded
  with ``strict=True``; no parameter requires gradients (as in upstream's EMA,
  which ``attempt_load`` loads). Fuse as ``attempt_load`` does: ``.fuse().eval()``.

  Raises:
    ValueError: the weights carry no model definition or class count.
  """
  from reorg_jax.models import convert, from_yaml, yolo
  from reorg_jax.program import network

  spec = weights.model_yaml
  if spec is None:
    raise ValueError(f'{weights.path} ({weights.kind}) carries no model definition')
  if spec == 'p6_nano':
    config = from_yaml.load_config(yolo.NANO_CONFIG)
  elif isinstance(spec, Mapping):
    config = copy.deepcopy(dict(spec))
  else:
    config = from_yaml.load_config(Path(spec))
  classes = network.class_count(weights) or network.head_class_count(weights.state_dict)
  if classes is None:
    raise ValueError(f'{weights.path} ({weights.kind}) does not say its number of classes')
  config['nc'] = classes
  config['anchors'] = convert.anchors_from_state_dict(weights.state_dict)
  model = Model(config)
  state = {key: torch.from_numpy(np.array(value)) for key, value in weights.state_dict.items()}
  model.load_state_dict(state, strict=True)
  for parameter in model.parameters():  # as upstream's ModelEMA keeps them; fuse() needs it
    parameter.requires_grad_(False)
  if weights.class_names is not None:
    model.names = list(weights.class_names)
  return model.float().eval()


def compare_detections(ours: dict, theirs: np.ndarray) -> tuple[float, float]:
  """One image's detections of ours against upstream's: ``(largest box, largest score difference)``.

  Args:
    ours: the image's record in ``reorg-jax detect``'s ``detections.json``
      (``file``, ``frame``, ``detections``: each ``class``, ``score``, ``box``).
    theirs: ``[n, 6]`` upstream's rows (:func:`upstream_detections`).

  Returns:
    The largest absolute difference of a box coordinate (pixels) and of a score.

  Raises:
    AssertionError: another number of detections, or other classes or another
      order of them (naming the image and the first difference).
  """
  found = ours['detections']
  where = f'{ours.get("file")} frame {ours.get("frame") or 0}'
  if len(found) != len(theirs):
    raise AssertionError(f'{where}: {len(found)} detections of ours, {len(theirs)} of upstream')
  classes = np.array([d['class'] for d in found], dtype=np.int64)
  wanted = theirs[:, 5].astype(np.int64)
  differing = np.flatnonzero(classes != wanted)
  if len(differing):
    i = int(differing[0])
    raise AssertionError(
      f'{where}: {len(differing)} of {len(found)} detections differ in class, the first at '
      f'rank {i}: ours {classes[i]}, upstream {wanted[i]}'
    )
  if not len(found):
    return 0.0, 0.0
  boxes = np.abs(np.array([d['box'] for d in found]) - theirs[:, :4]).max()
  scores = np.abs(np.array([d['score'] for d in found]) - theirs[:, 4]).max()
  return float(boxes), float(scores)


def torch_decoded(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
  """Upstream's evaluation outputs ``[B, R, F]`` of NHWC float32 ``images`` ``[B, h, w, 3]``.

  Puts the model in evaluation mode; float32 denormals are flushed, as XLA does on CPU.
  """
  x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
  with torch.no_grad(), flushed_denormals():
    return model.eval()(x)[0].numpy()


def decoded_scale(model: yolo.YOLO, image_hw: tuple[int, int]) -> np.ndarray:
  """``[R, F]``: stride for ``x, y``, anchor for ``w, h``, 1 for probabilities.

  Rows in the decoded order (level, anchor, grid row, grid column) of an
  ``h x w`` input, each a multiple of the model's largest stride.
  """
  height, width = image_hw
  rows = []
  for anchors, stride in zip(model.anchors, model.strides, strict=True):
    for anchor_w, anchor_h in anchors:
      row = np.ones(5 + model.num_classes)
      row[:4] = stride, stride, anchor_w, anchor_h
      rows.append(np.broadcast_to(row, ((height // stride) * (width // stride), row.size)))
  return np.concatenate(rows)


def largest_difference(got: Any, want: Any, scale: np.ndarray) -> float:
  """The largest ``|got - want| / scale`` of two decoded outputs ``[..., R, F]`` of one shape.

  Raises:
    AssertionError: the shapes differ.
  """
  got, want = np.asarray(got), np.asarray(want)
  if got.shape != want.shape:
    raise AssertionError(f'decoded outputs of shapes {got.shape} and {want.shape}')
  return float(np.abs((got - want) / scale).max())
