"""Validate weights on a dataset split: upstream's table of P, R and mAPs (upstream's test.py).

--weights is a run directory of ours (its best checkpoint, else its newest),
one of its checkpoints (<run>/checkpoints/best/<g> or .../steps/<g>), an
upstream training or deploy checkpoint (.pt, read without running any of its
code), or a PyTorch state_dict file (with --model). Runs and checkpoints are
validated with their EMA weights, as training evaluates them; upstream files
with their 'ema' entry when they have one, as upstream's attempt_load. Every
tensor of the model must come from the file (another architecture or class
count is an error naming the tensors that differ).

The images are letterboxed to --img-size as the training run's evaluation
does, detections selected with --conf-thres, --iou-thres and --max-det, and
scored with pycocotools (box IoU) in the letterboxed frame. On a checkpoint
of ours at its run's eval options this gives the numbers of the run's own
results.csv row for that checkpoint. The table is upstream's (here, of a
model trained for 4 steps):

                 Class      Images      Labels           P           R      mAP@.5  mAP@.5:.95
                   all           4          16     0.00901       0.167      0.0123     0.00302

with a row per class that has labels after it with --verbose (Images counts
every image, as upstream). P and R are the means over the classes with
labels at the one confidence threshold that maximises their mean F1 (as
training reports them); a class's row gives its P and R at that threshold.
Then the time per image, upstream's `Speed: inference/NMS/total` line: the
network and the detection selection run as separate compiled steps, timed
after a warm-up call on the first batch (compilation excluded).

Written to --workdir (created if missing; earlier files of val replaced):
  results.csv      the table at full precision: the all row and every class
                   with labels (class, images, labels, precision, recall,
                   map50, map50_95)
  results.txt      what was printed
  detections.json  with --save-json: COCO results in each image's own pixel
                   frame (the letterbox undone, boxes [x, y, w, h] clipped to
                   the image and rounded to 1/1000 pixel), image_id the
                   file's stem (an integer when it is numeric), category_id
                   the class index; then
                   pycocotools' standard summary (at most 100 detections per
                   image) against the split's labels in the same frame is
                   printed.

Exit status (every error is one line on stderr, no traceback):
  0  validated.
  1  the results could not be written (the path is named).
  2  bad input, found before anything is written: an option's range, the
     weights (missing, unreadable, of another architecture or class count
     than the data), the model file, the dataset (nc and names disagreeing,
     malformed labels: file and line named), an image size the model cannot
     take, a --workdir that holds a training run.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reorg_jax.program import runtime

if TYPE_CHECKING:
  from reorg_jax.program import validation

__all__ = ['COLUMNS', 'HEADER', 'ORDER', 'ROW_FORMAT', 'SUMMARY', 'add_arguments', 'run']

ORDER = 2
SUMMARY = "validate weights on a dataset split (upstream's test.py): P, R, mAP@.5, mAP@.5:.95"

# The printed table: upstream's header and row format.
HEADER = ('Class', 'Images', 'Labels', 'P', 'R', 'mAP@.5', 'mAP@.5:.95')
ROW_FORMAT = '%20s' + '%12i' * 2 + '%12.3g' * 4
# The columns of results.csv.
COLUMNS = ('class', 'images', 'labels', 'precision', 'recall', 'map50', 'map50_95')


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """The options of ``val``."""
  runtime.add_weights_argument(
    parser,
    help='a run directory of ours or one of its checkpoints (EMA weights), an upstream training '
    'or deploy checkpoint (.pt; its EMA when it has one), or a PyTorch state_dict file (give '
    '--model)',
  )
  runtime.add_data_argument(
    parser,
    help='dataset YAML (train, val, nc, names; default: for a run of ours, the dataset it '
    'trained on)',
  )
  runtime.add_model_argument(
    parser,
    help="'p6_nano' or a model YAML in upstream's format (default: the model the weights carry: "
    "our run's, or the one pickled in an upstream checkpoint); the anchors are the file's",
  )
  runtime.add_image_size_argument(
    parser,
    help="network input side in pixels, a multiple of the model's largest stride (default: for "
    'a run of ours, its train.image_size; else 640, as upstream)',
  )
  runtime.add_batch_size_argument(
    parser,
    help='images per batch over all devices, a multiple of the device count (default: '
    '16, rounded up to a multiple of the device count)',
  )
  parser.add_argument(
    '--conf-thres',
    type=float,
    default=0.001,
    help='minimum objectness and class score of a detection (default: %(default)s)',
  )
  parser.add_argument(
    '--iou-thres',
    type=float,
    default=0.65,
    help='IoU above which non-maximum suppression drops the lower-scoring box of a class '
    '(default: %(default)s)',
  )
  parser.add_argument(
    '--max-det',
    type=int,
    default=300,
    help='detections kept and scored per image, at least 10 (default: %(default)s)',
  )
  parser.add_argument(
    '--max-candidates',
    type=int,
    default=1024,
    help='best-scoring boxes per image entering non-maximum suppression, at least --max-det '
    '(upstream: 30000; default: %(default)s, as training evaluates)',
  )
  parser.add_argument(
    '--task',
    choices=('val', 'train'),
    default='val',
    help='the dataset split to validate on (default: %(default)s)',
  )
  parser.add_argument(
    '--verbose', action='store_true', help='a table row for every class that has labels'
  )
  parser.add_argument(
    '--save-json',
    action='store_true',
    help="write detections.json (COCO results in each image's pixels) and print pycocotools' "
    'summary against the labels',
  )
  runtime.add_workdir_argument(
    parser,
    default='runs/val',
    help='where results.csv, results.txt and detections.json go (default: %(default)s)',
  )
  runtime.add_runtime_arguments(parser, distributed=False)


def _check_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  """Exits through ``parser.error`` for an option out of its range."""
  runtime.check_positive(
    parser, flags={'--img-size': args.image_size, '--batch-size': args.batch_size}
  )
  if not 0 <= args.conf_thres < 1:
    parser.error(f'--conf-thres must lie in [0, 1), got {args.conf_thres}')
  if not 0 <= args.iou_thres <= 1:
    parser.error(f'--iou-thres must lie in [0, 1], got {args.iou_thres}')
  if args.max_det < 10:
    parser.error(
      f'--max-det must be at least 10 (COCO also scores recall at 1 and 10), got {args.max_det}'
    )
  if args.max_candidates < args.max_det:
    parser.error(
      f'--max-candidates ({args.max_candidates}) must be at least --max-det ({args.max_det})'
    )


def _rows(plan: validation.Plan, outcome: validation.Outcome) -> list[dict[str, Any]]:
  """The table's rows (``COLUMNS``): the all row, then each class with labels."""
  metrics = outcome.metrics
  rows = [
    {
      'class': 'all',
      'images': outcome.seen,
      'labels': int(metrics['num_targets']),
      **{k: metrics[k] for k in ('precision', 'recall', 'map50', 'map50_95')},
    }
  ]
  for category, values in outcome.classes.items():
    rows.append(
      {
        'class': plan.split.names[category],
        'images': outcome.seen,
        'labels': int(values['labels']),
        **{k: values[k] for k in ('precision', 'recall', 'map50', 'map50_95')},
      }
    )
  return rows


def _write(path: Path, text: str) -> None:
  """Writes ``text`` to ``path`` through a temporary file renamed at the end."""
  partial = path.with_name(path.name + '.partial')
  partial.write_text(text)
  os.replace(partial, path)


def _csv(rows: list[dict[str, Any]]) -> str:
  out = io.StringIO()
  writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator='\n')
  writer.writeheader()
  for row in rows:
    writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in row.items()})
  return out.getvalue()


def run(args: argparse.Namespace) -> int:
  """Runs ``val``; returns the exit status (see the module docstring)."""
  parser = args.command_parser
  _check_flags(parser, args)
  runtime.start(args)

  import jax

  devices = jax.device_count()
  if args.batch_size is not None and args.batch_size % devices:
    parser.error(f'--batch-size {args.batch_size} is not a multiple of the {devices} devices')

  from reorg_jax import evaluate
  from reorg_jax.data.dataset import DatasetError
  from reorg_jax.program import validation
  from reorg_jax.program import weights as weights_lib

  try:
    plan = validation.prepare(
      weights=args.weights,
      data=args.data,
      model=args.model,
      image_size=args.image_size,
      batch_size=args.batch_size,
      max_detections=args.max_det,
      split_name=args.task,
      save_json=args.save_json,
      workdir=args.workdir,
    )
  except (validation.BadInput, DatasetError, weights_lib.WeightsError) as error:
    return runtime.fail(error, status=2)
  split = plan.split
  print(
    f'validating {plan.weights.path} ({plan.weights.kind}, {plan.weights.entry} weights; '
    f'{plan.model_name}, {split.num_classes} classes) on the {len(split)} {args.task} images of '
    f'{plan.data_path} at {plan.image_size} px',
    flush=True,
  )
  if split.counts is not None:
    print(split.counts.line(args.task), flush=True)
  try:
    outcome = validation.validate(
      plan,
      score_threshold=args.conf_thres,
      iou_threshold=args.iou_thres,
      max_detections=args.max_det,
      max_candidates=args.max_candidates,
      save_json=args.save_json,
      progress=('%20s' + '%12s' * 6) % HEADER,
    )
  except DatasetError as error:  # an image that can no longer be read
    return runtime.fail(error, status=2)

  rows = _rows(plan, outcome)
  lines = [('%20s' + '%12s' * 6) % HEADER]
  for row in rows[: None if args.verbose else 1]:
    lines.append(
      ROW_FORMAT % (row['class'], row['images'], row['labels'], *(row[k] for k in COLUMNS[3:]))
    )
  per_image = [1e3 * s / max(outcome.seen, 1) for s in outcome.seconds]
  size = plan.image_size
  lines.append(
    f'Speed: {per_image[0]:.1f}/{per_image[1]:.1f}/{sum(per_image):.1f} ms inference/NMS/total '
    f'per {size}x{size} image at batch-size {plan.batch_size}'
  )
  print('\n'.join(lines), flush=True)

  workdir = Path(args.workdir)
  written = ['results.csv', 'results.txt']
  if args.save_json:
    if outcome.ground_truth['annotations']:
      _, summary = evaluate.coco_summary(outcome.ground_truth, outcome.scored)
      summary_lines = [
        f'pycocotools on {workdir / "detections.json"} against the {args.task} labels '
        f"(each image's own pixels, at most 100 detections per image):",
        summary,
      ]
    else:
      summary_lines = ['pycocotools: no labels in the split to score detections.json against']
    print('\n'.join(summary_lines), flush=True)
    lines += summary_lines
    written.append('detections.json')
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    _write(workdir / 'results.csv', _csv(rows))
    _write(workdir / 'results.txt', '\n'.join(lines) + '\n')
    if args.save_json:
      _write(workdir / 'detections.json', json.dumps(outcome.detections))
  except OSError as error:
    return runtime.fail(f'cannot write the results to {workdir}: {error}', status=1)
  print(f'results saved to {workdir} ({", ".join(written)})', flush=True)
  return 0
