"""The optimisation recipe against upstream's formulas and ``torch.optim.SGD``.

The PyTorch side of the cross-framework test is a small network driven by a
transcription of the original trainer's loop: parameter groups built by
walking the modules, ``SGD(pg0, nesterov=True)`` plus the decayed kernels and
the biases, ``LambdaLR`` stepped per epoch, warm-up by ``np.interp``,
gradients summed into ``.grad`` and cleared at every epoch start, and
``ModelEMA`` updated after every optimizer step.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from sas_yolov7.models import common
from sas_yolov7.utils.torch_utils import ModelEMA

import reorg_jax
from reorg_jax.models import detect, layers
from reorg_jax.training import ema, optim, sgd

HYP = {
  'lr0': 0.01,
  'lrf': 0.2,
  'momentum': 0.937,
  'weight_decay': 0.0005,
  'warmup_epochs': 3.0,
  'warmup_momentum': 0.8,
  'warmup_bias_lr': 0.1,
}
NBS = 64


class _Toy(nn.Module):
  """Every kind of parameter the recipe has to sort."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = layers.Conv(4, kernel_size=3, name='stem')(x, train=False)  # conv kernel + BatchNorm
    x = layers.ImplicitA(name='ia')(x)
    x = nn.Conv(6, (1, 1), name='head')(x)  # kernel + bias
    x = layers.ImplicitM(name='im')(x)
    return nn.Dense(2, name='fc')(x.mean(axis=(1, 2)))


def test_labels_on_toy_model():
  params = _Toy().init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))['params']
  expected = {
    'stem': {'conv': {'kernel': optim.DECAY}, 'bn': {'scale': optim.NO_DECAY, 'bias': optim.BIAS}},
    'ia': {'implicit': optim.NO_DECAY},
    'head': {'kernel': optim.DECAY, 'bias': optim.BIAS},
    'im': {'implicit': optim.NO_DECAY},
    'fc': {'kernel': optim.DECAY, 'bias': optim.BIAS},
  }
  assert sgd.param_labels(params) == expected


def test_labels_on_detection_head():
  head = detect.IAuxDetect(num_classes=2, anchors=((10, 13, 16, 30),), strides=(8,))
  features = [jnp.zeros((1, 4, 4, 5))] * 2
  params = head.init(jax.random.key(0), features, train=True)['params']
  labels = sgd.param_labels(params)
  assert labels == {
    'ia_0': {'implicit': optim.NO_DECAY},
    'im_0': {'implicit': optim.NO_DECAY},
    'm_0': {'kernel': optim.DECAY, 'bias': optim.BIAS},
    'm2_0': {'kernel': optim.DECAY, 'bias': optim.BIAS},
  }


def test_labels_reject_unknown_and_misshapen_leaves():
  params = {'embed': {'embedding': jnp.zeros((5, 3))}, 'ok': {'bias': jnp.zeros(3)}}
  with pytest.raises(ValueError, match=r"\['embed'\]\['embedding'\]"):
    sgd.param_labels(params)
  groups = {**sgd.UPSTREAM_GROUPS, 'embedding': optim.DECAY}
  assert sgd.param_labels(params, groups=groups)['embed']['embedding'] == optim.DECAY
  with pytest.raises(ValueError, match='shape'):
    sgd.param_labels({'dense': {'kernel': jnp.zeros(3)}})
  with pytest.raises(ValueError, match='shape'):
    sgd.param_labels({'bn': {'scale': jnp.zeros((3, 3))}})


def test_schedule_derived_quantities():
  schedule = optim.Schedule(epochs=300, batch_size=24, steps_per_epoch=500)
  assert schedule.accumulate == 3  # round(64 / 24)
  assert schedule.weight_decay == pytest.approx(0.0005 * 24 * 3 / 64)
  assert schedule.weight_decays == (0.0, schedule.weight_decay, 0.0)
  assert schedule.warmup_steps == 1500
  assert optim.Schedule(epochs=1, batch_size=16, steps_per_epoch=10).warmup_steps == 1000
  assert optim.Schedule(epochs=1, batch_size=128, steps_per_epoch=10).accumulate == 1
  assert schedule.lr_factor(0) == 1.0
  assert schedule.lr_factor(300) == pytest.approx(0.2)


def _upstream_hyperparams(ni: int, *, epochs: int, nb: int, batch_size: int, min_warmup: int):
  """The original trainer's arithmetic for iteration ``ni``, spelled out."""
  lf = lambda x: ((1 - math.cos(x * math.pi / epochs)) / 2) * (HYP['lrf'] - 1) + 1  # noqa: E731
  epoch = ni // nb
  nw = max(round(HYP['warmup_epochs'] * nb), min_warmup)
  accumulate = max(round(NBS / batch_size), 1)
  lrs = [HYP['lr0'] * lf(epoch)] * 3
  momentum = HYP['momentum']
  if ni <= nw:
    xi = [0, nw]
    accumulate = max(1, np.interp(ni, xi, [1, NBS / batch_size]).round())
    lrs = [
      np.interp(ni, xi, [HYP['warmup_bias_lr'] if j == 2 else 0.0, HYP['lr0'] * lf(epoch)])
      for j in range(3)
    ]
    momentum = np.interp(ni, xi, [HYP['warmup_momentum'], HYP['momentum']])
  return lrs, momentum, accumulate


@pytest.mark.parametrize('batch_size', [16, 24, 128])
def test_hyperparams_match_upstream_formulas(batch_size):
  epochs, nb = 300, 700
  schedule = optim.Schedule(epochs=epochs, batch_size=batch_size, steps_per_epoch=nb)
  nw = schedule.warmup_steps
  assert nw == 2100
  for ni in (0, 1, nw // 2, nw - 1, nw, nw + 1, 5 * nb + 3, 150 * nb, epochs * nb - 1):
    got = optim.hyperparams(ni, schedule=schedule)
    lrs, momentum, accumulate = _upstream_hyperparams(
      ni, epochs=epochs, nb=nb, batch_size=batch_size, min_warmup=1000
    )
    np.testing.assert_allclose(got.lrs, lrs, rtol=1e-15, atol=0)
    assert float(got.momentum) == pytest.approx(momentum, rel=1e-15)
    assert int(got.accumulate) == accumulate
    assert int(got.step) == ni
  assert optim.hyperparams(0, schedule=schedule).lrs.tolist() == [0.0, 0.0, 0.1]
  with pytest.raises(ValueError, match='step'):
    optim.hyperparams(epochs * nb, schedule=schedule)


def test_nesterov_first_steps_follow_torch_rule():
  labels = {'w': optim.DECAY, 'b': optim.BIAS}
  params = {'w': jnp.full((2, 2), 2.0), 'b': jnp.ones(2)}
  grads = {'w': jnp.full((2, 2), 0.5), 'b': jnp.full(2, -1.0)}
  optimizer = sgd.nesterov_sgd(labels, weight_decays=(0.0, 0.1, 0.0))
  state = optimizer.init(params)
  lrs, momentum = jnp.asarray([0.0, 0.01, 0.1]), 0.9
  updates, state = optimizer.update(grads, state, params, lrs=lrs, momentum=momentum)
  g_w = 0.5 + 0.1 * 2.0  # decay coupled into the gradient
  np.testing.assert_allclose(state.momentum_buffer['w'], g_w)  # first step: buf = g
  np.testing.assert_allclose(updates['w'], -0.01 * (g_w + 0.9 * g_w), rtol=1e-6)
  np.testing.assert_allclose(updates['b'], -0.1 * (-1.0 - 0.9), rtol=1e-6)
  params = optax_apply(params, updates)
  updates, state = optimizer.update(grads, state, params, lrs=lrs, momentum=0.5)
  g_w2 = 0.5 + 0.1 * float(params['w'][0, 0])
  buf = 0.5 * g_w + g_w2
  np.testing.assert_allclose(state.momentum_buffer['w'], buf, rtol=1e-6)
  np.testing.assert_allclose(updates['w'], -0.01 * (g_w2 + 0.5 * buf), rtol=1e-6)


def optax_apply(params, updates):
  return jax.tree.map(lambda p, u: p + u, params, updates)


@pytest.mark.parametrize('since_last', [False, True])
def test_accumulation_sums_and_steps_by_rule(since_last):
  recipe = optim.RecipeConfig(min_warmup_steps=12, warmup_epochs=0.0, step_since_last=since_last)
  schedule = optim.Schedule(epochs=3, batch_size=16, steps_per_epoch=9, recipe=recipe)
  labels = {'w': optim.DECAY}
  opt = sgd.recipe_optimizer(labels, schedule=schedule)
  params = {'w': jnp.zeros(3)}
  state = opt.init(params)
  update = jax.jit(opt.update)
  pending, last, stepped_at = 0.0, -1, []
  for ni in range(schedule.total_steps):
    hp = optim.hyperparams(ni, schedule=schedule)
    accumulate = int(hp.accumulate)
    if ni % schedule.steps_per_epoch == 0:
      pending = 0.0  # the trainer zeroes gradients before each epoch
    pending += ni + 1.0
    expect_step = (ni - last >= accumulate) if since_last else (ni % accumulate == 0)
    grads = {'w': jnp.full(3, ni + 1.0)}
    params, state, stepped = update(grads, state, params, hparams=hp)
    assert bool(stepped) == expect_step, ni
    if expect_step:
      pending, last = 0.0, ni
      stepped_at.append(ni)
    np.testing.assert_array_equal(state.grad_sum['w'], pending)
    assert int(state.last_update_step) == last
  assert int(state.num_updates) == len(stepped_at)
  # Warm-up lasts 12 steps and accumulate ramps 1 -> 4: the two rules differ there.
  expected = {
    False: [0, 1, 2, 4, 6, 9, 12, 16, 20, 24],
    True: [0, 1, 3, 5, 8, 12, 16, 20, 24],
  }
  assert stepped_at == expected[since_last]


def _torch_net(seed: int) -> torch.nn.Module:
  torch.manual_seed(seed)
  net = torch.nn.Module()
  net.conv = torch.nn.Conv2d(3, 4, 3, bias=False)
  net.bn = torch.nn.BatchNorm2d(4)
  net.head = torch.nn.Module()  # carries implicit vectors the way IAuxDetect does
  net.head.ia = torch.nn.ModuleList([common.ImplicitA(4)])
  net.head.m = torch.nn.Conv2d(4, 6, 1)
  net.head.im = torch.nn.ModuleList([common.ImplicitM(6)])
  with torch.no_grad():
    net.bn.weight.uniform_(0.5, 1.5)
    net.bn.bias.normal_(0.0, 0.2)
  return net


def _upstream_groups(net: torch.nn.Module):
  pg0, pg1, pg2 = [], [], []
  for v in net.modules():
    if hasattr(v, 'bias') and isinstance(v.bias, torch.nn.Parameter):
      pg2.append(v.bias)
    if isinstance(v, torch.nn.BatchNorm2d):
      pg0.append(v.weight)
    elif hasattr(v, 'weight') and isinstance(v.weight, torch.nn.Parameter):
      pg1.append(v.weight)
    for name in ('im', 'ia'):
      if hasattr(v, name):
        pg0.extend(iv.implicit for iv in getattr(v, name))
  return pg0, pg1, pg2


def _to_flax(net: torch.nn.Module) -> dict:
  """Flax layout of the torch tensors: params and batch statistics."""

  def t(x: torch.Tensor) -> np.ndarray:
    return x.detach().numpy().copy()

  return {
    'params': {
      'conv': {'kernel': t(net.conv.weight).transpose(2, 3, 1, 0)},
      'bn': {'scale': t(net.bn.weight), 'bias': t(net.bn.bias)},
      'ia': {'implicit': t(net.head.ia[0].implicit).reshape(-1)},
      'm': {'kernel': t(net.head.m.weight).transpose(2, 3, 1, 0), 'bias': t(net.head.m.bias)},
      'im': {'implicit': t(net.head.im[0].implicit).reshape(-1)},
    },
    'batch_stats': {'bn': {'mean': t(net.bn.running_mean), 'var': t(net.bn.running_var)}},
  }


def _to_torch_grads(net: torch.nn.Module, grads: dict) -> dict[int, torch.Tensor]:
  """Flax-layout gradients keyed by the ``id`` of the torch parameter they belong to."""
  g = {
    k: {n: torch.from_numpy(np.ascontiguousarray(v)) for n, v in d.items()}
    for k, d in grads.items()
  }
  pairs = [
    (net.conv.weight, g['conv']['kernel'].permute(3, 2, 0, 1)),
    (net.bn.weight, g['bn']['scale']),
    (net.bn.bias, g['bn']['bias']),
    (net.head.ia[0].implicit, g['ia']['implicit'].reshape(1, -1, 1, 1)),
    (net.head.m.weight, g['m']['kernel'].permute(3, 2, 0, 1)),
    (net.head.m.bias, g['m']['bias']),
    (net.head.im[0].implicit, g['im']['implicit'].reshape(1, -1, 1, 1)),
  ]
  return {id(p): grad.contiguous() for p, grad in pairs}


def _max_relative_error(got: dict, want: dict) -> float:
  errors = jax.tree.map(
    lambda a, b: float(np.max(np.abs(np.asarray(a) - b)) / max(np.max(np.abs(b)), 1e-12)),
    got,
    want,
  )
  return max(jax.tree.leaves(errors))


@pytest.mark.parametrize('since_last', [False, True])
def test_matches_torch_sgd_and_model_ema(since_last):
  epochs, nb, batch_size, min_warmup = 5, 7, 16, 10
  recipe = optim.RecipeConfig(min_warmup_steps=min_warmup, step_since_last=since_last)
  schedule = optim.Schedule(epochs=epochs, batch_size=batch_size, steps_per_epoch=nb, recipe=recipe)
  net = _torch_net(seed=0)
  variables = _to_flax(net)
  rng = np.random.default_rng(1)

  # Torch, as the original trainer drives it.
  accumulate = max(round(NBS / batch_size), 1)
  weight_decay = HYP['weight_decay'] * batch_size * accumulate / NBS
  pg0, pg1, pg2 = _upstream_groups(net)
  assert (len(pg0), len(pg1), len(pg2)) == (3, 2, 2)
  optimizer = torch.optim.SGD(pg0, lr=HYP['lr0'], momentum=HYP['momentum'], nesterov=True)
  optimizer.add_param_group({'params': pg1, 'weight_decay': weight_decay})
  optimizer.add_param_group({'params': pg2})
  lf = lambda x: ((1 - math.cos(x * math.pi / epochs)) / 2) * (HYP['lrf'] - 1) + 1  # noqa: E731
  scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=lf)
  model_ema = ModelEMA(net)
  nw = max(round(HYP['warmup_epochs'] * nb), min_warmup)
  last_opt_step = -1

  # Ours.
  labels = sgd.param_labels(variables['params'])
  opt = sgd.recipe_optimizer(labels, schedule=schedule)
  params = jax.tree.map(jnp.asarray, variables['params'])
  state = opt.init(params)
  ema_tree = ema.ema_init(variables)

  traces = []

  @jax.jit
  def train_step(grads, state, params, ema_tree, batch_stats, hparams):
    traces.append(1)  # runs only while tracing
    params, state, stepped = opt.update(grads, state, params, hparams=hparams)
    model = {'params': params, 'batch_stats': batch_stats}
    ema_tree = jax.lax.cond(
      stepped,
      lambda e: ema.ema_update(e, model, updates=state.num_updates),
      lambda e: e,
      ema_tree,
    )
    return params, state, ema_tree, stepped

  param_errors, ema_errors, steps = [], [], 0
  for epoch in range(epochs):
    optimizer.zero_grad()
    for i in range(nb):
      ni = i + nb * epoch
      if ni <= nw:
        xi = [0, nw]
        accumulate = max(1, np.interp(ni, xi, [1, NBS / batch_size]).round())
        for j, x in enumerate(optimizer.param_groups):
          x['lr'] = np.interp(
            ni, xi, [HYP['warmup_bias_lr'] if j == 2 else 0.0, x['initial_lr'] * lf(epoch)]
          )
          x['momentum'] = np.interp(ni, xi, [HYP['warmup_momentum'], HYP['momentum']])
      grads = jax.tree.map(
        lambda p: rng.standard_normal(p.shape).astype(np.float32), variables['params']
      )
      torch_grads = _to_torch_grads(net, grads)
      for group in optimizer.param_groups:
        for p in group['params']:
          p.grad = torch_grads[id(p)] if p.grad is None else p.grad + torch_grads[id(p)]
      with torch.no_grad():  # stand-in for the BatchNorm statistics a forward pass updates
        net.bn.running_mean.normal_(0.0, 0.3)
        net.bn.running_var.uniform_(0.5, 1.5)
      if not since_last:
        torch_steps = ni % accumulate == 0
      else:
        torch_steps = ni - last_opt_step >= accumulate
      if torch_steps:
        optimizer.step()
        optimizer.zero_grad()
        model_ema.update(net)
        last_opt_step = ni

      hparams = optim.hyperparams(ni, schedule=schedule)
      np.testing.assert_allclose(hparams.lrs, [g['lr'] for g in optimizer.param_groups], rtol=1e-15)
      batch_stats = _to_flax(net)['batch_stats']
      params, state, ema_tree, stepped = train_step(
        grads, state, params, ema_tree, batch_stats, hparams
      )
      assert bool(stepped) == bool(torch_steps), ni
      steps += int(torch_steps)
      param_errors.append(_max_relative_error(params, _to_flax(net)['params']))
      ema_errors.append(_max_relative_error(ema_tree, _to_flax(model_ema.ema)))
    scheduler.step()

  assert int(state.num_updates) == steps == model_ema.updates
  assert len(traces) == 1  # one compilation through warm-up and after it
  assert max(param_errors) < 1e-6, max(param_errors)
  assert max(ema_errors) < 1e-6, max(ema_errors)


def test_ema_ramp_and_update():
  assert float(ema.ema_decay(1)) == pytest.approx(0.9999 * (1 - math.exp(-1 / 2000)), rel=1e-6)
  assert float(ema.ema_decay(2000)) == pytest.approx(0.9999 * (1 - math.exp(-1)), rel=1e-6)
  assert float(ema.ema_decay(10**6)) == pytest.approx(0.9999, rel=1e-6)
  average = {'w': jnp.full(3, 2.0), 'count': jnp.asarray(7, jnp.int32)}
  model = {'w': jnp.full(3, 4.0), 'count': jnp.asarray(9, jnp.int32)}
  d = 0.9999 * (1 - math.exp(-3 / 2000))
  new = ema.ema_update(average, model, updates=3)
  np.testing.assert_allclose(new['w'], d * 2.0 + (1 - d) * 4.0, rtol=1e-6)
  assert int(new['count']) == 7  # only floating leaves are averaged
  copy = ema.ema_init(model)
  assert copy['w'] is not model['w']
  np.testing.assert_array_equal(copy['w'], model['w'])
  with pytest.raises(ValueError, match='differ'):
    ema.ema_update(average, {'w': model['w']}, updates=1)


@pytest.mark.parametrize(('num_classes', 'image_size'), [(80, 640), (3, 1280)])
def test_scaled_loss_gains(num_classes, image_size):
  config = reorg_jax.LossConfig.p6(num_classes)
  scaled = optim.scaled_loss_gains(config, image_size=image_size)
  hyp = {'box': 0.05, 'cls': 0.3, 'obj': 0.7}  # hyp.scratch.p6
  nl, nc, imgsz = 4, num_classes, image_size
  hyp['box'] *= 3.0 / nl
  hyp['cls'] *= nc / 80.0 * 3.0 / nl
  hyp['obj'] *= (imgsz / 640) ** 2 * 3.0 / nl
  assert (scaled.box, scaled.cls, scaled.obj) == (hyp['box'], hyp['cls'], hyp['obj'])
  if (num_classes, image_size) == (80, 640):
    assert (scaled.box, scaled.cls, scaled.obj) == pytest.approx((0.0375, 0.225, 0.525))
  else:
    assert (scaled.box, scaled.cls, scaled.obj) == pytest.approx((0.0375, 0.0084375, 2.1))
  assert scaled.anchors == config.anchors and scaled.balance == config.balance
