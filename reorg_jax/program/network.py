"""The network a ``--weights`` path describes, built and filled for inference (``val``, ``detect``).

Glossary: ``C`` classes; a *state dict* maps PyTorch keys to arrays (see
:mod:`reorg_jax.program.weights`).

From :func:`reorg_jax.program.weights.read`'s :class:`~reorg_jax.program.weights.Weights`:

* :func:`class_count`: ``C`` when the file says (its class names, else its
  model's ``nc``); :func:`head_class_count`: ``C`` read off the detection
  head's tensors, for a plain state dict;
* :func:`build_model`: the model ``--model`` names or the file carries, with
  ``C`` classes and the file's anchors;
* :func:`fill`: its variables, every tensor from the file;
* :func:`run_options`: the image size and dataset a run of ours trained with
  (:data:`DEFAULT_IMAGE_SIZE` for other weights).

Each raises :class:`BadInput` (one line naming the file or option) for what
cannot be used.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from reorg_jax.models import convert, yolo
from reorg_jax.program import weights as weights_lib
from reorg_jax.training import assembly

__all__ = [
  'DEFAULT_IMAGE_SIZE',
  'BadInput',
  'build_model',
  'class_count',
  'fill',
  'head_class_count',
  'run_options',
]

# The input side when neither the command nor a run of ours says (upstream's test.py and detect.py).
DEFAULT_IMAGE_SIZE = 640


class BadInput(ValueError):
  """Input found unusable before anything is written (exit status 2)."""


def run_options(run: Path) -> dict[str, Any]:
  """``image_size`` and ``data`` (its YAML, ``None``: synthetic) a run of ours trained with."""
  import yaml

  try:
    options = yaml.safe_load((run / 'config.yaml').read_text())
    return {'image_size': int(options['train']['image_size']), 'data': options['data']['yaml']}
  except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError) as error:
    raise BadInput(f"{run / 'config.yaml'}: cannot read the run's options ({error})") from None


def class_count(weights: weights_lib.Weights) -> int | None:
  """``C`` of the weights when the file says (its class names, else its model's ``nc``)."""
  if weights.class_names is not None:
    return len(weights.class_names)
  if isinstance(weights.model_yaml, Mapping) and isinstance(weights.model_yaml.get('nc'), int):
    return weights.model_yaml['nc']
  return None


def head_class_count(state_dict: Mapping[str, np.ndarray]) -> int | None:
  """``C`` from the detection head's tensors: its first lead conv has ``A * (5 + C)`` outputs.

  The head is the layer holding the ``anchors`` buffer (``[L, A, 2]``);
  ``None`` when the state dict has no such head.
  """
  heads = [key[: -len('.anchors')] for key in state_dict if key.endswith('.anchors')]
  if len(heads) != 1 or f'{heads[0]}.m.0.weight' not in state_dict:
    return None
  anchors = np.shape(state_dict[f'{heads[0]}.anchors'])
  outputs = np.shape(state_dict[f'{heads[0]}.m.0.weight'])[0]
  if len(anchors) != 3 or not anchors[1] or outputs % anchors[1] or outputs // anchors[1] < 6:
    return None
  return outputs // anchors[1] - 5


def build_model(
  weights: weights_lib.Weights, *, model: str | None, num_classes: int
) -> tuple[yolo.YOLO, str]:
  """The model ``--model`` or the weights name, with ``C`` classes and the file's anchors.

  Args:
    weights: from :func:`reorg_jax.program.weights.read`.
    model: ``--model``: ``'p6_nano'`` or a model YAML; ``None``: what the weights carry.
    num_classes: ``C``.

  Returns:
    ``(model, what it is in words)``.
  """
  anchors = None
  if any(key.endswith('.anchor_grid') for key in weights.state_dict):
    try:
      anchors = convert.anchors_from_state_dict(weights.state_dict)
    except ValueError as error:
      raise BadInput(f'--weights {weights.path}: {error}') from None
  if model is not None:
    spec, origin = model, f'--model {model}'
  elif weights.model_yaml is not None:
    spec, origin = weights.model_yaml, f'the model of --weights {weights.path}'
  else:
    raise BadInput(
      f'--weights {weights.path} ({weights.kind}) carries no model definition: give --model'
    )
  try:
    if spec == 'p6_nano':
      return yolo.p6_nano(num_classes=num_classes, anchors=anchors), 'p6_nano'
    if isinstance(spec, Mapping):
      return yolo.build_model(spec, num_classes=num_classes, anchors=anchors), origin
    if not Path(spec).is_file():
      raise BadInput(f"--model must be 'p6_nano' or a model YAML file, got {spec!r} (no such file)")
    return yolo.build_model(Path(spec), num_classes=num_classes, anchors=anchors), spec
  except BadInput:
    raise
  except (OSError, ValueError) as error:
    raise BadInput(f'{origin}: {error}') from None


def fill(weights: weights_lib.Weights, model: yolo.YOLO, *, model_name: str) -> dict[str, Any]:
  """The model's ``{'params', 'batch_stats'}``, every tensor from ``weights``.

  A deploy file has no aux head, which inference does not run: its tensors
  are left as initialised.

  Raises:
    BadInput: tensors of the model missing from the file or of other shapes
      (naming them).
  """
  moved = weights_lib.transfer(weights, model, assembly.zero_variables(model))
  skipped = list(moved.skipped)
  if weights.deploy:  # the aux head, which evaluation does not run, is not in a deploy file
    skipped = [(key, why) for key, why in skipped if '.m2.' not in key]
  if skipped:
    shown = '; '.join(f'{key} ({why})' for key, why in skipped[:4])
    more = f'; and {len(skipped) - 4} more' if len(skipped) > 4 else ''
    raise BadInput(
      f"--weights {weights.path} does not fit {model_name}: {len(skipped)} of the model's "
      f'{moved.total} tensors differ from the file: {shown}{more}'
    )
  return moved.variables
