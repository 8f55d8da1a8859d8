"""``reorg-jax detect`` and ``reorg-jax export`` on a trained run, against upstream's own pipeline.

Glossary: ``S`` the input side (``--img-size``), ``R`` decoded rows (boxes)
per image, ``F = 5 + C`` (box centre and size in input pixels, objectness,
``C`` class probabilities). Decoded outputs are compared divided by their
scale (stride for centres, anchor for sizes, 1 for probabilities), as
``tests/test_export.py`` compares them.

From ``--weights`` (a run directory of ours, its EMA weights, as ``detect``
and ``export`` take them) and ``--source`` (images; by default the run's
validation images, when its dataset YAML can be read):

1. **export**: ``reorg-jax export --include deploy,onnx --img-size S`` into
   ``<out>/export`` (in this process, its own output in ``<out>/export.log``);
2. **detect**: upstream's training ``Model`` holding the run's EMA weights
   (the state dict ``reorg-jax`` exports, loaded with ``strict=True``), fused
   as upstream's ``attempt_load`` fuses it, runs upstream's pipeline on the
   source (``LoadImages``, the model, ``non_max_suppression`` with an exact
   greedy suppression for torchvision's, ``scale_coords``:
   :mod:`reorg_jax.reference.detect_check`); ``reorg-jax detect`` runs on the
   same source into ``<out>/detect``. Per image the same classes in the same
   order, and the largest difference of a box coordinate (pixels) and of a
   score over all images;
3. **deploy**: on the first ``--images`` source images letterboxed to
   ``S x S`` (upstream's ``letterbox``), upstream's ``Model`` of the written
   ``deploy/model.yaml`` loading ``deploy/weights.pt`` with ``strict=True``
   against our deploy model (the deploy checkpoint read back as ``detect``
   reads it), and upstream's fused training model against both;
4. **onnx**: onnxruntime on ``model.onnx`` against our deploy model on the
   same images; its inputs' and outputs' names and shapes (``B`` symbolic)
   and its size.

One line per figure, the last::

  deploy_check: size=<S> images=<n> boxes=<k> box_err_px=<a> score_err=<b> deploy_err=<c> training_err=<d> onnx_err=<e> onnx_mb=<f>

``deploy_err`` is upstream's deploy model against ours, ``training_err``
upstream's fused training model against our deploy model, ``onnx_err``
onnxruntime against our deploy model. Exit status 0; 1 when an image's
detections differ in number or classes from upstream's (each named), or a
command fails (its error printed); 2 for bad options.

    python benchmarks/deploy_check.py --weights runs/shapes
    python benchmarks/deploy_check.py --weights runs/shapes --source datasets/shapes/images/val \\
      --img-size 640 --out runs/deploy_check

Needs the test extra (torch and the reference package) and the export extra
(jax2onnx, onnx, onnxruntime).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import pathlib
import sys
import warnings
from typing import Any

import numpy as np

DEFAULT_IMAGE_SIZE = 128
DEFAULT_IMAGES = 4  # letterboxed source images of the decoded-output comparisons


def default_source(run: pathlib.Path) -> pathlib.Path | None:
  """The first validation source of the run's dataset when it is a folder, else ``None``."""
  from reorg_jax.data import dataset
  from reorg_jax.program import network

  try:
    data = network.run_options(run)['data']
    data = pathlib.Path(data) if data else run / 'data' / 'data.yaml'  # None: synthetic
    if not data.is_file():
      return None
    sources = dataset.read_data_config(data).val
  except (network.BadInput, dataset.DatasetError):
    return None
  return sources[0] if sources[0].is_dir() else None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  from reorg_jax.reference import detect_check

  parser = argparse.ArgumentParser(
    description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument('--weights', required=True, help='a run directory of ours (EMA weights)')
  parser.add_argument(
    '--source', help="images (a folder, an image or a glob); default: the run's validation images"
  )
  parser.add_argument(
    '--img-size', type=int, default=DEFAULT_IMAGE_SIZE, help='S (default: %(default)s)'
  )
  parser.add_argument(
    '--conf-thres', type=float, default=detect_check.DEFAULT_CONF, help='(default: %(default)s)'
  )
  parser.add_argument(
    '--iou-thres', type=float, default=detect_check.DEFAULT_IOU, help='(default: %(default)s)'
  )
  parser.add_argument(
    '--images',
    type=int,
    default=DEFAULT_IMAGES,
    help='source images of the decoded-output comparisons (default: %(default)s)',
  )
  parser.add_argument('--out', default='runs/deploy_check', help='output directory')
  args = parser.parse_args(argv)
  if args.images < 1:
    parser.error(f'--images must be >= 1, got {args.images}')
  if args.source is None:
    found = default_source(pathlib.Path(args.weights))
    if found is None:
      parser.error(
        f'--source is needed: the dataset YAML of --weights {args.weights} cannot be read or '
        'its validation images are not a folder'
      )
    args.source = str(found)
  return args


def command(argv: list[str], log: pathlib.Path) -> int:
  """``reorg-jax ARGV`` in this process, its output into ``log``; prints its errors on failure."""
  from reorg_jax.program import cli

  buffer = io.StringIO()
  with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
    status = cli.main(argv)
  log.write_text(buffer.getvalue())
  if status:
    errors = [line for line in buffer.getvalue().splitlines() if line.startswith('error')]
    print(f'reorg-jax {argv[0]} failed (exit status {status}): {" ".join(errors)} ({log})')
  return status


def letterboxed(paths: list[pathlib.Path], *, size: int, stride: int) -> np.ndarray:
  """``[N, S, S, 3]`` float32 RGB in ``[0, 1]``: upstream's ``letterbox`` to ``S x S``."""
  import cv2
  from sas_yolov7.utils import datasets as upstream_data

  images = []
  for path in paths:
    image = cv2.imread(str(path))
    if image is None:
      raise SystemExit(f'error: {path} cannot be read as an image')
    boxed = upstream_data.letterbox(image, size, auto=False, stride=stride)[0]
    images.append(boxed[:, :, ::-1].astype(np.float32) / 255.0)
  return np.stack(images)


def compare_detect(
  ours_json: pathlib.Path, theirs: dict[tuple[str, int], np.ndarray]
) -> tuple[dict[str, Any], list[str]]:
  """Figures of ``detections.json`` against upstream's detections, and the images that differ."""
  from reorg_jax.reference import detect_check

  document = json.loads(ours_json.read_text())
  ours = {(pathlib.Path(r['file']).name, r['frame'] or 0): r for r in document['images']}
  problems = [f'{name} frame {frame}: not in upstream' for name, frame in ours.keys() - theirs]
  problems += [f'{name} frame {frame}: not in ours' for name, frame in theirs.keys() - ours]
  box_err = score_err = 0.0
  boxes = compared = 0
  for key in sorted(ours.keys() & theirs.keys()):
    try:
      box, score = detect_check.compare_detections(ours[key], theirs[key])
    except AssertionError as error:
      problems.append(str(error))
      continue
    box_err, score_err = max(box_err, box), max(score_err, score)
    boxes += len(theirs[key])
    compared += 1
  figures = {'images': compared, 'boxes': boxes, 'box_err': box_err, 'score_err': score_err}
  return figures, problems


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  logging.getLogger('absl').setLevel(logging.ERROR)  # orbax's notes on read-only checkpoints
  warnings.filterwarnings('ignore', message='torch.meshgrid')  # upstream's grid, at each size
  import jax
  import onnxruntime
  import torch
  from sas_yolov7.models.yolo import Model

  from reorg_jax.program import detection, network, weights
  from reorg_jax.reference import detect_check

  out = pathlib.Path(args.out).resolve()
  out.mkdir(parents=True, exist_ok=True)
  size, source = args.img_size, args.source
  try:
    read = weights.read(args.weights, use_ema=True)
    images, _ = detection.list_source(source)
  except (weights.WeightsError, detection.BadInput) as error:
    print(f'error: {error}', file=sys.stderr)
    return 2
  if not images:
    print(
      f'error: --source {source}: no images (the decoded outputs compare images)', file=sys.stderr
    )
    return 2
  print(
    f'weights: {read.path} ({read.kind}, {read.entry} weights); source: {source} '
    f'({len(images)} images); --img-size {size}'
  )

  # 1. export
  export_dir = out / 'export'
  argv = ['export', '--weights', str(args.weights), '--include', 'deploy,onnx']
  argv += ['--img-size', str(size), '--workdir', str(export_dir)]
  if command(argv, out / 'export.log'):
    return 1

  # 2. detect: upstream's pipeline on the run's EMA weights, and ours
  with contextlib.redirect_stdout(io.StringIO()):  # upstream's fuse() and LoadImages print
    fused = detect_check.upstream_model(read).fuse().eval()  # as upstream's attempt_load
    theirs = detect_check.upstream_pipeline(
      fused, source, image_size=size, conf_thres=args.conf_thres, iou_thres=args.iou_thres
    )
  detect_dir = out / 'detect'
  argv = ['detect', '--weights', str(args.weights), '--source', str(source)]
  argv += ['--img-size', str(size), '--workdir', str(detect_dir)]
  argv += ['--conf-thres', str(args.conf_thres), '--iou-thres', str(args.iou_thres)]
  if command(argv, out / 'detect.log'):
    return 1
  found, problems = compare_detect(detect_dir / 'detections.json', theirs)
  print(
    f'detect: {found["boxes"]} boxes of {found["images"]} images compared with upstream '
    f'(--conf-thres {args.conf_thres}, --iou-thres {args.iou_thres})'
  )
  print(f'detect: largest box difference {found["box_err"]:.3g} px')
  print(f'detect: largest score difference {found["score_err"]:.3g}')
  for problem in problems:
    print(f'detect: DIFFERS: {problem}')

  # 3. deploy: the written deploy files in upstream's Model, our deploy checkpoint read back
  deploy_dir = export_dir / 'deploy'
  deploy_read = weights.read(deploy_dir)
  deploy_model, name = network.build_model(
    deploy_read, model=None, num_classes=len(deploy_read.class_names)
  )
  variables = network.fill(deploy_read, deploy_model, model_name=name)
  batch = letterboxed(list(images[: args.images]), size=size, stride=deploy_model.max_stride)
  ours = np.asarray(jax.jit(lambda v, x: deploy_model.apply(v, x, train=False))(variables, batch))
  upstream_deploy = Model(str(deploy_dir / weights.DEPLOY_MODEL))
  upstream_deploy.load_state_dict(torch.load(deploy_dir / weights.DEPLOY_STATE), strict=True)
  deploy_out = detect_check.torch_decoded(upstream_deploy, batch)
  training_out = detect_check.torch_decoded(fused, batch)
  scale = detect_check.decoded_scale(deploy_model, (size, size))
  deploy_err = detect_check.largest_difference(deploy_out, ours, scale)
  training_err = detect_check.largest_difference(training_out, ours, scale)
  upstream_err = detect_check.largest_difference(deploy_out, training_out, scale)
  shown = f'{len(batch)} images at {size}x{size}, over stride/anchor'
  print(
    "deploy: upstream's Model(deploy/model.yaml) with deploy/weights.pt (strict) against our "
    f'deploy model: {deploy_err:.3g} ({shown})'
  )
  print(f"deploy: upstream's fused training model against our deploy model: {training_err:.3g}")
  print(f"deploy: upstream's deploy model against its training model: {upstream_err:.3g}")

  # 4. onnx
  onnx_path = export_dir / 'model.onnx'
  options = onnxruntime.SessionOptions()
  options.log_severity_level = 3
  session = onnxruntime.InferenceSession(
    str(onnx_path), options, providers=['CPUExecutionProvider']
  )
  (onnx_out,) = session.run(None, {session.get_inputs()[0].name: batch})
  onnx_err = detect_check.largest_difference(onnx_out, ours, scale)
  megabytes = onnx_path.stat().st_size / 1e6

  def shapes(values: list[Any]) -> str:
    return ', '.join(f'{v.name} [{", ".join(str(d) for d in v.shape)}]' for v in values)

  print(f'onnx: onnxruntime against our deploy model: {onnx_err:.3g}')
  print(f'onnx: inputs {shapes(session.get_inputs())}')
  print(f'onnx: outputs {shapes(session.get_outputs())}')
  print(f'onnx: model.onnx {megabytes:.1f} MB')
  print(
    f'deploy_check: size={size} images={found["images"]} boxes={found["boxes"]} '
    f'box_err_px={found["box_err"]:.3g} score_err={found["score_err"]:.3g} '
    f'deploy_err={deploy_err:.3g} training_err={training_err:.3g} onnx_err={onnx_err:.3g} '
    f'onnx_mb={megabytes:.1f}',
    flush=True,
  )
  return 1 if problems else 0


if __name__ == '__main__':
  sys.exit(main())
