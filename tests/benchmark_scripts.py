"""The benchmark scripts the tests run, and the tiny run they train.

``benchmarks/`` is not a package: :func:`load` imports one of its scripts by
path. :data:`TINY_RUN` is the override YAML of the agreement tests: the demo
recipe on 8 synthetic images of 128 px, batch 2, half the samples mosaics, with
:data:`FLAT_LOSS`.
"""

from __future__ import annotations

import importlib.util
import pathlib
from types import ModuleType

import yaml

from reorg_jax import testing

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The loss's speed settings with one branch to compile (reorg_jax.testing.ONE_BRANCH), as a
# run's ``loss`` section (YAML lists). Measured: a few-convolution P6 model's step compiled in
# 17.5 s instead of 53.6 s, p6_nano's at 256 px in 46 s instead of 85 s.
FLAT_LOSS = {k: list(v) if isinstance(v, tuple) else v for k, v in testing.ONE_BRANCH.items()}
TINY_RUN = f"""\
synthetic: {{num_train: 8, num_val: 4, image_size: 128}}
train: {{batch_size: 2, image_size: 128}}
augment: {{mosaic: 0.5, scale: 0.5}}
eval: {{batch_size: 4}}
loss: {yaml.safe_dump(FLAT_LOSS, default_flow_style=True).strip()}
log: {{plots: false}}
"""


def load(name: str) -> ModuleType:
  """``benchmarks/<name>.py`` as a module."""
  spec = importlib.util.spec_from_file_location(name, ROOT / 'benchmarks' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
