"""Exponential moving average of the model, as upstream's ``ModelEMA``.

The EMA starts as a copy of the model's variables (``params`` and
``batch_stats``) and after every optimizer step ``n`` (1-based) each
floating-point leaf becomes ``d(n) * ema + (1 - d(n)) * model`` with the
ramped decay ``d(n) = ema_decay * (1 - exp(-n / ema_ramp))``
(``0.9999`` and ``2000`` in :data:`reorg_jax.training.optim.P6_RECIPE`). The ramp
keeps early EMAs close to the model: ``d(1) ~ 5e-4``, ``d(2000) ~ 0.632``.

Typical use inside a jitted train step, after
:func:`reorg_jax.training.sgd.recipe_optimizer`'s ``update``::

  params, opt_state, stepped = optimizer.update(grads, opt_state, params, hparams=hparams)
  variables = {'params': params, 'batch_stats': batch_stats}
  ema = jax.lax.cond(
    stepped,
    lambda e: ema_update(e, variables, updates=opt_state.num_updates),
    lambda e: e,
    ema,
  )
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from reorg_jax.training.optim import P6_RECIPE, RecipeConfig

__all__ = ['ema_decay', 'ema_init', 'ema_update']


def ema_init(model: Any) -> Any:
  """The initial EMA: a copy of ``model`` (a pytree of arrays)."""
  return jax.tree.map(jnp.array, model)


def ema_decay(updates: jax.Array | int, *, recipe: RecipeConfig = P6_RECIPE) -> jax.Array:
  """``[]`` float32 decay after ``updates`` optimizer steps.

  ``recipe.ema_decay * (1 - exp(-updates / recipe.ema_ramp))``, with
  ``1 - exp(-x)`` as ``-expm1(-x)`` so that float32 keeps full relative
  precision while ``updates`` is small.
  """
  updates = jnp.asarray(updates, jnp.float32)
  return recipe.ema_decay * -jnp.expm1(-updates / recipe.ema_ramp)


def ema_update(
  ema: Any, model: Any, *, updates: jax.Array | int, recipe: RecipeConfig = P6_RECIPE
) -> Any:
  """One EMA update, after optimizer step number ``updates``.

  Args:
    ema: the current EMA, a pytree with the structure of ``model``.
    model: the model's variables after the optimizer step.
    updates: 1-based count of optimizer steps including this one (upstream
      increments its counter before computing the decay), e.g.
      ``reorg_jax.training.sgd.RecipeState.num_updates`` after the step; may be traced.
    recipe: supplies ``ema_decay`` and ``ema_ramp``.

  Returns:
    The new EMA: floating leaves ``d * ema + (1 - d) * model`` with
    ``d = ema_decay(updates)``, in the leaf's dtype; other leaves (integer
    counters) are kept from ``ema``.

  Raises:
    ValueError: ``ema`` and ``model`` have different structures.
  """
  ema_def, model_def = jax.tree.structure(ema), jax.tree.structure(model)
  if ema_def != model_def:
    raise ValueError(f'EMA and model trees differ: {ema_def} vs {model_def}')
  decay = ema_decay(updates, recipe=recipe)

  def leaf(average: jax.Array, value: jax.Array) -> jax.Array:
    average = jnp.asarray(average)
    if not jnp.issubdtype(average.dtype, jnp.floating):
      return average
    d = decay.astype(average.dtype)
    return average * d + (1 - d) * jnp.asarray(value, average.dtype)

  return jax.tree.map(leaf, ema, model)
