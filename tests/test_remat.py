"""Rematerialisation (``train.remat``): every policy gives the step of ``Remat.NONE``.

A :class:`~reorg_jax.models.yolo.Remat` policy changes only what the backward
pass keeps and what it recomputes. On the small model (128 px, batch 2,
float32) the loss and its parts, the gradient and the new BatchNorm
statistics of :func:`reorg_jax.training.step.loss_and_gradients` under each
policy are compared with those of ``NONE``: to within the rounding of the
step itself, measured on the same compiled ``NONE`` step with the batch's
images in reverse order (the same sums added in another order; the loss is
the same function of the set of images). The recomputation is the same
operations on the same inputs, but XLA fuses the recomputed graph
differently, so the results are not bit for bit those of ``NONE``; 128 px
rather than 64 because at 64 px the stride-64 BatchNorms normalise two values
per channel, where a last-bit change of the input moves the gradient by 1%
(float32 against float64) under any policy. Also: the gradient and
statistics trees keep the variables' names, each policy compiles once and an
equal setup reuses it, the blocks of the YOLOv7 files, and the bfloat16 step
(float32 parameters, optimiser state and EMA; one cast of the parameters).
"""

from __future__ import annotations

import copy
import functools
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sas_yolov7

import reorg_jax
from reorg_jax import testing
from reorg_jax.models import layers, yolo
from reorg_jax.program import config as config_lib
from reorg_jax.program import sections
from reorg_jax.training import assembly, optim
from reorg_jax.training import step as step_lib

NUM_CLASSES, SIZE, BATCH, MAX_BOXES = 3, 128, 2, 6
FLAT = testing.ONE_BRANCH  # one loss branch to compile; the results do not depend on it
CONFIGS = pathlib.Path(sas_yolov7.__file__).parent / 'cfg' / 'training'


def _batch(order: slice = slice(None)) -> dict:
  rng = np.random.default_rng(3)
  labels = testing.random_labels(
    rng, boxes_per_image=[5, 2], num_classes=NUM_CLASSES, image_hw=(SIZE, SIZE), min_size=8.0
  )
  images = rng.integers(0, 256, size=(BATCH, SIZE, SIZE, 3), dtype=np.uint8)
  targets = reorg_jax.Targets.from_yolo(labels, BATCH, MAX_BOXES, num_classes=NUM_CLASSES)
  return {'images': images[order], 'targets': jax.tree.map(lambda a: a[order], targets)}


def _variables(model: yolo.YOLO) -> dict:
  """Seeded variables without compiling an initialisation: kernels ``U(+-1/sqrt(fan_in))`` as
  PyTorch's, BatchNorm scales near 1 and shifts near 0, implicit layers and running
  statistics near their starting values."""
  rng = np.random.default_rng(0)

  def draw(path, zero):
    name = path[-1].key
    if name == 'kernel':
      bound = 1 / np.sqrt(np.prod(zero.shape[:-1]))
      return rng.uniform(-bound, bound, zero.shape).astype(zero.dtype)
    multiplier = name == 'implicit' and path[-2].key.startswith('im')  # ImplicitM: near 1
    base = 1.0 if name in ('scale', 'var') or multiplier else 0.0
    return (base + 0.02 * rng.standard_normal(zero.shape)).astype(zero.dtype)

  return jax.tree_util.tree_map_with_path(draw, assembly.zero_variables(model))


@pytest.fixture(scope='module')
def run() -> assembly.Assembly:
  schedule = optim.Schedule(epochs=1, batch_size=BATCH, steps_per_epoch=10)
  model = yolo.p6_nano(num_classes=NUM_CLASSES)
  return assembly.assemble(
    model, image_size=SIZE, schedule=schedule, gains=FLAT, variables=_variables(model)
  )


@pytest.fixture(scope='module')
def results(run) -> dict:
  """``(loss, parts, grads, batch_stats)`` per policy, and of ``NONE`` on the reversed batch."""
  traced = chex.assert_max_traces(step_lib.loss_and_gradients, n=len(yolo.Remat))
  step = jax.jit(traced, static_argnums=0)
  out = {}
  for remat in yolo.Remat:
    out[remat] = jax.device_get(step(run.setup.replace(remat=remat), run.state, _batch()))
  # An equal setup (a new object) and a batch of the same shapes: no new trace.
  equal = run.setup.replace(remat=yolo.Remat.NONE)
  out['reversed'] = jax.device_get(step(equal, run.state, _batch(slice(None, None, -1))))
  return out


def _worst(tree, reference) -> float:
  """The largest ``max |a - b| / max |b|`` over the leaves."""

  def relative(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = np.max(np.abs(b))
    return float(np.max(np.abs(a - b)) / scale) if scale else float(np.max(np.abs(a)))

  return max(jax.tree.leaves(jax.tree.map(relative, tree, reference)))


def test_gradients_and_statistics_keep_the_variables_names(run, results):
  for remat in yolo.Remat:
    _, _, grads, batch_stats = results[remat]
    assert jax.tree.structure(grads) == jax.tree.structure(run.state.params), remat
    assert jax.tree.structure(batch_stats) == jax.tree.structure(run.state.batch_stats), remat
    old = jax.tree.leaves(run.state.batch_stats)
    for new, before in zip(jax.tree.leaves(batch_stats), old, strict=True):
      assert new.shape == before.shape and new.dtype == before.dtype
  # The statistics did move (the comparisons below are not of untouched trees).
  moved = jax.tree.map(
    lambda new, old: not np.array_equal(new, old),
    results[yolo.Remat.BLOCKS][3],
    jax.device_get(run.state.batch_stats),
  )
  assert all(jax.tree.leaves(moved))


@pytest.mark.parametrize('remat', [r for r in yolo.Remat if r is not yolo.Remat.NONE])
def test_every_policy_gives_the_step_of_none(results, remat):
  none, reversed_order, ours = results[yolo.Remat.NONE], results['reversed'], results[remat]
  for index, what in enumerate(('loss', 'parts', 'gradient', 'batch_stats')):
    rounding = _worst(reversed_order[index], none[index])
    assert rounding < 1e-3, (what, rounding)  # a rounding baseline, not a different step
    # A few units in the last place of a scalar sum of thousands of terms (the loss) move
    # with the order of summation alone; the reversed batch gives one sample of that.
    tolerance = max(rounding, 16 * float(np.finfo(np.float32).eps))
    assert _worst(ours[index], none[index]) <= tolerance, (what, remat, rounding)
  assert float(ours[0]) > 0 and _worst(ours[2], jax.tree.map(np.zeros_like, ours[2])) > 0


def test_blocks_follow_the_elan_stages():
  for path in (yolo.NANO_CONFIG, CONFIGS / 'yolov7-w6.yaml', CONFIGS / 'yolov7-e6e.yaml'):
    specs = yolo.build_model(path).specs
    groups = yolo.blocks(specs)
    assert [i for group in groups for i in group] == list(range(len(specs))), path
    elan = [s.index for s in specs if s.module is layers.Concat and len(s.sources) > 2]
    for group in groups[:-1]:
      last = specs[group[-1]]
      assert set(last.sources) & set(elan) and set(last.sources) <= set(group), (path, group)
    # Every ELAN aggregation lies in the block of the layer that reads it, one per block.
    assert len(groups) == len(elan) + 1, path
    assert all(len(set(group) & set(elan)) == 1 for group in groups[:-1]), path
    assert specs[-1].index in groups[-1]


def test_bfloat16_keeps_float32_state_and_casts_once(run):
  setup = run.setup.replace(compute_dtype=jnp.bfloat16, remat=yolo.Remat.BLOCKS)
  batch = {**_batch(), 'hparams': optim.hyperparams(0, schedule=run.schedule)}
  closed = jax.make_jaxpr(functools.partial(step_lib.train_step, setup))(run.state, batch)
  state_out = jax.tree.unflatten(
    jax.tree.structure(run.state), closed.out_avals[: len(jax.tree.leaves(run.state))]
  )
  for part in (state_out.params, state_out.opt_state, state_out.ema, state_out.batch_stats):
    dtypes = {
      leaf.dtype for leaf in jax.tree.leaves(part) if jnp.issubdtype(leaf.dtype, jnp.floating)
    }
    assert dtypes == {jnp.dtype(jnp.float32)}, dtypes
  # Each float32 parameter is cast to bfloat16 by exactly one operation of the step.
  leaves = jax.tree_util.tree_leaves_with_path((run.state, batch))
  param_vars = [
    var
    for (path, _), var in zip(leaves, closed.jaxpr.invars, strict=True)
    if getattr(path[1], 'name', None) == 'params'
  ]
  assert len(param_vars) == len(jax.tree.leaves(run.state.params))
  casts = {id(var): 0 for var in param_vars}
  for eqn in closed.jaxpr.eqns:
    if eqn.primitive.name == 'convert_element_type' and eqn.params['new_dtype'] == jnp.bfloat16:
      for var in eqn.invars:
        if id(var) in casts:
          casts[id(var)] += 1
  assert set(casts.values()) == {1}


def test_train_remat_option_is_checked_and_may_change_on_resume():
  defaults = config_lib.defaults()
  assert defaults['train']['remat'] == yolo.Remat.NONE.value
  for remat in yolo.Remat:
    config = copy.deepcopy(defaults)
    config['train']['remat'] = remat.value
    config_lib.check(config)
    assert yolo.Remat(sections.resolve(config).train.remat) is remat
    assert config_lib.resume_conflicts(defaults, config) == []
  config['train']['remat'] = 'everything'
  with pytest.raises(config_lib.ConfigError, match=r"train.remat must be one of \['none'"):
    config_lib.check(config)
