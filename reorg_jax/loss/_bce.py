"""Binary cross-entropy with logits in the forms the loss uses.

Glossary: ``B`` batch, ``N`` packed places, ``R`` rows, ``C`` classes.

``softplus`` with its derivative, the class BCE of an entry summed over the
classes from per-row sums (no ``[B, N, C]`` target is built), and that sum's
derivative by the class logits, which the loss's backward pass evaluates at
the cells of the positives.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from reorg_jax.loss._config import LossConfig
from reorg_jax.loss._slots import take_rows

__all__ = ['class_gradient', 'class_sums', 'softplus']


@jax.custom_jvp
def softplus(x: jax.Array) -> jax.Array:
  """``log(1 + exp(x))``, element-wise, with derivative ``sigmoid(x)``.

  ``logaddexp(x, 0)``, that is ``max(x, 0) + log1p(exp(-|x|))``. Written with
  ``where``, XLA:CPU read the strided objectness channel of the head outputs
  twice (one fusion for each term); as ``logaddexp`` it reads it once, and the
  loss's dense objectness sum takes about half the time.
  """
  return jnp.logaddexp(x, 0.0)


@softplus.defjvp
def _softplus_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  return softplus(x), dx * jax.nn.sigmoid(x)


def class_sums(
  rows: jax.Array, place: jax.Array, true_class: jax.Array, config: LossConfig
) -> jax.Array:
  """``[B, N]`` class BCE summed over classes, against the smoothed one-hot class.

  With targets ``t_c`` equal to ``cn`` except ``cp`` at the true class and
  ``pw = cls_pw``, ``BCE = (1 + (pw - 1) t) softplus(x) - pw t x``; the class
  sum needs only ``sum softplus`` and ``sum x`` of each row and the true
  class's logit.

  Args:
    rows: ``[B, R, 5 + C]`` head outputs.
    place: ``[B, N]`` row of each entry.
    true_class: ``[B, N]`` class of each entry's box.
    config: ``label_smoothing`` and ``cls_pw``.
  """
  smooth = config.label_smoothing
  high, low = 1.0 - 0.5 * smooth, 0.5 * smooth
  pw = config.cls_pw
  logits = rows[..., 5:]
  softplus_sum = take_rows(jnp.sum(softplus(logits), axis=-1), place)  # [B, N]
  logit_sum = take_rows(jnp.sum(logits, axis=-1), place)
  true_logit = jax.vmap(lambda values, row, c: values[row, c])(logits, place, true_class)
  return (
    (1.0 + (pw - 1.0) * low) * softplus_sum
    + (pw - 1.0) * (high - low) * softplus(true_logit)
    - pw * (low * logit_sum + (high - low) * true_logit)
  )


def class_gradient(
  logits: jax.Array, positive: jax.Array, true_class: jax.Array, config: LossConfig
) -> jax.Array:
  """``[..., C]`` derivative of :func:`class_sums` of one entry by its class logits.

  ``(1 + (pw - 1) t_c) sigmoid(x_c) - pw t_c`` with ``t_c`` the smoothed
  one-hot target; 0 where the entry is not ``positive``.

  Args:
    logits: ``[..., C]`` class logits at the entry's cell.
    positive: ``[...]`` the entry is a positive.
    true_class: ``[...]`` class of its box.
    config: ``label_smoothing`` and ``cls_pw``.
  """
  smooth = config.label_smoothing
  high, low = 1.0 - 0.5 * smooth, 0.5 * smooth
  pw = config.cls_pw
  target = jnp.where(jnp.arange(config.num_classes) == true_class[..., None], high, low)
  gradient = (1.0 + (pw - 1.0) * target) * jax.nn.sigmoid(logits) - pw * target
  return jnp.where(positive[..., None], gradient, 0.0)
