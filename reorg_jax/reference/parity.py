"""Comparing assignments of ours and upstream's, as the parity tests and the notebooks do.

Glossary: ``B`` batch, ``M`` max boxes, ``K`` slots.

A positive is the tuple ``(level, anchor, gj, gi, class, cx, cy, w, h)``;
each image's positives form a multiset on both sides
(:func:`matched_multiset` from a :class:`reorg_jax.Assignment`,
:func:`reference_multisets` from upstream's ``build_targets`` indices).
:func:`tie_sensitive_images` names the images whose SimOTA outcome depends on
the order of (near-)equal costs or a top-20 IoU sum on an integer, where the
two implementations may legitimately differ.
"""

from __future__ import annotations

import collections

import jax
import numpy as np

__all__ = ['REL_TIE', 'matched_multiset', 'reference_multisets', 'tie_sensitive_images']

# Costs closer than this (relative) count as tied.
REL_TIE = 1e-5


def matched_multiset(assignment, targets, image: int) -> collections.Counter:
  """``(level, anchor, gj, gi, class, cx, cy, w, h)`` of every positive of ``image``."""
  a = jax.tree.map(lambda x: np.asarray(x)[image], assignment)
  boxes, classes = np.asarray(targets.boxes)[image], np.asarray(targets.classes)[image]
  rows = collections.Counter()
  for k in np.flatnonzero(a.positive):
    m = a.gt[k]
    rows[
      (
        int(a.level[k]),
        int(a.anchor[k]),
        int(a.gj[k]),
        int(a.gi[k]),
        int(classes[m]),
        *boxes[m].tolist(),
      )
    ] += 1
  return rows


def reference_multisets(indices, batch: int) -> list[collections.Counter]:
  """The same tuples from upstream's ``build_targets`` output, per image."""
  bs, as_, gjs, gis, rows = indices[:5]
  out = [collections.Counter() for _ in range(batch)]
  for level in range(len(bs)):
    if rows[level].numel() == 0:
      continue
    for b, a, gj, gi, row in zip(
      bs[level].tolist(),
      as_[level].tolist(),
      gjs[level].tolist(),
      gis[level].tolist(),
      rows[level].tolist(),
      strict=True,
    ):
      key = (level, a, gj, gi, int(row[1]), *np.asarray(row[2:6], np.float32).tolist())
      out[b][key] += 1
  return out


def tie_sensitive_images(costs, dynamic_k, valid) -> set[int]:
  """Images whose SimOTA outcome depends on the order of (near-)equal values."""
  cost = np.asarray(costs.cost, np.float64)
  iou = np.asarray(costs.iou, np.float64)
  live = np.asarray(costs.live)
  dynamic_k, valid = np.asarray(dynamic_k), np.asarray(valid)
  images = set()
  for b in range(cost.shape[0]):
    k_live = np.flatnonzero(live[b])
    for m in np.flatnonzero(valid[b]):
      row = np.sort(cost[b, m, k_live])
      k = dynamic_k[b, m]
      if k < row.size and row[k] - row[k - 1] <= REL_TIE * abs(row[k]):
        images.add(b)
      total = np.sort(iou[b, m])[::-1][:20].sum()
      if total >= 1 and abs(total - round(total)) < 1e-4:
        images.add(b)
    if k_live.size and valid[b].sum() > 1:
      column = np.sort(cost[b][np.ix_(valid[b], k_live)], axis=0)
      if (column[1] - column[0] <= REL_TIE * np.abs(column[1])).any():
        images.add(b)
  return images
