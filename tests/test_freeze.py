"""Freezing the first ``N`` layers, as upstream's ``--freeze N``.

Upstream turns off ``requires_grad`` of every parameter named ``model.{i}.*``
with ``i < N``: no gradient, so torch's SGD skips it (no update, no weight
decay, no momentum), while its BatchNorm statistics still follow the batches
in training mode. These tests train the small model for a few steps with and
without freezing and check each of those points, bit for bit where the
weights must not move; the frozen set is checked against upstream's rule on
upstream's own model. The step's assignment statistics are checked here too,
on the step's own head outputs (the loss-level checks are in
``tests/test_assignment_stats.py``).
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from sas_yolov7.models.yolo import Model

import reorg_jax
from reorg_jax import testing
from reorg_jax.models import convert, yolo
from reorg_jax.training import assembly, optim, sgd
from reorg_jax.training import step as train

NUM_CLASSES, SIZE, BATCH, MAX_BOXES, STEPS = 3, 128, 2, 6, 3
FLAT = testing.ONE_BRANCH  # one loss branch to compile; the results do not depend on it
# Layers 0..9: the ReOrg stem (no parameters), convolutions and a Concat (none either).
FROZEN = 10


def _model() -> yolo.YOLO:
  return yolo.p6_nano(num_classes=NUM_CLASSES)


def _batches() -> list[dict]:
  rng = np.random.default_rng(7)
  batches = []
  for step in range(STEPS):
    labels = testing.random_labels(
      rng, boxes_per_image=[5, 2], num_classes=NUM_CLASSES, image_hw=(SIZE, SIZE), min_size=8.0
    )
    images = rng.integers(0, 256, size=(BATCH, SIZE, SIZE, 3), dtype=np.uint8)
    hparams = optim.HyperParams(
      step=np.asarray(step, np.int32),
      lrs=np.asarray([0.02, 0.01, 0.05], np.float64),
      momentum=np.asarray(0.9, np.float64),
      accumulate=np.asarray(1, np.int32),
    )
    targets = reorg_jax.Targets.from_yolo(labels, BATCH, MAX_BOXES, num_classes=NUM_CLASSES)
    batches.append({'images': images, 'targets': targets, 'hparams': hparams})
  return batches


def _host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


@pytest.fixture(scope='module')
def runs():
  """The initial variables and, for ``N = 0`` and ``N = FROZEN``, the states and metrics of
  each of ``STEPS`` jitted steps on the same batches."""
  model = _model()
  dummy = jnp.zeros((1, SIZE, SIZE, 3), jnp.float32)
  variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(dummy)
  initial = _host(variables)
  schedule = optim.Schedule(epochs=1, batch_size=BATCH, steps_per_epoch=100)
  batches = _batches()
  result = {'model': model, 'initial': initial, 'batches': batches}
  for frozen_layers in (0, FROZEN):
    run = assembly.assemble(
      model,
      image_size=SIZE,
      schedule=schedule,
      gains=FLAT,
      variables=jax.tree.map(jnp.array, variables),  # a copy: the step donates its state
      frozen_layers=frozen_layers,
    )
    setup, state, step = run.setup, run.state, run.jit_step()
    states, metrics = [], []
    for batch in batches:
      state, metric = step(state, batch)
      states.append(_host(state))
      metrics.append(_host(metric))
    result[frozen_layers] = {'setup': setup, 'states': states, 'metrics': metrics}
  return result


def _flat(tree) -> dict[str, np.ndarray]:
  return {
    '/'.join(str(getattr(k, 'key', k)) for k in path): leaf
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
  }


def test_layer_count_and_frozen_paths(runs):
  model, params = runs['model'], runs['initial']['params']
  assert train.num_layers(model) == sgd.layer_count(params) == len(model.specs) == 63
  assert sgd.frozen_paths(params, 0) == [] and sgd.frozen_paths(params, 1) == []  # ReOrg
  paths = sgd.frozen_paths(params, FROZEN)
  layers = {int(path.split('/')[0].removeprefix('model_')) for path in paths}
  assert layers == {1, 2, 3, 4, 5, 6, 8, 9}  # 0 (ReOrg) and 7 (Concat) have no parameters
  assert set(paths) == {p for p in _flat(params) if int(p.split('/')[0][6:]) < FROZEN}
  assert len(sgd.frozen_paths(params, 63)) == len(jax.tree.leaves(params))


def test_freezing_more_layers_than_the_model_has_is_refused(runs):
  model, params = runs['model'], runs['initial']['params']
  schedule = optim.Schedule(epochs=1, batch_size=BATCH, steps_per_epoch=1)
  kwargs = dict(rng=jax.random.key(0), image_size=SIZE, schedule=schedule)
  for bad in (64, -1):
    with pytest.raises(ValueError, match=rf'first {bad} layers: the model has 63 layers'):
      train.create_train_state(
        model,
        loss_config=assembly.loss_config(model, image_size=SIZE),
        variables=runs['initial'],
        frozen_layers=bad,
        **kwargs,
      )
    with pytest.raises(ValueError, match=rf'first {bad} layers: the model has 63 layers'):
      sgd.frozen_mask(params, bad)
  with pytest.raises(ValueError, match='the model has 63 layers'):
    sgd.recipe_optimizer(sgd.param_labels(params), schedule=schedule, frozen_layers=64)


def test_frozen_set_is_upstreams(runs):
  """Our frozen leaves, as torch keys, are upstream's ``any(f'model.{i}.' in name)`` set."""
  params = runs['initial']['params']
  raw = yolo.load_config(yolo.NANO_CONFIG)
  raw['nc'] = NUM_CLASSES
  torch.manual_seed(0)
  names = [name for name, _ in Model(copy.deepcopy(raw)).named_parameters()]
  for frozen_layers in (0, 1, 2, FROZEN, 40, 62, 63):
    prefixes = [f'model.{i}.' for i in range(frozen_layers)]
    upstream = {name for name in names if any(prefix in name for prefix in prefixes)}
    mask = sgd.frozen_mask(params, frozen_layers)
    marked = jax.tree.map(lambda f, p: np.full(p.shape, float(f), np.float32), mask, params)
    state = convert.state_dict_from_variables({'params': marked}, buffers={})
    ours = {key for key, value in state.items() if value.size and value.all()}
    assert set(state) == set(names)
    assert ours == upstream, frozen_layers


def test_frozen_parameters_and_their_ema_stay_bit_identical(runs):
  initial = _flat(runs['initial']['params'])
  frozen = set(sgd.frozen_paths(runs['initial']['params'], FROZEN))
  for state, metrics in zip(runs[FROZEN]['states'], runs[FROZEN]['metrics'], strict=True):
    assert bool(metrics['stepped']) and bool(metrics['finite'])
    params, ema = _flat(state.params), _flat(state.ema['params'])
    buffers = _flat(state.opt_state.sgd.momentum_buffer)
    grad_sum = _flat(state.opt_state.grad_sum)
    for path in frozen:
      assert params[path].tobytes() == initial[path].tobytes(), path
      assert ema[path].tobytes() == initial[path].tobytes(), path
      assert not buffers[path].any() and not grad_sum[path].any(), path  # no momentum
  # Every other parameter trains (its momentum buffer too).
  final = runs[FROZEN]['states'][-1]
  params, buffers = _flat(final.params), _flat(final.opt_state.sgd.momentum_buffer)
  for path in set(initial) - frozen:
    assert (params[path] != initial[path]).any(), path
    assert buffers[path].any(), path


def test_unfrozen_layers_train_as_without_freezing(runs):
  """Step 1 from the same weights: the unfrozen parameters and all the BatchNorm statistics
  (frozen layers' included, as upstream in training mode) are those of the unfrozen run."""
  frozen = set(sgd.frozen_paths(runs['initial']['params'], FROZEN))
  free, held = runs[0]['states'][0], runs[FROZEN]['states'][0]
  free_params, held_params = _flat(free.params), _flat(held.params)
  for path in set(free_params) - frozen:
    np.testing.assert_allclose(held_params[path], free_params[path], rtol=1e-5, atol=1e-7)
  initial_stats = _flat(runs['initial']['batch_stats'])
  free_stats, held_stats = _flat(free.batch_stats), _flat(held.batch_stats)
  for path, value in held_stats.items():
    np.testing.assert_allclose(value, free_stats[path], rtol=1e-5, atol=1e-7)
  for path in initial_stats:
    if int(path.split('/')[0][6:]) < FROZEN:
      assert (held_stats[path] != initial_stats[path]).any(), path  # the stats still move
  np.testing.assert_allclose(
    runs[FROZEN]['metrics'][0]['loss'], runs[0]['metrics'][0]['loss'], rtol=1e-6
  )
  # Without freezing the first layers do move.
  first = _flat(runs[0]['states'][-1].params)
  initial = _flat(runs['initial']['params'])
  assert all((first[path] != initial[path]).any() for path in frozen)


def test_optimizer_skips_frozen_leaves_exactly():
  """Nonzero gradients of frozen leaves are ignored; ``-0.0`` parameters stay ``-0.0``; the
  other leaves follow the unfrozen optimiser bit for bit."""
  params = {
    'model_0': {
      'kernel': jnp.asarray([[-0.0, 0.5], [1.0, -2.0]]),
      'bias': jnp.asarray([-0.0, 3.0]),
    },
    'model_1': {'kernel': jnp.ones((2, 2)), 'bias': jnp.asarray([0.25, -0.0])},
  }
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
  labels = sgd.param_labels(params)
  schedule = optim.Schedule(epochs=1, batch_size=16, steps_per_epoch=10)
  hparams = optim.hyperparams(1, schedule=schedule)._replace(accumulate=np.asarray(1, np.int32))
  plain = sgd.recipe_optimizer(labels, schedule=schedule)
  frozen = sgd.recipe_optimizer(labels, schedule=schedule, frozen_layers=1)
  plain_params, plain_state = params, plain.init(params)
  frozen_params, frozen_state = params, frozen.init(params)
  for _ in range(3):
    plain_params, plain_state, _ = jax.jit(plain.update)(
      grads, plain_state, plain_params, hparams=hparams
    )
    frozen_params, frozen_state, stepped = jax.jit(frozen.update)(
      grads, frozen_state, frozen_params, hparams=hparams
    )
    assert bool(stepped)
  for name in ('kernel', 'bias'):
    assert np.asarray(frozen_params['model_0'][name]).tobytes() == (
      np.asarray(params['model_0'][name]).tobytes()
    )
    assert not np.asarray(frozen_state.sgd.momentum_buffer['model_0'][name]).any()
    np.testing.assert_array_equal(frozen_params['model_1'][name], plain_params['model_1'][name])
    assert (np.asarray(frozen_params['model_1'][name]) != np.asarray(params['model_1'][name])).any()
  # nesterov_sgd alone: frozen updates are -0.0, which optax adds without changing a bit.
  optimizer = sgd.nesterov_sgd(labels, weight_decays=(0.0, 0.1, 0.0), frozen_layers=1)
  updates, _ = optimizer.update(
    grads, optimizer.init(params), params, lrs=jnp.asarray([0.1, 0.1, 0.1]), momentum=0.9
  )
  applied = optax.apply_updates(params, updates)
  for name in ('kernel', 'bias'):
    assert np.asarray(applied['model_0'][name]).tobytes() == (
      np.asarray(params['model_0'][name]).tobytes()
    )


def test_step_reports_assignment_statistics(runs):
  """``lead_positives``/``aux_positives`` are the positives of :func:`reorg_jax.assign` on the
  step's own head outputs, per image; ``boxes_per_image`` the valid targets per image."""
  model, batch = runs['model'], runs['batches'][0]
  metrics = runs[0]['metrics'][0]
  assert metrics['lead_positives'].dtype == np.float32 and metrics['boxes_per_image'].shape == ()
  outputs, _ = model.apply(
    runs['initial'],
    yolo.unit_images(batch['images']),
    train=True,
    mutable=['batch_stats'],
  )
  config = runs[0]['setup'].loss_config
  lead = outputs[: config.num_levels]
  targets = batch['targets']
  valid = np.asarray(targets.valid).sum(axis=1)
  assert float(metrics['boxes_per_image']) == valid.mean() == 3.5
  for key, coarse in (('lead_positives', False), ('aux_positives', True)):
    positive = reorg_jax.assign(lead, targets, (SIZE, SIZE), config, coarse=coarse).positive
    assert float(metrics[key]) == float(np.asarray(positive).sum()) / BATCH, key
    assert float(metrics[key]) > 0
