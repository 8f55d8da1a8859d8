"""Export trained weights for deployment: the reparameterised model, ONNX and StableHLO.

--weights is a training model with the auxiliary head (IAuxDetect): a run
directory of ours (its best checkpoint, else its newest) or one of its
checkpoints, an upstream training checkpoint (.pt, read without running any
of its code), or a PyTorch state_dict file (with --model). Runs and upstream
files are exported with their EMA weights, as val and detect use them.

Every format starts from the deploy model, the reparameterisation of
upstream's tools/reparameterization.ipynb for any P6 model file, class count
and anchors: the auxiliary head and every layer that only feeds it are
removed (the other layers renumbered, so the model file equals upstream's
cfg/deploy one for W6, E6, D6 and E6E), the lead head becomes Detect, and
each level's ImplicitA and ImplicitM are folded into its 1x1 convolution.
Its decoded outputs equal the training model's up to float rounding. The
anchors are the ones the weights were trained with (autoanchor re-fits
them), written into the deploy model file; upstream's notebook loses
re-fitted anchors of the P6 models, whose head moves to another layer.

--include names the formats (comma-separated); written to --workdir
(created if missing; earlier results of the same names replaced):
  deploy/          deploy (default): a deploy checkpoint that val and detect
                   read as --weights: model.yaml (the deploy model file, in
                   upstream's format), weights.pt (its PyTorch state_dict,
                   which upstream's Model(model.yaml) loads with strict=True;
                   written without PyTorch) and deploy.json (class names and
                   where the weights came from)
  model.onnx       onnx: the deploy model's forward pass (jax2onnx), opset
                   --opset, metadata with the class names, sizes and layouts
  model.stablehlo  stablehlo: the same forward pass as jax.export serialises
                   it, lowered for --platforms (a file made on a CPU serves
                   on a GPU or TPU host); load it with
                   jax.export.deserialize(bytearray(data)).call(images)
  export.json      what was exported from what, the class names, and the
                   programs' input and output

Both programs take `images` [B, S, S, 3] float32 (NHWC, RGB scaled to
[0, 1], letterboxed to S = --img-size) with B free, and give `output`
[B, R, 5 + C]: box centre x, y and size w, h in input pixels, objectness and
the C class probabilities (R boxes per image), the outputs detections are
selected from. onnx needs the export extra: pip install 'reorg-jax[export]'.

Exit status (every error is one line on stderr, no traceback):
  0  exported.
  1  a converter failed or the results could not be written (nothing of
     them is left behind).
  2  bad input, found before anything is written: an unknown format or
     platform, a format whose converter is not installed (naming what to
     install), weights that are not a P6 training model with the auxiliary
     head (saying what was found), unreadable weights, a model file that does
     not fit them, an image size the model cannot take.
"""

from __future__ import annotations

import argparse
import sys

from reorg_jax.program import runtime

__all__ = ['ORDER', 'SUMMARY', 'add_arguments', 'run']

ORDER = 4
SUMMARY = 'reparameterise trained weights for deployment; export ONNX and StableHLO'


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """The options of ``export``."""
  from reorg_jax.program import exporting

  runtime.add_weights_argument(
    parser,
    help='a training model (IAuxDetect head): a run directory of ours or one of its '
    'checkpoints, an upstream training checkpoint (.pt), or a PyTorch state_dict file '
    '(give --model); EMA weights where there are some',
  )
  runtime.add_model_argument(
    parser,
    help="'p6_nano' or a training model YAML in upstream's format (default: the model the "
    'weights carry); the anchors are the ones the weights hold',
  )
  parser.add_argument(
    '--include',
    default=exporting.Format.DEPLOY.value,
    metavar='FORMATS',
    help='comma-separated formats to write: '
    f'{", ".join(f.value for f in exporting.Format)} (default: %(default)s)',
  )
  runtime.add_image_size_argument(
    parser,
    help='input side of the onnx and stablehlo programs, a multiple of the largest stride '
    f'(default: {exporting.DEFAULT_IMAGE_SIZE})',
  )
  parser.add_argument(
    '--platforms',
    default=','.join(exporting.DEFAULT_PLATFORMS),
    help='stablehlo: comma-separated platforms to lower for, of '
    f'{", ".join(exporting.PLATFORMS)} (default: %(default)s)',
  )
  parser.add_argument(
    '--opset',
    type=int,
    default=exporting.DEFAULT_OPSET,
    help='onnx: the ONNX opset (default: %(default)s)',
  )
  runtime.add_workdir_argument(
    parser,
    default='runs/export',
    help='where the results go (default: %(default)s)',
  )


def run(args: argparse.Namespace) -> int:
  """Runs ``export``; returns the exit status (see the module docstring)."""
  from reorg_jax.program import exporting
  from reorg_jax.program import weights as weights_lib

  try:
    formats = exporting.parse_formats(args.include)
    platforms = exporting.parse_platforms(args.platforms)
    plan = exporting.prepare(
      weights=args.weights,
      model=args.model,
      formats=formats,
      image_size=args.image_size,
      platforms=platforms,
      opset=args.opset,
      workdir=args.workdir,
    )
  except (exporting.BadInput, weights_lib.WeightsError) as error:
    return runtime.fail(error, status=2)
  print(
    f'exporting {plan.weights.path} ({plan.weights.kind}, {plan.weights.entry} weights; '
    f'{plan.model_name}, {len(plan.class_names)} classes) as '
    f'{", ".join(f.value for f in plan.formats)}',
    flush=True,
  )
  try:
    written = exporting.write(plan)
  except exporting.ExportError as error:
    return runtime.fail(error, status=1)
  for path in written:
    print(f'  {path}', file=sys.stdout)
  print(f'exported to {plan.workdir}', flush=True)
  return 0
