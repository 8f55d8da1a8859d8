"""Weights from elsewhere: upstream's ``.pt`` files and our own runs, transferred by name and shape.

Glossary: ``C`` classes; a *state dict* maps PyTorch keys (``model.3.bn.weight``)
to arrays in PyTorch layout, the lingua franca of this module.

:func:`read` identifies a ``--weights`` path and reads its tensors:

* an upstream training checkpoint (``train_aux.py``'s pickled
  ``{'model': Model, 'ema': Model, 'optimizer': ..., 'epoch': ...}``, weights in
  float16), an upstream deploy checkpoint (``IDetect`` head, no aux head), or a
  plain PyTorch ``state_dict`` file: all read by
  :mod:`reorg_jax.models.torch_file`, which runs none of the file's code;
* a run directory of ours (its best checkpoint, else its newest), or one
  checkpoint directory (``<run>/checkpoints/steps/<g>`` or ``.../best/<g>``):
  restored with the model of the run's own ``config.yaml`` and converted to a
  state dict (:func:`reorg_jax.models.convert.export_state_dict`);
* a deploy checkpoint of ours (what ``reorg-jax export --include deploy``
  writes): a directory holding :data:`DEPLOY_MODEL` (the deploy model file,
  ``Detect`` head), :data:`DEPLOY_STATE` (its PyTorch ``state_dict``, which
  upstream's ``Model`` of that file loads) and :data:`DEPLOY_META` (JSON:
  ``format`` :data:`DEPLOY_FORMAT`, ``class_names``, ``source``), read
  with no PyTorch.

Upstream checkpoints carry their pickled model's config as ``model_yaml``
(a deploy checkpoint's ends in ``IDetect`` or ``Detect``, which ``val`` and
``detect`` build, and which does not train).

Which weights of a file: for training (``use_ema=False``) the raw model, as
upstream's ``train_aux.py --weights`` takes ``ckpt['model']``; for evaluation
(``use_ema=True``) the EMA when the file has one, as upstream's
``attempt_load``.

:func:`transfer` then builds a model's variables: every tensor whose name and
shape match is taken from the file, the others keep the model's fresh
initialisation (upstream's ``intersect_dicts``); the :class:`Transfer` says
what was taken and what was skipped, and why.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from reorg_jax.models import convert, torch_checkpoint, torch_file
from reorg_jax.models.yolo import YOLO

__all__ = [
  'DEPLOY_FORMAT',
  'DEPLOY_META',
  'DEPLOY_MODEL',
  'DEPLOY_STATE',
  'PARTIAL_SHARE',
  'Transfer',
  'Weights',
  'WeightsError',
  'read',
  'save_model_yaml',
  'transfer',
]

# Below this share of the model's tensors transferred, --weights is an error
# unless --allow-partial (a file of another architecture, or the wrong file).
PARTIAL_SHARE = 0.5


# A deploy checkpoint of ours: a directory holding these three files.
DEPLOY_MODEL = 'model.yaml'
DEPLOY_STATE = 'weights.pt'
DEPLOY_META = 'deploy.json'
DEPLOY_FORMAT = 'reorg-jax deploy checkpoint 1'


class WeightsError(ValueError):
  """A weights file is missing, unreadable, not a checkpoint, or does not fit the model."""


@dataclasses.dataclass(frozen=True)
class Weights:
  """The tensors of a ``--weights`` path.

  Attributes:
    path: the path given.
    kind: what it is, in words (``'upstream training checkpoint'``, ...).
    state_dict: PyTorch key -> array (PyTorch layout, the file's dtype).
    model_yaml: the model definition the file carries (the pickled upstream
      model's ``yaml``, or our run's model), or ``None``.
    class_names: the model's class names when the file records them.
    entry: which weights were taken (``'model'``, ``'ema'``, ``'params'``...).
    deploy: the file has no aux head (an upstream deploy checkpoint, or one of ours).
    run: the run directory of ours the weights come from, or ``None``.
  """

  path: Path
  kind: str
  state_dict: dict[str, np.ndarray]
  model_yaml: dict[str, Any] | str | None
  class_names: tuple[str, ...] | None
  entry: str
  deploy: bool = False
  run: Path | None = None


@dataclasses.dataclass(frozen=True)
class Transfer:
  """What :func:`transfer` took from a file.

  Attributes:
    variables: the model's ``{'params', 'batch_stats'}``.
    transferred: the PyTorch keys taken from the file.
    total: the model's tensors (its state dict's keys, buffers included).
    skipped: ``(key, reason)`` of each model tensor left as initialised.
    unused: the file's keys the model has no tensor for.
  """

  variables: dict[str, Any]
  transferred: tuple[str, ...]
  total: int
  skipped: tuple[tuple[str, str], ...]
  unused: tuple[str, ...]

  def lines(self, weights: Weights) -> list[str]:
    """What to print: ``transferred N/M tensors from FILE``, then what was skipped, why."""
    lines = [
      f'transferred {len(self.transferred)}/{self.total} tensors from {weights.path} '
      f'({weights.kind}, {weights.entry} weights)'
    ]
    if self.skipped:
      shown = '; '.join(f'{key} ({why})' for key, why in self.skipped[:12])
      more = f'; and {len(self.skipped) - 12} more' if len(self.skipped) > 12 else ''
      lines.append(f'skipped {len(self.skipped)}, left as initialised: {shown}{more}')
    if weights.deploy:
      lines.append('the file is a deploy checkpoint (no aux head): the aux head starts fresh')
    return lines


def _is_run_of_ours(path: Path) -> bool:
  return (path / 'config.yaml').is_file() and (path / 'checkpoints').is_dir()


def read(path: str | os.PathLike, *, use_ema: bool = False) -> Weights:
  """The tensors of ``path`` (see the module docstring for what it may be).

  Raises:
    WeightsError: a missing or unreadable path, a file that is not a checkpoint,
      a pickle naming a class outside the allowed set, a run directory with no
      checkpoint (one line, naming the path).
  """
  path = Path(path)
  if not path.exists():
    raise WeightsError(f'--weights {path}: no such file or directory')
  if path.is_dir():
    if (path / DEPLOY_META).is_file():
      return _read_deploy(path)
    return _read_ours(path, use_ema=use_ema)
  try:
    ckpt = torch_checkpoint.load_checkpoint(path)
  except (torch_file.TorchFileError, OSError) as error:
    raise WeightsError(f'--weights: {error}') from None
  if ckpt.kind == 'state_dict':
    return Weights(path, 'PyTorch state_dict', dict(ckpt.model), None, None, entry='state_dict')
  take_ema = use_ema and ckpt.ema is not None
  state = dict(ckpt.ema if take_ema else ckpt.model)
  deploy = not any('.m2.' in key for key in state)
  kind = 'upstream deploy checkpoint' if deploy else f'upstream {ckpt.kind} checkpoint'
  names = tuple(ckpt.class_names) if ckpt.class_names is not None else None
  spec = None
  if ckpt.yaml is not None:
    # The anchors the model trained with: autoanchor re-fits the buffers, not the yaml.
    spec = dict(ckpt.yaml)
    if any(key.endswith('.anchor_grid') for key in state):
      spec['anchors'] = convert.anchors_from_state_dict(state)
  return Weights(
    path,
    kind,
    state,
    spec,
    names,
    entry='ema' if take_ema else 'model',
    deploy=deploy,
  )


def _read_deploy(path: Path) -> Weights:
  """A deploy checkpoint of ours (see the module docstring)."""
  import json

  from reorg_jax.models import from_yaml

  meta_path = path / DEPLOY_META
  try:
    meta = json.loads(meta_path.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
    raise WeightsError(f'--weights {meta_path}: cannot be read as JSON ({error})') from None
  names = meta.get('class_names') if isinstance(meta, dict) else None
  if not isinstance(meta, dict) or meta.get('format') != DEPLOY_FORMAT:
    raise WeightsError(
      f'--weights {meta_path}: not a deploy checkpoint of ours (its format is not '
      f'{DEPLOY_FORMAT!r})'
    )
  if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
    raise WeightsError(f'--weights {meta_path}: class_names must be a list of names')
  for name in (DEPLOY_MODEL, DEPLOY_STATE):
    if not (path / name).is_file():
      raise WeightsError(f'--weights {path}: the deploy checkpoint lacks {name}')
  try:
    spec = from_yaml.load_config(path / DEPLOY_MODEL)
    ckpt = torch_checkpoint.load_checkpoint(path / DEPLOY_STATE)
  except (ValueError, OSError) as error:
    raise WeightsError(f'--weights: {error}') from None
  if ckpt.kind != 'state_dict':
    raise WeightsError(f'--weights {path / DEPLOY_STATE}: not a plain state_dict file')
  source = meta.get('source')
  entry = source.get('entry') if isinstance(source, dict) else None
  return Weights(
    path,
    'deploy checkpoint of ours',
    dict(ckpt.model),
    spec,
    tuple(names),
    entry=entry if isinstance(entry, str) else 'model',
    deploy=True,
  )


def _checkpoint_dirs(path: Path) -> tuple[Path, Path | None, int | None]:
  """``(run directory, checkpoints/<kind> directory or None, step or None)`` of ``path``."""
  if _is_run_of_ours(path):
    return path, None, None
  if path.name == 'checkpoints' and _is_run_of_ours(path.parent):
    return path.parent, None, None
  if path.name.isdigit() and path.parent.name in ('steps', 'best'):
    run = path.parent.parent.parent
    if _is_run_of_ours(run):
      return run, path.parent, int(path.name)
  raise WeightsError(
    f'--weights {path}: a directory that is neither a run directory of ours (config.yaml and '
    'checkpoints/) nor one of its checkpoints (checkpoints/steps/<step>, checkpoints/best/<step>)'
  )


def _run_model(run: Path) -> tuple[YOLO, dict[str, Any] | str, tuple[str, ...]]:
  """The model of a run of ours (from its ``config.yaml`` and dataset), its spec and class names."""
  from reorg_jax.data import dataset, synthetic
  from reorg_jax.models import from_yaml, yolo

  options = yaml.safe_load((run / 'config.yaml').read_text())
  data = options['data']['yaml']
  if data is None:
    names = tuple(synthetic.CLASS_NAMES)
  else:
    try:
      names = tuple(dataset.read_data_config(Path(data)).names)
    except (OSError, ValueError) as error:
      raise WeightsError(
        f'--weights {run}: the run trained on {data}, which cannot be read to know its classes '
        f'({error})'
      ) from None
  name = options['model']['name']
  if name == 'p6_nano':
    return yolo.p6_nano(num_classes=len(names)), name, names
  path = Path(name)
  if not path.is_file() and (run / path.name).is_file():
    path = run / path.name  # the model.yaml a fine-tuning run keeps, read from elsewhere
  try:
    spec = from_yaml.load_config(path)
  except (OSError, ValueError) as error:
    raise WeightsError(f'--weights {run}: its model {name} cannot be read ({error})') from None
  return yolo.build_model(spec, num_classes=len(names)), spec, names


def _read_ours(path: Path, *, use_ema: bool) -> Weights:
  from reorg_jax.training import assembly, checkpoint, integrity

  run, kind_dir, step = _checkpoint_dirs(path)
  model, spec, names = _run_model(run)
  like = assembly.state_template(model)
  ckpt = checkpoint.Checkpoints(run / 'checkpoints', save_every=1, read_only=True)
  try:
    if kind_dir is None:
      restored = ckpt.restore_best(like=like) or ckpt.restore_latest(like=like)
      if restored is None:
        raise WeightsError(f'--weights {path}: the run has no checkpoint yet')
    elif kind_dir.name == 'best':
      restored = ckpt.restore_best(like=like)
      if restored is None or restored.step != step:
        raise WeightsError(f'--weights {path}: not the best checkpoint of {run}')
    else:
      restored = ckpt.restore_step(step, like=like)
  except (integrity.CheckpointError, FileNotFoundError) as error:
    raise WeightsError(f'--weights {path}: {error}') from None
  finally:
    ckpt.close()
  variables = restored.state.variables(use_ema=use_ema)
  state_dict = convert.export_state_dict(model, variables)
  return Weights(
    path,
    f'checkpoint of ours at step {restored.step}',
    state_dict,
    spec,
    names,
    entry='EMA' if use_ema else 'model',
    run=run,
  )


def _is_anchor(key: str) -> bool:
  return key.endswith(('.anchors', '.anchor_grid'))


def transfer(
  weights: Weights,
  model: YOLO,
  fresh: Mapping[str, Any],
  *,
  keep_model_anchors: bool = True,
) -> Transfer:
  """``model``'s variables with every tensor of ``weights`` whose name and shape match.

  Args:
    weights: from :func:`read`.
    model: the model to fill (its ``C`` may differ from the file's).
    fresh: the model's freshly initialised ``{'params', 'batch_stats'}``: what
      is not transferred keeps these values.
    keep_model_anchors: the anchors are the model's own (they are part of its
      definition); the file's anchor buffers are then reported as skipped
      when they differ (upstream excludes anchors whenever a model file is given).

  Raises:
    WeightsError: the file's anchors differ from the model's and
      ``keep_model_anchors`` is ``False``.
  """
  target = convert.export_state_dict(model, fresh)
  source = weights.state_dict
  taken: dict[str, np.ndarray] = {}
  skipped: list[tuple[str, str]] = []
  for key, value in target.items():
    if key not in source:
      skipped.append((key, 'not in the file'))
      continue
    given = np.asarray(source[key])
    if given.shape != value.shape:
      skipped.append((key, f'shape {tuple(given.shape)} in the file, {tuple(value.shape)} here'))
      continue
    if _is_anchor(key) and not np.allclose(given, value, rtol=1e-3, atol=1e-6):
      if not keep_model_anchors:
        raise WeightsError(f"--weights {weights.path}: {key} differs from the model's anchors")
      skipped.append((key, "the file's anchors differ; the model's are kept"))
      continue
    taken[key] = given
  merged = dict(target)
  for key, value in taken.items():
    merged[key] = value.astype(target[key].dtype)
  variables = convert.import_state_dict(model, merged)
  unused = tuple(key for key in source if key not in target)
  return Transfer(
    variables=variables,
    transferred=tuple(taken),
    total=len(target),
    skipped=tuple(skipped),
    unused=unused,
  )


def save_model_yaml(weights: Weights, workdir: Path) -> Path:
  """Writes the model definition ``weights`` carries to ``<workdir>/model.yaml``; its path.

  The run directory then holds its model, so ``--resume`` rebuilds it. An
  identical file already there is kept.

  Raises:
    WeightsError: the file carries no model definition, or ``workdir`` holds a
      different ``model.yaml``.
  """
  if not isinstance(weights.model_yaml, Mapping):
    raise WeightsError(
      f'--weights {weights.path}: the file carries no model definition; give --model'
    )
  text = yaml.safe_dump(dict(weights.model_yaml), sort_keys=False)
  path = workdir / 'model.yaml'
  if path.is_file():
    if yaml.safe_load(path.read_text()) == yaml.safe_load(text):
      return path
    raise WeightsError(
      f'{path} already exists and differs from the model pickled in {weights.path}; give '
      '--model or another --workdir'
    )
  workdir.mkdir(parents=True, exist_ok=True)
  partial = path.with_name('model.yaml.tmp')
  partial.write_text(text)
  os.replace(partial, path)
  return path
