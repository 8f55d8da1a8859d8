"""Exporting trained weights for deployment, as ``reorg-jax export`` does: check, reparameterise, write.

Glossary: ``B`` batch (symbolic in the exported programs), ``S`` image side,
``C`` classes, ``R`` decoded rows (boxes) per image, ``F = 5 + C``.

:func:`prepare` reads and checks everything before any work (the formats and
what they need installed, the weights, the model, the size) and returns a
:class:`Plan` holding the deploy model (:func:`reorg_jax.models.deploy.deploy`),
raising :class:`BadInput` (one line) for what cannot be used. :func:`write`
writes each :class:`Format` into a staging folder inside the work directory
and moves the results into place only once all of them are written.

The exported programs (``onnx``, ``stablehlo``) are the deploy model's
evaluation-mode forward pass with its weights as constants: input ``images``
``[B, S, S, 3]`` float32, RGB scaled to ``[0, 1]`` (letterboxed, as for
``predict``), NHWC; output ``[B, R, F]``: box centre ``x, y`` and size ``w,
h`` in input pixels, objectness, ``C`` class probabilities (what
:func:`reorg_jax.models.inference.predict` selects detections from). ``B`` is
symbolic in both.

The ONNX graph comes from ``jax2onnx``. Its Flax ``max_pool`` handler takes
only ``'SAME'``/``'VALID'`` padding and its ``reduce_window_max`` handler
emits a pooling the runtimes refuse, so the model's max-pools are traced
through a method interceptor as an explicit ``-inf`` pad followed by a
``'VALID'`` ``max_pool``: the same values, exported as ONNX ``Pad`` and ``MaxPool``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import importlib
import io
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the program's --help imports this module; jax and the models load on use
  import jax

  from reorg_jax.models import yolo
  from reorg_jax.program import weights as weights_lib

__all__ = [
  'DEFAULT_IMAGE_SIZE',
  'DEFAULT_OPSET',
  'DEFAULT_PLATFORMS',
  'EXPORT_EXTRA',
  'PLATFORMS',
  'SUMMARY_FILE',
  'BadInput',
  'ExportError',
  'Format',
  'Plan',
  'forward',
  'parse_formats',
  'parse_platforms',
  'prepare',
  'write',
]

DEFAULT_IMAGE_SIZE = 640  # upstream's export.py
DEFAULT_OPSET = 17  # read by onnxruntime, TensorRT 8.6 and later, OpenVINO
DEFAULT_PLATFORMS = ('cpu', 'cuda', 'tpu')
PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')  # what jax.export lowers for
EXPORT_EXTRA = "pip install 'reorg-jax[export]'"
SUMMARY_FILE = 'export.json'
INPUT_NAME, OUTPUT_NAME = 'images', 'output'


class BadInput(ValueError):
  """Input found unusable before anything is written (exit status 2)."""


class ExportError(RuntimeError):
  """A converter failed or a file could not be written (exit status 1)."""


class Format(enum.Enum):
  """What ``--include`` names; the value is the name."""

  DEPLOY = 'deploy'
  ONNX = 'onnx'
  STABLEHLO = 'stablehlo'


# format -> (what it writes in the work directory, the modules it needs)
_PRODUCTS: dict[Format, tuple[str, tuple[str, ...]]] = {
  Format.DEPLOY: ('deploy', ()),
  Format.ONNX: ('model.onnx', ('jax2onnx', 'onnx')),
  Format.STABLEHLO: ('model.stablehlo', ()),
}


def parse_formats(text: str) -> tuple[Format, ...]:
  """``'deploy,onnx'`` -> the formats, in the order given, each once.

  Raises:
    BadInput: an empty list or an unknown name.
  """
  names = [name.strip() for name in text.split(',') if name.strip()]
  known = {f.value: f for f in Format}
  unknown = [name for name in names if name not in known]
  if unknown or not names:
    raise BadInput(
      f'--include {text!r}: unknown format {", ".join(map(repr, unknown)) or "(none given)"}; '
      f'known: {", ".join(known)}'
    )
  return tuple(dict.fromkeys(known[name] for name in names))


def parse_platforms(text: str) -> tuple[str, ...]:
  """``'cpu,cuda'`` -> the platforms ``jax.export`` lowers for, each once.

  Raises:
    BadInput: an empty list or a platform outside :data:`PLATFORMS`.
  """
  names = [name.strip() for name in text.split(',') if name.strip()]
  unknown = [name for name in names if name not in PLATFORMS]
  if unknown or not names:
    raise BadInput(
      f'--platforms {text!r}: unknown platform {", ".join(map(repr, unknown)) or "(none given)"}; '
      f'known: {", ".join(PLATFORMS)}'
    )
  return tuple(dict.fromkeys(names))


@dataclasses.dataclass(frozen=True)
class Plan:
  """Everything :func:`write` needs, read and checked.

  Attributes:
    weights: the ``--weights`` read (EMA weights where there are some).
    model_name: the training model, in words.
    deploy_model: the reparameterised model (``Detect`` head).
    deploy_variables: its ``{'params', 'batch_stats'}``.
    deploy_config: its model file (a mapping).
    class_names: ``C`` names (the file's, else ``'0'``, ``'1'``, ... as upstream).
    formats: what to write, in order.
    image_size: ``S`` of the exported programs.
    platforms: what the StableHLO program is lowered for.
    opset: the ONNX opset.
    workdir: where the results go.
  """

  weights: weights_lib.Weights
  model_name: str
  deploy_model: yolo.YOLO
  deploy_variables: dict[str, Any]
  deploy_config: dict[str, Any]
  class_names: tuple[str, ...]
  formats: tuple[Format, ...]
  image_size: int
  platforms: tuple[str, ...]
  opset: int
  workdir: Path


def _check_installed(formats: Sequence[Format]) -> None:
  for fmt in formats:
    missing = []
    for module in _PRODUCTS[fmt][1]:
      try:
        importlib.import_module(module)
      except ImportError:
        missing.append(module)
    if missing:
      raise BadInput(
        f'--include {fmt.value} needs {" and ".join(_PRODUCTS[fmt][1])}; '
        f'{" and ".join(missing)} cannot be imported here: {EXPORT_EXTRA}'
      )


def _last_layer(weights: weights_lib.Weights) -> str | None:
  """The module name of the last row of the model file the weights carry, if any."""
  spec = weights.model_yaml
  if not isinstance(spec, Mapping):
    return None
  rows = spec.get('head')
  if isinstance(rows, list) and rows and isinstance(rows[-1], (list, tuple)) and len(rows[-1]) == 4:
    return str(rows[-1][2])
  return None


def _training_config(weights: weights_lib.Weights, model: str | None) -> dict[str, Any]:
  """The model file (a mapping) the training model was built from."""
  from reorg_jax.models import from_yaml, yolo

  spec = model if model is not None else weights.model_yaml
  if spec == 'p6_nano':
    return from_yaml.load_config(yolo.NANO_CONFIG)
  if isinstance(spec, Mapping):
    return dict(spec)
  return from_yaml.load_config(Path(spec))  # network.build_model read it already


def prepare(
  *,
  weights: str | os.PathLike,
  model: str | None,
  formats: Sequence[Format],
  image_size: int | None,
  platforms: Sequence[str],
  opset: int,
  workdir: str | os.PathLike,
) -> Plan:
  """Reads and checks the formats, weights, model and size; reparameterises; writes nothing.

  Args:
    weights: ``--weights`` (see :func:`reorg_jax.program.weights.read`; EMA
      weights where there are some): a training model, ``IAuxDetect`` head.
    model: ``'p6_nano'`` or a model YAML; ``None``: what the weights carry.
    formats: what will be written.
    image_size: ``S``; ``None``: :data:`DEFAULT_IMAGE_SIZE`.
    platforms: for ``stablehlo``.
    opset: for ``onnx``.
    workdir: where the results will go.

  Raises:
    BadInput: any of them unusable (one line): a format whose converter is not
      installed (naming what to install), weights without the auxiliary head
      or of another model (saying what was found), a size the model cannot take.
    reorg_jax.program.weights.WeightsError: the weights unreadable.
  """
  from reorg_jax.program import network
  from reorg_jax.program import weights as weights_lib

  workdir = Path(workdir)
  if workdir.exists() and not workdir.is_dir():
    raise BadInput(f'--workdir {workdir} exists and is not a folder')
  _check_installed(formats)
  read = weights_lib.read(weights, use_ema=True)
  try:
    return _plan(
      read,
      model=model,
      formats=formats,
      image_size=image_size,
      platforms=platforms,
      opset=opset,
      workdir=workdir,
    )
  except network.BadInput as error:
    raise BadInput(str(error)) from None


def _plan(
  read: weights_lib.Weights,
  *,
  model: str | None,
  formats: Sequence[Format],
  image_size: int | None,
  platforms: Sequence[str],
  opset: int,
  workdir: Path,
) -> Plan:
  """:func:`prepare` once the weights are read."""
  from reorg_jax.models import deploy
  from reorg_jax.models.detect import IAuxDetect
  from reorg_jax.program import network

  if read.deploy:
    found = _last_layer(read)
    ends = f', its model ends in {found}' if found else ''
    raise BadInput(
      f'--weights {read.path} ({read.kind}) has no auxiliary head{ends}: export '
      'reparameterises a P6 training model (IAuxDetect head); give its training checkpoint or run'
    )
  classes = network.class_count(read) or network.head_class_count(read.state_dict)
  if classes is None:
    raise BadInput(f'--weights {read.path} ({read.kind}) does not say its number of classes')
  network_model, model_name = network.build_model(read, model=model, num_classes=classes)
  if network_model.head.module is not IAuxDetect:
    raise BadInput(
      f'{model_name} ends in {network_model.head.name}, not IAuxDetect: export reparameterises '
      'a P6 training model; give its training model file'
    )
  size = DEFAULT_IMAGE_SIZE if image_size is None else image_size
  if size < 1 or size % network_model.max_stride:
    raise BadInput(
      f"--img-size {size} is not a positive multiple of {model_name}'s largest stride "
      f'{network_model.max_stride}'
    )
  variables = network.fill(read, network_model, model_name=model_name)
  deploy_model, deploy_variables = deploy.deploy(network_model, variables)
  anchors = [[v for pair in level for v in pair] for level in network_model.anchors]
  deploy_file = deploy.deploy_config(
    _training_config(read, model), num_classes=classes, anchors=anchors
  )
  names = read.class_names or tuple(str(c) for c in range(classes))
  return Plan(
    weights=read,
    model_name=model_name,
    deploy_model=deploy_model,
    deploy_variables=deploy_variables,
    deploy_config=deploy_file,
    class_names=tuple(names),
    formats=tuple(formats),
    image_size=size,
    platforms=tuple(platforms),
    opset=opset,
    workdir=workdir,
  )


def _explicit_pools(next_fun, args, kwargs, context):
  """Method interceptor: :class:`~reorg_jax.models.layers.MaxPool` as a ``-inf`` pad and a
  ``'VALID'`` ``nn.max_pool`` (equal values; see the module docstring)."""
  import flax.linen as nn
  import jax.numpy as jnp

  from reorg_jax.models import layers

  module = context.module
  if not (isinstance(module, layers.MaxPool) and context.method_name == '__call__'):
    return next_fun(*args, **kwargs)
  (x,) = args
  pad = module.padding
  x = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=-jnp.inf)
  return nn.max_pool(
    x,
    window_shape=(module.window, module.window),
    strides=(module.strides, module.strides),
    padding='VALID',
  )


def forward(plan: Plan, *, explicit_pools: bool = False):
  """The exported function: ``images [B, S, S, 3] -> [B, R, F]``, the weights as constants.

  Args:
    plan: from :func:`prepare`.
    explicit_pools: trace the max-pools as ``jax2onnx`` converts them.
  """
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  model = plan.deploy_model
  variables = jax.tree.map(jnp.asarray, plan.deploy_variables)

  def run(images: jax.Array) -> jax.Array:
    if not explicit_pools:
      return model.apply(variables, images, train=False)
    with nn.intercept_methods(_explicit_pools):
      return model.apply(variables, images, train=False)

  return run


def _input_shape(plan: Plan, batch: Any) -> tuple[Any, ...]:
  size = plan.image_size
  return (batch, size, size, plan.deploy_model.in_channels)


def _write_deploy(plan: Plan, folder: Path) -> None:
  from reorg_jax.models import convert, deploy, torch_save
  from reorg_jax.program import weights as weights_lib

  folder.mkdir()
  model = plan.deploy_model
  state = convert.export_state_dict(model, plan.deploy_variables)
  header = (
    f'Deploy model of {plan.model_name} (reorg-jax export): the auxiliary head removed, the\n'
    "implicit layers folded into the lead head's convs; anchors and classes of the weights."
  )
  (folder / weights_lib.DEPLOY_MODEL).write_text(
    deploy.config_text(plan.deploy_config, header=header)
  )
  torch_save.save_state_dict(state, folder / weights_lib.DEPLOY_STATE)
  meta = {
    'format': weights_lib.DEPLOY_FORMAT,
    'class_names': list(plan.class_names),
    'source': {
      'weights': str(plan.weights.path),
      'kind': plan.weights.kind,
      'entry': plan.weights.entry,
      'model': plan.model_name,
    },
  }
  (folder / weights_lib.DEPLOY_META).write_text(json.dumps(meta, indent=2) + '\n')


@functools.cache
def _quiet_converter() -> None:
  """The converter logs a traceback for each optional plugin it cannot import, and warnings."""
  for name in ('jax2onnx', 'onnx_ir'):
    logging.getLogger(name).setLevel(logging.ERROR)


def _write_onnx(plan: Plan, path: Path) -> None:
  import jax2onnx
  import onnx

  _quiet_converter()
  with contextlib.redirect_stdout(io.StringIO()):  # some versions print debugging lines
    proto = jax2onnx.to_onnx(
      forward(plan, explicit_pools=True),
      inputs=[_input_shape(plan, 'B')],
      model_name='reorg_jax_deploy',
      opset=plan.opset,
      input_names=[INPUT_NAME],
      output_names=[OUTPUT_NAME],
    )
  onnx.helper.set_model_props(proto, {key: json.dumps(v) for key, v in _summary(plan).items()})
  onnx.checker.check_model(proto)
  onnx.save_model(proto, str(path))


def _write_stablehlo(plan: Plan, path: Path) -> None:
  import jax
  import jax.numpy as jnp
  from jax import export

  (batch,) = export.symbolic_shape('B')
  images = jax.ShapeDtypeStruct(_input_shape(plan, batch), jnp.float32)
  exported = export.export(jax.jit(forward(plan)), platforms=plan.platforms)(images)
  path.write_bytes(exported.serialize())


_WRITERS = {
  Format.DEPLOY: _write_deploy,
  Format.ONNX: _write_onnx,
  Format.STABLEHLO: _write_stablehlo,
}


def _summary(plan: Plan) -> dict[str, Any]:
  """What the exported programs take and give (``export.json``, ONNX metadata)."""
  from reorg_jax.program import config as config_lib

  model = plan.deploy_model
  rows = config_lib.boxes_per_image(model, image_size=plan.image_size)
  return {
    'class_names': list(plan.class_names),
    'image_size': plan.image_size,
    'strides': list(model.strides),
    'anchors': [[v for pair in level for v in pair] for level in model.anchors],
    'input': {
      'name': INPUT_NAME,
      'shape': list(_input_shape(plan, 'B')),
      'dtype': 'float32',
      'layout': 'NHWC, RGB scaled to [0, 1], letterboxed',
    },
    'output': {
      'name': OUTPUT_NAME,
      'shape': ['B', rows, 5 + model.num_classes],
      'dtype': 'float32',
      'layout': 'box centre x, y and size w, h in input pixels, objectness, class probabilities',
    },
  }


def _move(source: Path, target: Path, *, trash: Path) -> None:
  """Puts ``source`` at ``target``; a ``target`` already there goes to ``trash`` first."""
  if target.is_dir() and not target.is_symlink():
    os.replace(target, trash / f'replaced-{target.name}')
  os.replace(source, target)


def write(plan: Plan) -> tuple[Path, ...]:
  """Writes every format of the plan and ``export.json``; their paths.

  Everything is written into a staging folder inside the work directory
  first, and moved into place (replacing earlier results of the same names)
  only when all of it is written; on failure nothing of it stays.

  Raises:
    ExportError: a converter failed, or a file could not be written (one line).
  """
  workdir = plan.workdir
  created = not workdir.exists()
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix='.export-', dir=workdir))
  except OSError as error:
    raise ExportError(f'cannot write to {workdir}: {error}') from None
  try:
    names = []
    for fmt in plan.formats:
      name = _PRODUCTS[fmt][0]
      try:
        _WRITERS[fmt](plan, staging / name)
      except OSError as error:
        raise ExportError(f'cannot write {workdir / name}: {error}') from None
      except Exception as error:  # a converter's failure, reported in one line
        detail = ' '.join(str(error).split())[:500]
        raise ExportError(f'{fmt.value}: {type(error).__name__}: {detail}') from None
      names.append(name)
    summary = {
      'source': {
        'weights': str(plan.weights.path),
        'kind': plan.weights.kind,
        'entry': plan.weights.entry,
        'model': plan.model_name,
      },
      'files': {fmt.value: name for fmt, name in zip(plan.formats, names, strict=True)},
      **_summary(plan),
    }
    if Format.STABLEHLO in plan.formats:
      summary['platforms'] = list(plan.platforms)
    if Format.ONNX in plan.formats:
      summary['opset'] = plan.opset
    try:
      (staging / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + '\n')
      for name in (*names, SUMMARY_FILE):
        _move(staging / name, workdir / name, trash=staging)
    except OSError as error:
      raise ExportError(f'cannot write the results to {workdir}: {error}') from None
  finally:
    shutil.rmtree(staging, ignore_errors=True)
    if created and workdir.is_dir() and not any(workdir.iterdir()):
      workdir.rmdir()
  return tuple(workdir / name for name in (*names, SUMMARY_FILE))
