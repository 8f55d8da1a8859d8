"""Detect objects in images, folders, globs and videos, and draw the boxes (upstream's detect.py).

--weights is anything val reads: a run directory of ours (its best
checkpoint, else its newest), one of its checkpoints, an upstream training
or deploy checkpoint (.pt, read without running any of its code), a deploy
checkpoint of ours, or a PyTorch state_dict file (with --model). Runs and
checkpoints detect with their EMA weights; upstream files with their 'ema'
entry when they have one, as upstream's attempt_load. Class names come from
--data, else from the weights (our run's dataset, the names pickled in an
upstream checkpoint), else they are the class indices.

--source is an image, a folder (its images and videos, not its subfolders),
a glob ('images/*.jpg', quoted; '**' recurses) or a video that OpenCV reads
(.mov .avi .mp4 .mpg .mpeg .m4v .wmv .mkv); images come first, then videos,
each sorted by path. Webcams and streams are not read.

Each image or frame is letterboxed as upstream's detect.py does: resized so
that its longer side is --img-size, then padded only to the next multiple of
the model's largest stride, so a non-square image gives a non-square input.
Images run one at a time, as upstream's; the network is compiled once for
each input shape met (at most 2 * img-size / stride - 1 shapes; a video's
frames share one) and kept for the run and in the compilation cache, so the
first image of each shape takes longer. Detections are selected as upstream's
non_max_suppression: per box its best class; objectness and score (objectness
times class probability) above --conf-thres; suppression within a class (any
class with --agnostic-nms) at --iou-thres; at most --max-det per image, best
first. The best candidates enter suppression first; an image that may need
more is selected again with all of them (up to --max-candidates), so the
result is that of suppression over every candidate, as upstream's. The
boxes are mapped to the image's own pixels as upstream's scale_coords does
and clipped to the image. On the same weights and images the boxes, classes
and scores are upstream's pipeline's (its letterbox, Model,
non_max_suppression and scale_coords) up to float rounding.

Written to --workdir (created if missing; files of an earlier detect with
the same names replaced, each file written complete or not at all):
  <name>            each image (or video, MPEG-4 at the source's frame rate)
                    with its boxes drawn and labelled 'name score', under the
                    source's file name (not with --nosave)
  labels/<stem>.txt with --save-txt, per image (<stem>_<frame>.txt per video
                    frame, from 1) that has detections, upstream's lines:
                    'class x y w h' (centre and size normalised to the image,
                    from the box rounded to whole pixels as upstream's), then
                    'conf' with --save-conf; lowest score first, as upstream
  detections.json   every image and frame: file, frame (null for an image),
                    height, width, the network input [h, w], the candidates
                    above the threshold, and its detections: class, name,
                    score, box [x1, y1, x2, y2] in the image's own pixels (to
                    1/1000 pixel); with the options used and the images that
                    could not be read

Exit status (every error is one line on stderr, no traceback):
  0  detected. Images that cannot be read are skipped and named in one line
     on stderr; the others are processed.
  1  a result could not be written (the path is named).
  2  bad input, found before anything is written: an option's range, a
     source with no image or video (or none of whose images can be read), a
     video OpenCV cannot read, the weights (missing, unreadable, of another
     architecture or class count), the model file, --data, an image size the
     model cannot take, a class out of range, a --workdir that holds a
     training run or the source's files, two source files of the same stem.
"""

from __future__ import annotations

import argparse
import os
import sys

from reorg_jax.program import runtime

__all__ = ['ORDER', 'SUMMARY', 'add_arguments', 'run']

ORDER = 3
SUMMARY = (
  "detect objects in images, folders and videos; draw and save the boxes (upstream's detect.py)"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """The options of ``detect``."""
  runtime.add_weights_argument(
    parser,
    help='a run directory of ours or one of its checkpoints (EMA weights), a deploy checkpoint, '
    'an upstream training or deploy checkpoint (.pt; its EMA when it has one), or a PyTorch '
    'state_dict file (give --model)',
  )
  parser.add_argument(
    '--source',
    required=True,
    metavar='PATH',
    help='an image, a folder of images and videos, a glob (quoted) or a video file',
  )
  runtime.add_data_argument(
    parser,
    help='a dataset YAML whose names (and nc) name the classes (default: the names the weights '
    'carry, else the class indices)',
  )
  runtime.add_model_argument(
    parser,
    help="'p6_nano' or a model YAML in upstream's format (default: the model the weights carry); "
    "the anchors are the file's",
  )
  runtime.add_image_size_argument(
    parser,
    help="the longer side of the network input in pixels, a multiple of the model's largest "
    'stride (default: for a run of ours, its train.image_size; else 640, as upstream)',
  )
  parser.add_argument(
    '--conf-thres',
    type=float,
    default=0.25,
    help='minimum objectness and score of a detection (default: %(default)s, as upstream)',
  )
  parser.add_argument(
    '--iou-thres',
    type=float,
    default=0.45,
    help='IoU above which non-maximum suppression drops the lower-scoring box of a class '
    '(default: %(default)s, as upstream)',
  )
  parser.add_argument(
    '--classes',
    type=int,
    nargs='+',
    metavar='C',
    help='keep only boxes whose best class is one of these indices (as upstream, before '
    'suppression)',
  )
  parser.add_argument(
    '--agnostic-nms', action='store_true', help='suppress overlapping boxes across classes'
  )
  parser.add_argument(
    '--max-det',
    type=int,
    default=300,
    help='detections kept per image, best first (default: %(default)s, as upstream)',
  )
  parser.add_argument(
    '--max-candidates',
    type=int,
    default=8192,
    help='the most boxes above --conf-thres entering non-maximum suppression per image: the '
    'best of them enter first, all of them (up to this bound) where fewer than --max-det are '
    'kept; upstream: 30000 (default: %(default)s)',
  )
  parser.add_argument(
    '--save-txt', action='store_true', help='write labels/<stem>.txt per image (upstream format)'
  )
  parser.add_argument(
    '--save-conf', action='store_true', help='with --save-txt, end each line with the score'
  )
  parser.add_argument(
    '--nosave', action='store_true', help='do not write the images and videos with boxes drawn'
  )
  runtime.add_workdir_argument(
    parser,
    default='runs/detect',
    help='where the images, videos, labels/ and detections.json go (default: %(default)s)',
  )
  runtime.add_runtime_arguments(parser, distributed=False)


def _count(n: int, one: str, many: str | None = None) -> str:
  """``1 image``, ``2 images``."""
  return f'{n} {one if n == 1 else many or one + "s"}'


def _check_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  """Exits through ``parser.error`` for an option out of its range."""
  runtime.check_positive(parser, flags={'--img-size': args.image_size})
  if not 0 <= args.conf_thres < 1:
    parser.error(f'--conf-thres must lie in [0, 1), got {args.conf_thres}')
  if not 0 <= args.iou_thres <= 1:
    parser.error(f'--iou-thres must lie in [0, 1], got {args.iou_thres}')
  if args.max_det < 1:
    parser.error(f'--max-det must be a positive integer, got {args.max_det}')
  if args.max_candidates < args.max_det:
    parser.error(
      f'--max-candidates ({args.max_candidates}) must be at least --max-det ({args.max_det})'
    )
  if args.save_conf and not args.save_txt:
    parser.error('--save-conf needs --save-txt')


def run(args: argparse.Namespace) -> int:
  """Runs ``detect``; returns the exit status (see the module docstring)."""
  parser = args.command_parser
  _check_flags(parser, args)
  # FFmpeg's own messages (a video it cannot parse) would add lines to the one error line.
  os.environ.setdefault('OPENCV_FFMPEG_LOGLEVEL', '-8')
  runtime.start(args)

  from reorg_jax.data.dataset import DatasetError
  from reorg_jax.program import detection
  from reorg_jax.program import weights as weights_lib

  try:
    plan = detection.prepare(
      weights=args.weights,
      source=args.source,
      data=args.data,
      model=args.model,
      image_size=args.image_size,
      classes=args.classes,
      workdir=args.workdir,
      writes_files=not args.nosave or args.save_txt,
    )
  except (detection.BadInput, DatasetError, weights_lib.WeightsError) as error:
    return runtime.fail(error, status=2)
  videos = f' and {_count(len(plan.videos), "video")}' if plan.videos else ''
  print(
    f'detecting with {plan.weights.path} ({plan.weights.kind}, {plan.weights.entry} weights; '
    f'{plan.model_name}, {len(plan.names)} classes named by {plan.names_from}) on '
    f'{_count(len(plan.images), "image")}{videos} of {args.source} at {plan.image_size} px',
    flush=True,
  )
  try:
    outcome = detection.run(
      plan,
      score_threshold=args.conf_thres,
      iou_threshold=args.iou_thres,
      max_detections=args.max_det,
      max_candidates=args.max_candidates,
      classes=args.classes,
      class_agnostic=args.agnostic_nms,
      save_images=not args.nosave,
      save_txt=args.save_txt,
      save_conf=args.save_conf,
      log=lambda line: print(line, flush=True),
    )
  except detection.BadInput as error:
    return runtime.fail(error, status=2)
  except OSError as error:
    return runtime.fail(f'cannot write the results to {plan.workdir}: {error}', status=1)
  notes = []
  if outcome.unreadable:
    notes.append(
      f'skipped {_count(len(outcome.unreadable), "image")} that cannot be read: '
      f'{detection.describe_files(outcome.unreadable)}'
    )
  if outcome.incomplete:
    incomplete = [f'{p} (frame {f})' if f else str(p) for p, f in outcome.incomplete]
    which = _count(len(incomplete), 'image or frame', 'images or frames')
    notes.append(
      f'{which} had more than --max-candidates {args.max_candidates} boxes above '
      '--conf-thres and fewer than --max-det kept: only the best '
      f'{args.max_candidates} entered suppression (raise --max-candidates or --conf-thres): '
      f'{detection.describe_files(incomplete)}'
    )
  for note in notes:
    print(f'warning: {note}', file=sys.stderr, flush=True)
  inference_s, nms_s = outcome.seconds
  count = outcome.images + outcome.frames
  frames = f' and {_count(outcome.frames, "video frame")}' if outcome.frames else ''
  print(
    f'{_count(outcome.detections, "detection")} in {_count(outcome.images, "image")}{frames}; '
    f'{1e3 * inference_s / count:.1f} ms inference, {1e3 * nms_s / count:.1f} ms NMS per image '
    f'(compilations included)',
    flush=True,
  )
  print(f'results saved to {plan.workdir} ({len(outcome.written)} files)', flush=True)
  return 0
