"""Reading datasets in YOLO layout: a dataset YAML, image folders or lists, label files.

Glossary: ``N`` label rows (boxes) of an image, ``H``/``W`` image height/width,
``P`` points of a polygon.

The layout is upstream's::

  data.yaml              train: images/train   val: images/val   nc: 2   names: [a, b]
  images/train/0001.jpg
  labels/train/0001.txt  one row per box: class cx cy w h (normalised to [0, 1])

* ``train``/``val`` name an image folder (searched recursively), a ``.txt``
  file listing image paths one per line, or a list of these. Relative paths
  are resolved against the YAML's ``path:`` key when present (itself relative
  to the YAML's folder), else against the YAML's folder; paths inside a list
  file are resolved against the list file's folder.
* ``names`` is a list or a ``{index: name}`` mapping; ``nc`` must agree with it
  when both are given.
* An image's label file is found by replacing the last ``images`` folder of
  its path with ``labels`` and its suffix with ``.txt`` (next to the image
  when the path has no ``images`` folder). A missing label file means an image
  without boxes.
* A label row ``class x1 y1 x2 y2 ... xk yk`` (a polygon, ``k >= 3``, normalised)
  is an object's segment: its box is the polygon's bounding box, and the
  polygon is kept for the segment-aware augmentations (warp, paste_in). In a
  file with polygon rows, a box row's segment is its rectangle (upstream would
  pair segments and boxes up wrongly there).

Problems are reported, never passed on silently: malformed label rows (wrong
field count, non-numbers, non-finite values, class outside ``[0, nc)``,
coordinates outside ``[0, 1]``, duplicates) raise :class:`DatasetError` listing
every offending file and line; unreadable images are skipped with a logged
warning naming the file, or raise in ``strict`` mode.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import yaml

from reorg_jax import boxes as box_lib

__all__ = [
  'IMAGE_SUFFIXES',
  'MAX_LISTED_PROBLEMS',
  'DataConfig',
  'DatasetError',
  'YoloDataset',
  'label_path',
  'list_images',
  'load_dataset',
  'load_split',
  'parse_label_file',
  'read_data_config',
  'read_image',
  'read_label_file',
]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = ('.bmp', '.jpg', '.jpeg', '.png', '.tif', '.tiff', '.webp')
# How many problems a DatasetError spells out before summarising the rest.
MAX_LISTED_PROBLEMS = 20


class DatasetError(ValueError):
  """A dataset that cannot be read as given; the message names files (and lines)."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """What a dataset YAML says.

  Attributes:
    train: image sources of the training split (folders or list files).
    val: image sources of the validation split.
    names: class names, ``nc`` of them, indexed by class id.
  """

  train: tuple[Path, ...]
  val: tuple[Path, ...]
  names: tuple[str, ...]

  @property
  def num_classes(self) -> int:
    """``nc``."""
    return len(self.names)


def _class_names(raw: dict, source: Path) -> tuple[str, ...]:
  names, nc = raw.get('names'), raw.get('nc')
  if nc is not None and (isinstance(nc, bool) or not isinstance(nc, int) or nc < 1):
    raise DatasetError(f'{source}: nc must be a positive integer, got {nc!r}')
  if names is None:
    if nc is None:
      raise DatasetError(f'{source}: needs nc or names')
    return tuple(f'class{i}' for i in range(nc))
  if isinstance(names, dict):
    keys = sorted(names)
    if keys != list(range(len(names))):
      raise DatasetError(f'{source}: names keys must be 0..{len(names) - 1}, got {keys}')
    names = [names[k] for k in keys]
  if not isinstance(names, list) or not names:
    raise DatasetError(f'{source}: names must be a non-empty list or mapping, got {names!r}')
  if nc is not None and nc != len(names):
    raise DatasetError(f'{source}: nc is {nc} but names lists {len(names)} classes')
  return tuple(str(name) for name in names)


def read_data_config(path: str | os.PathLike) -> DataConfig:
  """Reads a dataset YAML (keys ``train``, ``val``, ``nc``, ``names``, optional ``path``).

  Raises:
    DatasetError: unreadable YAML, missing ``train``/``val``, or inconsistent
      ``nc``/``names``.
  """
  path = Path(path)
  try:
    raw = yaml.safe_load(path.read_text())
  except (OSError, yaml.YAMLError) as error:
    raise DatasetError(f'{path}: cannot read dataset YAML: {error}') from error
  if not isinstance(raw, dict):
    raise DatasetError(f'{path}: a dataset YAML must be a mapping, got {type(raw).__name__}')
  root = path.parent
  if raw.get('path'):
    root = root / str(raw['path'])

  def sources(key: str) -> tuple[Path, ...]:
    value = raw.get(key)
    if not value:
      raise DatasetError(f'{path}: missing {key!r} (an image folder, list file or list of them)')
    return tuple(root / str(v) for v in (value if isinstance(value, list) else [value]))

  return DataConfig(train=sources('train'), val=sources('val'), names=_class_names(raw, path))


def label_path(image_path: str | os.PathLike) -> Path:
  """Label file of an image: the last ``images`` folder becomes ``labels``, suffix ``.txt``."""
  parts = list(Path(image_path).parts)
  folders = [i for i, part in enumerate(parts[:-1]) if part == 'images']
  if folders:
    parts[folders[-1]] = 'labels'
  return Path(*parts).with_suffix('.txt')


def list_images(sources: Sequence[str | os.PathLike]) -> list[Path]:
  """Image paths of folders (recursive) and list files, sorted.

  Raises:
    DatasetError: a source does not exist, or no image was found.
  """
  found: list[Path] = []
  for source in sources:
    source = Path(source)
    if source.is_dir():
      found += [p for p in source.rglob('*') if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    elif source.is_file():
      for number, line in enumerate(source.read_text().splitlines(), start=1):
        entry = source.parent / line.strip()
        if not line.strip():
          continue
        if entry.suffix.lower() in IMAGE_SUFFIXES:
          found.append(entry)
        else:
          logger.warning('%s:%d: ignoring %s, not an image suffix', source, number, entry)
    else:
      raise DatasetError(f'image source {source} does not exist')
  images = sorted(found)
  if not images:
    raise DatasetError(
      f'no images ({", ".join(IMAGE_SUFFIXES)}) found in {list(map(str, sources))}'
    )
  return images


def read_label_file(
  path: str | os.PathLike, *, num_classes: int
) -> tuple[np.ndarray, tuple[np.ndarray, ...], list[str]]:
  """Reads one label file, boxes and segments.

  Returns:
    ``(labels, segments, problems)``: ``[N, 5]`` float32 rows ``(class, cx, cy,
    w, h)`` of the well-formed lines; when any of them is a polygon, ``N``
    float32 ``[P_i, 2]`` normalised ``(x, y)`` segments (a box row's is its
    rectangle), else ``()``; and one ``'<file>:<line>: <what>'`` message per
    malformed line (an empty list when the file is fine). A missing file gives
    no rows and no problems.
  """
  path = Path(path)
  if not path.is_file():
    return np.zeros((0, 5), np.float32), (), []
  try:
    text = path.read_text()
  except (OSError, UnicodeDecodeError) as error:
    return np.zeros((0, 5), np.float32), (), [f'{path}: cannot read label file: {error}']
  rows, polygons, problems, seen = [], [], [], {}
  for number, line in enumerate(text.splitlines(), start=1):
    fields = line.split()
    if not fields:
      continue
    where = f'{path}:{number}'
    if len(fields) != 5 and (len(fields) < 7 or len(fields) % 2 == 0):
      problems.append(
        f'{where}: expected "class cx cy w h" (5 fields) or a polygon "class x1 y1 ... xk yk" '
        f'(k >= 3), got {len(fields)} fields'
      )
      continue
    try:
      values = np.asarray([float(f) for f in fields], np.float64)
    except ValueError:
      problems.append(f'{where}: not a number in {line.strip()!r}')
      continue
    if not np.isfinite(values).all():
      problems.append(f'{where}: non-finite value in {line.strip()!r}')
      continue
    cls = values[0]
    if cls != round(cls) or not 0 <= cls < num_classes:
      problems.append(f'{where}: class {fields[0]} is not an integer in [0, {num_classes})')
      continue
    if ((values[1:] < 0) | (values[1:] > 1)).any():
      problems.append(f'{where}: coordinates must lie in [0, 1], got {" ".join(fields[1:])}')
      continue
    polygon = None
    if len(fields) > 5:  # Polygon: its bounding box, and the polygon itself.
      polygon = values[1:].reshape(-1, 2)
      xyxy = np.concatenate([polygon.min(axis=0), polygon.max(axis=0)])
      values = np.concatenate([[cls], box_lib.xyxy_to_cxcywh(xyxy, xp=np)])
    key = tuple(values.tolist())
    if key in seen:
      problems.append(f'{where}: duplicate of line {seen[key]}')
      continue
    seen[key] = number
    rows.append(values)
    polygons.append(polygon)
  labels = np.asarray(rows, np.float32).reshape(-1, 5)
  if all(polygon is None for polygon in polygons):
    return labels, (), problems
  segments = []
  for row, polygon in zip(labels, polygons, strict=True):
    if polygon is None:  # The box's rectangle, computed in float64 as the polygons are read.
      xyxy = box_lib.cxcywh_to_xyxy(row[1:].astype(np.float64), xp=np)
      polygon = box_lib.xyxy_to_polygon(xyxy, xp=np)
    segments.append(np.asarray(polygon, np.float32))
  return labels, tuple(segments), problems


def parse_label_file(path: str | os.PathLike, *, num_classes: int) -> tuple[np.ndarray, list[str]]:
  """:func:`read_label_file` without the segments: ``(labels, problems)``."""
  labels, _, problems = read_label_file(path, num_classes=num_classes)
  return labels, problems


def read_image(path: str | os.PathLike) -> np.ndarray | None:
  """``[H, W, 3]`` uint8 RGB, or ``None`` when the file cannot be decoded."""
  data = np.fromfile(str(path), np.uint8) if Path(path).is_file() else None
  image = None if data is None or not data.size else cv2.imdecode(data, cv2.IMREAD_COLOR)
  return None if image is None else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


@dataclasses.dataclass(frozen=True, eq=False)
class YoloDataset:
  """A split of a dataset: image paths and their labels, checked once.

  Attributes:
    image_paths: the images, sorted.
    labels: per image, ``[N, 5]`` float32 rows ``(class, cx, cy, w, h)``,
      normalised to the image.
    names: class names (``nc`` of them).
    segments: per image, ``N`` float32 ``[P_i, 2]`` normalised polygons (one
      per label row) or ``()`` when its label file has no polygon; ``()`` as a
      whole: no image has any.
  """

  image_paths: tuple[Path, ...]
  labels: tuple[np.ndarray, ...]
  names: tuple[str, ...]
  segments: tuple[tuple[np.ndarray, ...], ...] = ()

  def __post_init__(self):
    if self.segments and len(self.segments) != len(self.image_paths):
      raise ValueError(
        f'segments lists {len(self.segments)} images, the dataset {len(self.image_paths)}'
      )
    for index, (rows, own) in enumerate(zip(self.labels, self.segments, strict=False)):
      if len(own) and len(own) != len(rows):
        raise ValueError(
          f'{self.image_paths[index]}: {len(own)} segments for {len(rows)} label rows'
        )

  def __len__(self) -> int:
    return len(self.image_paths)

  @property
  def num_classes(self) -> int:
    """``nc``."""
    return len(self.names)

  @functools.cached_property
  def has_segments(self) -> bool:
    """Whether any image has segment (polygon) labels."""
    return any(len(own) for own in self.segments)

  def segments_of(self, index: int) -> tuple[np.ndarray, ...]:
    """Image ``index``'s segments (``()`` when it has none)."""
    return self.segments[index] if self.segments else ()

  @property
  def max_labels(self) -> int:
    """Largest number of boxes of one image."""
    return max((len(x) for x in self.labels), default=0)

  def load_image(self, index: int) -> np.ndarray:
    """``[H, W, 3]`` uint8 RGB image ``index``.

    Raises:
      DatasetError: naming the file, when it can no longer be decoded.
    """
    image = read_image(self.image_paths[index])
    if image is None:
      raise DatasetError(f'cannot read image {self.image_paths[index]} (dataset index {index})')
    return image


def load_split(
  sources: Sequence[str | os.PathLike],
  *,
  names: Sequence[str],
  strict: bool = False,
  check_images: bool = True,
) -> YoloDataset:
  """Lists, checks and labels one split.

  Args:
    sources: image folders and/or list files (e.g. ``DataConfig.train``).
    names: class names; label classes must lie in ``[0, len(names))``.
    strict: raise instead of skipping unreadable images.
    check_images: decode every image once now, so that unreadable ones are
      found here rather than mid-epoch (costs one decode per image).

  Raises:
    DatasetError: missing sources or no images; every malformed label row
      (listing file and line); unreadable images when ``strict``.
  """
  names = tuple(names)
  paths, labels, segments, problems, unreadable = [], [], [], [], []
  for image_path in list_images(sources):
    if check_images and read_image(image_path) is None:
      unreadable.append(image_path)
      continue
    rows, outlines, issues = read_label_file(label_path(image_path), num_classes=len(names))
    problems += issues
    paths.append(image_path)
    labels.append(rows)
    segments.append(outlines)
  if unreadable:
    listed = ', '.join(str(p) for p in unreadable[:MAX_LISTED_PROBLEMS])
    more = len(unreadable) - MAX_LISTED_PROBLEMS
    message = f'{len(unreadable)} unreadable image(s): {listed}' + (
      f' and {more} more' if more > 0 else ''
    )
    if strict:
      raise DatasetError(message)
    logger.warning('skipping %s', message)
  if problems:
    shown = '\n  '.join(problems[:MAX_LISTED_PROBLEMS])
    more = len(problems) - MAX_LISTED_PROBLEMS
    raise DatasetError(
      f'{len(problems)} malformed label row(s):\n  {shown}'
      + (f'\n  ... and {more} more' if more > 0 else '')
    )
  if not paths:
    raise DatasetError(f'no readable images in {list(map(str, sources))}')
  return YoloDataset(
    image_paths=tuple(paths),
    labels=tuple(labels),
    names=names,
    segments=tuple(segments) if any(segments) else (),
  )


def load_dataset(
  path: str | os.PathLike, *, split: str, strict: bool = False, check_images: bool = True
) -> YoloDataset:
  """:func:`read_data_config` then :func:`load_split` of ``split`` (``'train'`` or ``'val'``)."""
  config = read_data_config(path)
  if split not in ('train', 'val'):
    raise ValueError(f"split must be 'train' or 'val', got {split!r}")
  return load_split(
    getattr(config, split), names=config.names, strict=strict, check_images=check_images
  )
