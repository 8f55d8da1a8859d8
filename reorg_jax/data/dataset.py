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

from reorg_jax import boxes as box_lib
from reorg_jax import yaml_file

__all__ = [
  'IMAGE_SUFFIXES',
  'MAX_LISTED_PROBLEMS',
  'DataConfig',
  'DatasetError',
  'SplitCounts',
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
    raw = yaml_file.read(path)
  except yaml_file.YamlFileError as error:
    raise DatasetError(str(error)) from None
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
    if values[3] == 0 or values[4] == 0:  # after normalisation, so a polygon's box too
      problems.append(
        f'{where}: box width or height is zero (w {values[3]:g}, h {values[4]:g}): an object '
        'must cover some area'
      )
      continue
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


@dataclasses.dataclass(frozen=True)
class SplitCounts:
  """What loading a split found, as upstream's loader counts it.

  Attributes:
    images: images in the split (readable).
    labelled: images whose label file has at least one box.
    missing: images without a label file (trained as background).
    empty: images whose label file has no box.
    boxes: label rows of all images.
    orphans: label files in the split's label folders named after no image
      there (their boxes are used nowhere).
    unreadable: images skipped because they cannot be decoded.
  """

  images: int
  labelled: int
  missing: int
  empty: int
  boxes: int
  orphans: tuple[Path, ...] = ()
  unreadable: tuple[Path, ...] = ()

  def line(self, split: str) -> str:
    """``train: 128 images, 120 labelled, 6 without a label file, 2 with an empty one, ...``."""
    text = (
      f'{split}: {self.images} images, {self.labelled} labelled, {self.missing} without a '
      f'label file, {self.empty} with an empty one, {self.boxes} boxes'
    )
    if self.unreadable:
      text += f'; {len(self.unreadable)} unreadable image(s) skipped'
    text += f'; {len(self.orphans)} label file(s) named after no image'
    if self.orphans:
      shown = ', '.join(str(path) for path in self.orphans[:3])
      text += f' ({shown}{", ..." if len(self.orphans) > 3 else ""})'
    return text


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
    counts: what :func:`load_split` found (``None`` for a dataset built otherwise).
  """

  image_paths: tuple[Path, ...]
  labels: tuple[np.ndarray, ...]
  names: tuple[str, ...]
  segments: tuple[tuple[np.ndarray, ...], ...] = ()
  counts: SplitCounts | None = None

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
    shown = '; '.join(problems[:MAX_LISTED_PROBLEMS])
    more = len(problems) - MAX_LISTED_PROBLEMS
    raise DatasetError(
      f'{len(problems)} malformed label row(s): {shown}'
      + (f'; and {more} more' if more > 0 else '')
    )
  if not paths:
    raise DatasetError(f'no readable images in {list(map(str, sources))}')
  counts = _count(paths, labels, sources=sources, unreadable=unreadable)
  if counts.orphans and counts.missing == counts.images:
    folders = sorted({str(path.parent) for path in counts.orphans})
    raise DatasetError(
      f'none of the {counts.images} images of {list(map(str, sources))} has a label file, while '
      f'{", ".join(folders[:3])} holds {len(counts.orphans)} label file(s) named after no image '
      f'(first: {", ".join(p.name for p in counts.orphans[:3])}): are the images and labels '
      'named alike?'
    )
  return YoloDataset(
    image_paths=tuple(paths),
    labels=tuple(labels),
    names=names,
    segments=tuple(segments) if any(segments) else (),
    counts=counts,
  )


def _image_folder(label_folder: Path) -> Path:
  """The folder whose images ``label_folder``'s files label (inverse of :func:`label_path`)."""
  parts = list(label_folder.parts)
  folders = [i for i, part in enumerate(parts) if part == 'labels']
  if folders:
    parts[folders[-1]] = 'images'
  return Path(*parts)


def _count(
  paths: Sequence[Path],
  labels: Sequence[np.ndarray],
  *,
  sources: Sequence[str | os.PathLike],
  unreadable: Sequence[Path],
) -> SplitCounts:
  """The :class:`SplitCounts` of a split's images, their labels and label folders."""
  expected = {label_path(path) for path in paths}
  present = {path for path in expected if path.is_file()}
  listed = {Path(source).resolve() for source in sources if Path(source).is_file()}
  orphans = []
  for folder in sorted({path.parent for path in expected}):
    if not folder.is_dir():
      continue
    images = _image_folder(folder)
    stems = (
      {p.stem for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
      if images.is_dir()
      else set()
    )
    for entry in os.scandir(folder):
      path = folder / entry.name
      if (
        entry.name.endswith('.txt')
        and entry.is_file()
        and path not in expected
        and path.stem not in stems  # an image of the folder that another split lists
        and path.resolve() not in listed  # a list file of images beside them
      ):
        orphans.append(path)
  with_rows = sum(1 for rows in labels if len(rows))
  missing = len(paths) - len(present)
  return SplitCounts(
    images=len(paths),
    labelled=with_rows,
    missing=missing,
    empty=len(paths) - with_rows - missing,
    boxes=sum(len(rows) for rows in labels),
    orphans=tuple(sorted(orphans)),
    unreadable=tuple(unreadable),
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
