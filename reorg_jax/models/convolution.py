"""The model's convolutions, written so that XLA:CPU runs them and their gradients fast.

Glossary: ``B`` batch, ``H``/``W`` input height/width, ``H'``/``W'`` output
height/width, ``I`` input channels, ``O`` output channels, ``k`` kernel size,
``s`` stride, ``N = B * H' * W'`` output positions.

:func:`conv_nhwc` stands in for ``lax.conv_general_dilated`` in the model's
``nn.Conv`` layers (their ``conv_general_dilated`` attribute): the same
function of the same ``[k, k, I, O]`` kernel, so variables, imported weights
and every caller are unchanged; only the operations XLA is given differ.
Profiled on a 2-core AMD EPYC (``benchmarks/step_profile.py``), our YOLOv7-W6
step at 640 px spent 40% of its time in the convolutions' gradients by weight,
more than in the forward convolutions and the gradients by input together.
XLA differentiates a convolution into another convolution whose window is the
whole ``H' x W'`` image, a shape its CPU kernels run slowly. So:

* a ``1x1`` convolution with stride 1 and no padding is a matrix product over
  channels, ``[B, H, W, I] @ [I, O]`` (``dot_general``), and its two
  gradients are matrix products too (XLA:CPU: forward 1.7x, by input 1.6x, by
  weight 4-9x faster than as convolutions, on W6's shapes);
* any other convolution (no dilation, one feature group) keeps XLA's forward
  and gradient by input, and, where :func:`weight_gradient_by_taps_wins`,
  computes its gradient by weight as one matrix product per kernel tap
  (:func:`weight_gradient_by_taps`: ``k * k`` products
  ``[I, N] @ [N, O]`` of the strided input window of that tap with the output
  gradient), through a ``jax.custom_vjp``; a strided one computes its
  gradient by input by taps too (:func:`input_gradient_by_taps`: XLA:CPU
  runs it as a convolution of the zero-dilated gradient outside its fast
  kernels, 1.5x slower on W6's five strided layers).

Everything else (grouped or dilated convolutions, other layouts) goes to
``lax.conv_general_dilated`` as it is. The arithmetic is the same sums in
another order: results agree with XLA's convolutions to float rounding
(``tests/test_convolution.py`` compares both ways on adversarial shapes, in
float64, float32 and bfloat16, with and without ``jit``).

The cost is memory: the taps' strided input windows and placed products are
temporaries XLA's own convolution gradients do not have. XLA:CPU's memory
analysis of the W6 step at 1280 px, batch 16, bfloat16 grew from 17.9 to
19.9 GiB with ``Remat.BLOCKS`` and from 41.8 to 59.3 GiB with ``Remat.NONE``
(E6E ``BLOCKS``: 38.2 to 44.3 GiB; the README's remat table).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

__all__ = [
  'conv_nhwc',
  'input_gradient_by_taps',
  'reference_conv',
  'weight_gradient_by_taps',
  'weight_gradient_by_taps_wins',
]

Padding = tuple[tuple[int, int], tuple[int, int]]

# lax's dimension numbers of NHWC inputs, HWIO kernels and NHWC outputs (nn.Conv's layout).
_NHWC = lax.ConvDimensionNumbers(
  lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2)
)

# Where the gradient by weight as k * k matrix products beats XLA:CPU's own, measured per
# layer shape of W6 (640 px, batch 2) and of the small model (256 px, batch 8) on a 2-core
# AMD EPYC: for strided convolutions (all of W6's, 1.3-2.2x; the small model's two
# narrowest lost by 0.1-0.3 ms), and for stride 1 once I * O reaches this
# (192 x 192 and 128 x 256 won by 10-45%; 128 x 128 and smaller lost by up to 3x at
# 80 x 80 and larger, where XLA's one pass over the input beats k * k strided copies).
_TAPS_MIN_CHANNEL_PRODUCT = 128 * 256


def reference_conv(
  x: jax.Array,
  kernel: jax.Array,
  *,
  strides: tuple[int, int],
  padding: Padding,
  precision: lax.PrecisionLike = None,
) -> jax.Array:
  """XLA's convolution: ``[B, H, W, I], [k, k, I, O] -> [B, H', W', O]``."""
  return lax.conv_general_dilated(
    x, kernel, strides, padding, dimension_numbers=_NHWC, precision=precision
  )


def weight_gradient_by_taps_wins(
  *, in_features: int, out_features: int, strides: tuple[int, int]
) -> bool:
  """Whether :func:`weight_gradient_by_taps` is used for a ``k x k`` convolution (``k > 1``)."""
  return max(strides) > 1 or in_features * out_features >= _TAPS_MIN_CHANNEL_PRODUCT


def weight_gradient_by_taps(
  x: jax.Array,
  output_gradient: jax.Array,
  *,
  kernel_size: tuple[int, int],
  strides: tuple[int, int],
  padding: Padding,
  precision: lax.PrecisionLike = None,
) -> jax.Array:
  """The gradient of a convolution by its kernel, one matrix product per tap.

  ``[B, H, W, I], [B, H', W', O] -> [kh, kw, I, O]``: tap ``(i, j)`` is
  ``window(i, j)ᵀ @ output_gradient`` over the ``N`` output positions, where
  ``window(i, j)`` is the zero-padded input sampled at rows
  ``i, i + s, ..., i + s (H' - 1)`` and columns likewise (the input values
  that tap multiplied in the forward pass).

  Args:
    x: the convolution's input ``[B, H, W, I]``.
    output_gradient: the gradient of its output ``[B, H', W', O]``.
    kernel_size: ``(kh, kw)``.
    strides: ``(s_h, s_w)``.
    padding: ``((top, bottom), (left, right))`` zero padding, each >= 0.
    precision: of the matrix products.
  """
  batch, out_height, out_width, out_features = output_gradient.shape
  in_features = x.shape[-1]
  padded = jnp.pad(x, ((0, 0), *padding, (0, 0)))
  gradient = output_gradient.reshape(-1, out_features)  # [N, O]
  taps = []
  for i in range(kernel_size[0]):
    for j in range(kernel_size[1]):
      window = lax.slice(
        padded,
        (0, i, j, 0),
        (
          batch,
          i + strides[0] * (out_height - 1) + 1,
          j + strides[1] * (out_width - 1) + 1,
          in_features,
        ),
        (1, strides[0], strides[1], 1),
      )  # [B, H', W', I]
      taps.append(
        lax.dot_general(
          window.reshape(-1, in_features), gradient, (((0,), (0,)), ((), ())), precision=precision
        )  # [I, O]
      )
  return jnp.stack(taps).reshape(*kernel_size, in_features, out_features)


def input_gradient_by_taps(
  output_gradient: jax.Array,
  kernel: jax.Array,
  *,
  input_shape: Sequence[int],
  strides: tuple[int, int],
  padding: Padding,
  precision: lax.PrecisionLike = None,
) -> jax.Array:
  """The gradient of a convolution by its input, one matrix product per tap.

  ``[B, H', W', O], [kh, kw, I, O] -> [B, H, W, I]``: tap ``(i, j)`` gives
  ``output_gradient @ kernel[i, j]ᵀ`` (``[B, H', W', I]``), which belongs at
  rows ``i, i + s, ..., i + s (H' - 1)`` and columns likewise of the padded
  input (zero padding with ``s - 1`` zeros between the rows and columns puts
  it there); the taps' sum, less the padding, is the gradient. XLA:CPU runs
  a strided convolution's gradient by input as a convolution of the
  zero-dilated output gradient, outside its fast convolution kernels.

  Args:
    output_gradient: the gradient of the output ``[B, H', W', O]``.
    kernel: the convolution's kernel ``[kh, kw, I, O]``.
    input_shape: ``(B, H, W, I)`` of the convolution's input.
    strides: ``(s_h, s_w)``.
    padding: ``((top, bottom), (left, right))`` zero padding, each >= 0.
    precision: of the matrix products.

  Returns:
    ``[B, H, W, I]`` in float32 or the inputs' dtype if wider.
  """
  _, out_height, out_width, _ = output_gradient.shape
  _, height, width, _ = input_shape
  (top, bottom), (left, right) = padding
  padded_height, padded_width = height + top + bottom, width + left + right
  # The taps are summed here, not inside one product: in at least float32 (bfloat16 sums
  # would round at every tap), returned in that dtype.
  accumulate = jnp.promote_types(output_gradient.dtype, jnp.float32)
  zero = jnp.zeros((), accumulate)
  total = None
  for i in range(kernel.shape[0]):
    for j in range(kernel.shape[1]):
      tap = lax.dot_general(
        output_gradient,
        kernel[i, j],
        (((3,), (1,)), ((), ())),
        precision=precision,
        preferred_element_type=accumulate,
      )  # [B, H', W', I]
      placed = lax.pad(
        tap,
        zero,
        (
          (0, 0, 0),
          (i, padded_height - i - strides[0] * (out_height - 1) - 1, strides[0] - 1),
          (j, padded_width - j - strides[1] * (out_width - 1) - 1, strides[1] - 1),
          (0, 0, 0),
        ),
      )  # [B, H + top + bottom, W + left + right, I]
      total = placed if total is None else total + placed
  return total[:, top : top + height, left : left + width]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_with_tap_gradient(
  x: jax.Array,
  kernel: jax.Array,
  strides: tuple[int, int],
  padding: Padding,
  precision: lax.PrecisionLike,
) -> jax.Array:
  """XLA's convolution, differentiated by :func:`weight_gradient_by_taps` (and, strided, by
  :func:`input_gradient_by_taps`)."""
  return reference_conv(x, kernel, strides=strides, padding=padding, precision=precision)


def _conv_forward(x, kernel, strides, padding, precision):
  return _conv_with_tap_gradient(x, kernel, strides, padding, precision), (x, kernel)


def _conv_backward(strides, padding, precision, residuals, output_gradient):
  x, kernel = residuals
  if max(strides) > 1:
    input_gradient = input_gradient_by_taps(
      output_gradient,
      kernel,
      input_shape=x.shape,
      strides=strides,
      padding=padding,
      precision=precision,
    )
  else:
    _, by_input = jax.vjp(
      lambda x: reference_conv(x, kernel, strides=strides, padding=padding, precision=precision),
      x,
    )
    (input_gradient,) = by_input(output_gradient)
  kernel_gradient = weight_gradient_by_taps(
    x,
    output_gradient,
    kernel_size=kernel.shape[:2],
    strides=strides,
    padding=padding,
    precision=precision,
  )
  return input_gradient.astype(x.dtype), kernel_gradient.astype(kernel.dtype)


_conv_with_tap_gradient.defvjp(_conv_forward, _conv_backward)


def _explicit_padding(padding: str | Sequence[tuple[int, int]]) -> Padding | None:
  if isinstance(padding, str) or len(padding) != 2:
    return None
  pairs = tuple((int(low), int(high)) for low, high in padding)
  return pairs if min(min(pair) for pair in pairs) >= 0 else None  # type: ignore[return-value]


def conv_nhwc(
  lhs: jax.Array,
  rhs: jax.Array,
  window_strides: Sequence[int],
  padding: str | Sequence[tuple[int, int]],
  lhs_dilation: Sequence[int] | None = None,
  rhs_dilation: Sequence[int] | None = None,
  dimension_numbers: lax.ConvGeneralDilatedDimensionNumbers = None,
  feature_group_count: int = 1,
  batch_group_count: int = 1,
  precision: lax.PrecisionLike = None,
  preferred_element_type: jnp.dtype | None = None,
) -> jax.Array:
  """``lax.conv_general_dilated``'s signature and result, faster on XLA:CPU (module docstring).

  ``[B, H, W, I], [k, k, I, O] -> [B, H', W', O]`` for NHWC/HWIO/NHWC
  dimension numbers (``nn.Conv``'s); any other call is passed to
  ``lax.conv_general_dilated`` unchanged.
  """
  strides = tuple(int(s) for s in window_strides)
  pads = _explicit_padding(padding)
  plain = (
    lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == _NHWC
    and lhs.ndim == 4
    and pads is not None
    and all(d == 1 for d in (lhs_dilation or (1, 1)))
    and all(d == 1 for d in (rhs_dilation or (1, 1)))
    and feature_group_count == 1
    and batch_group_count == 1
    and preferred_element_type is None
  )
  if not plain:
    return lax.conv_general_dilated(
      lhs,
      rhs,
      window_strides,
      padding,
      lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count,
      batch_group_count=batch_group_count,
      precision=precision,
      preferred_element_type=preferred_element_type,
    )
  kernel_size = rhs.shape[:2]
  if kernel_size == (1, 1) and strides == (1, 1) and pads == ((0, 0), (0, 0)):
    return lax.dot_general(lhs, rhs[0, 0], (((3,), (0,)), ((), ())), precision=precision)
  if kernel_size != (1, 1) and weight_gradient_by_taps_wins(
    in_features=rhs.shape[2], out_features=rhs.shape[3], strides=strides
  ):
    return _conv_with_tap_gradient(lhs, rhs, strides, pads, precision)
  return reference_conv(lhs, rhs, strides=strides, padding=pads, precision=precision)
