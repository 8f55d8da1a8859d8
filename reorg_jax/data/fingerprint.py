"""A dataset's fingerprint: each split's files with their sizes and modification times.

A run directory records the fingerprint of the dataset it trains on, so that
resuming over a dataset that changed since (a label file edited, an image
added or removed) is noticed, not trained on silently: the batches of a
resumed run are a pure function of ``(seed, epoch, step)`` *and the dataset*.

What is recorded, per split: every image and every label file the split
reads (a missing label file is recorded as missing), each with its size in
bytes and its modification time in nanoseconds (``os.stat``). Not the
contents' digests: stating COCO's 118k training images and their labels
takes about a second, hashing their 19 GB minutes. A change that keeps a
file's size and modification time (``touch -r``, a copy with ``cp -p`` of
other contents) goes unnoticed; a copy of the dataset that does not keep
modification times shows every file as modified.

Glossary: a *fingerprint* maps ``split -> {path: [size, mtime_ns] or None}``
(``None``: the label file is missing), paths as the dataset lists them.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Mapping
from pathlib import Path

from reorg_jax.data.dataset import YoloDataset, label_path

__all__ = ['Change', 'compare', 'describe', 'of_splits', 'read', 'write']

Fingerprint = dict[str, dict[str, list[int] | None]]
# How many paths of each kind of change a description names.
SHOWN = 3


def _stat(path: Path) -> list[int] | None:
  try:
    info = os.stat(path)
  except FileNotFoundError:
    return None
  return [info.st_size, info.st_mtime_ns]


def of_splits(splits: Mapping[str, YoloDataset]) -> Fingerprint:
  """The fingerprint of ``splits`` (``{'train': ..., 'val': ...}``) as they are on disk now."""
  result: Fingerprint = {}
  for name, split in splits.items():
    files: dict[str, list[int] | None] = {}
    for image in split.image_paths:
      files[str(image)] = _stat(image)
      label = label_path(image)
      files[str(label)] = _stat(label)
    result[name] = files
  return result


class Change:
  """What differs in one split between two fingerprints.

  Attributes:
    split: the split's name.
    added: paths listed now and not before (a label file that appeared included).
    removed: paths listed before and not now (a label file deleted included).
    modified: paths whose size or modification time changed.
  """

  def __init__(self, split: str, added: list[str], removed: list[str], modified: list[str]):
    self.split = split
    self.added = sorted(added)
    self.removed = sorted(removed)
    self.modified = sorted(modified)

  def __bool__(self) -> bool:
    return bool(self.added or self.removed or self.modified)

  def line(self) -> str:
    """``train: 1 added (a.jpg), 2 modified (labels/b.txt, ...)``."""
    parts = []
    for what, paths in (
      ('added', self.added),
      ('removed', self.removed),
      ('modified', self.modified),
    ):
      if paths:
        shown = ', '.join(paths[:SHOWN]) + (', ...' if len(paths) > SHOWN else '')
        parts.append(f'{len(paths)} {what} ({shown})')
    return f'{self.split}: ' + ', '.join(parts)


def compare(before: Fingerprint, now: Fingerprint) -> list[Change]:
  """The splits whose files differ between ``before`` and ``now`` (empty: the same dataset)."""
  changes = []
  for split in sorted(set(before) | set(now)):
    old, new = before.get(split, {}), now.get(split, {})
    old_present = {path for path, info in old.items() if info is not None}
    new_present = {path for path, info in new.items() if info is not None}
    change = Change(
      split,
      added=list(new_present - old_present),
      removed=list(old_present - new_present),
      modified=[path for path in old_present & new_present if old[path] != new[path]],
    )
    if change:
      changes.append(change)
  return changes


def describe(changes: list[Change]) -> str:
  """The changes in one line (``; `` between splits)."""
  return '; '.join(change.line() for change in changes)


def write(fingerprint: Fingerprint, path: str | os.PathLike) -> None:
  """Writes ``fingerprint`` as gzipped JSON, atomically (a temporary file renamed)."""
  path = Path(path)
  partial = path.with_name(path.name + '.partial')
  with gzip.open(partial, 'wt') as file:
    json.dump({'method': 'size and mtime_ns per file', 'splits': fingerprint}, file)
  partial.replace(path)


def read(path: str | os.PathLike) -> Fingerprint:
  """The fingerprint :func:`write` wrote.

  Raises:
    ValueError: the file cannot be read or is not a fingerprint (naming it).
  """
  try:
    with gzip.open(path, 'rt') as file:
      content = json.load(file)
    splits = content['splits']
  except (OSError, EOFError, ValueError, KeyError, TypeError) as error:
    raise ValueError(f'{path}: not a dataset fingerprint ({error})') from None
  if not isinstance(splits, dict):
    raise ValueError(f'{path}: not a dataset fingerprint (splits is {type(splits).__name__})')
  return splits
