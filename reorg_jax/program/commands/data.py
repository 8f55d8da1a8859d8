"""Write datasets in upstream's layout.

`data synthetic` writes the built-in synthetic dataset (the one `train` uses
when no --data is given): shapes of 6 classes (box, frame, disc, ring,
triangle, cross) on textured backgrounds, as

  OUT/images/{train,val}/NNNNNN.png
  OUT/labels/{train,val}/NNNNNN.txt   one row per object: class cx cy w h
                                      (normalised), or with --polygons
                                      class x1 y1 x2 y2 ... (the outline)
  OUT/data.yaml                       train, val, nc, names

the format by example, and a real folder for the other commands (`train
--data OUT/data.yaml`, `val --data OUT/data.yaml`). The same options always
write the same files. The folder is written under a temporary name and
renamed when complete; an existing, non-empty OUT is an error.

Exit status: 0 written; 1 a write failed (disk full, read-only); 2 bad input.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from reorg_jax.program import runtime

__all__ = ['ORDER', 'SUMMARY', 'add_arguments', 'run']

ORDER = 1
SUMMARY = 'write the synthetic dataset in upstream layout (images/, labels/, data.yaml)'


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """The options of ``data``."""
  kinds = parser.add_subparsers(dest='kind', metavar='KIND', required=True)
  synth = kinds.add_parser(
    'synthetic',
    help='the built-in synthetic dataset',
    description='The built-in synthetic dataset (see `reorg-jax data --help`).',
  )
  synth.add_argument('--out', required=True, help='the dataset folder to create')
  synth.add_argument(
    '--num-train', type=int, default=480, help='training images (default: %(default)s)'
  )
  synth.add_argument(
    '--num-val', type=int, default=64, help='validation images (default: %(default)s)'
  )
  synth.add_argument(
    '--image-size', type=int, default=192, help='image side in pixels (default: %(default)s)'
  )
  synth.add_argument(
    '--seed', type=int, default=0, help='seeds the shapes and backgrounds (default: %(default)s)'
  )
  synth.add_argument(
    '--polygons',
    action='store_true',
    help="label rows are the shapes' outlines (segment labels), not boxes",
  )
  synth.set_defaults(kind_parser=synth)


def run(args: argparse.Namespace) -> int:
  """Runs ``data``; returns the exit status (see the module docstring)."""
  from reorg_jax.data import synthetic
  from reorg_jax.program import pieces

  parser = args.kind_parser
  for flag, value in (
    ('--num-train', args.num_train),
    ('--num-val', args.num_val),
    ('--image-size', args.image_size),
  ):
    if value < 1:
      parser.error(f'{flag} must be a positive integer, got {value}')
  if not 0 <= args.seed < 2**32:
    parser.error(f'--seed must lie in [0, 2**32), got {args.seed}')
  out = Path(args.out)
  if out.exists() and not (out.is_dir() and not any(out.iterdir())):
    return runtime.fail(f'--out {out} exists and is not an empty folder', status=2)
  try:
    pieces.write_synthetic(
      out,
      num_train=args.num_train,
      num_val=args.num_val,
      image_size=args.image_size,
      seed=args.seed,
      polygons=args.polygons,
    )
  except OSError as error:
    return runtime.fail(f'cannot write {out}: {error}', status=1)
  print(
    f'wrote {args.num_train} training and {args.num_val} validation images of '
    f'{args.image_size} px ({len(synthetic.CLASS_NAMES)} classes) to {out}; '
    f'dataset YAML {out / "data.yaml"}',
    flush=True,
  )
  return 0
