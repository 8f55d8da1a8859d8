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

The tap gradients are XLA:CPU's: :func:`gradients_by_taps` is the CPU branch
of a ``lax.platform_dependent`` whose other branch, for GPUs and TPUs, is
XLA's own (:func:`xla_gradients`; the taps were not measured there), chosen
when the step is lowered, so each platform's program holds one of them. Each
tap function is one ``fori_loop`` over the taps, so that one strided window
(or one tap's product) exists at a time: written as ``k * k`` unrolled
products, XLA:CPU kept them alive together and its memory analysis of the W6
step at 1280 px, batch 16, bfloat16, ``Remat.BLOCKS`` grew from 17.9 GiB
(XLA's gradients) to 19.9 GiB (E6E: 38.2 to 44.3 GiB); as loops it is
19.5 GiB (E6E 42.0 GiB; the README's remat table). Timed one layer shape of
W6 at a time, the loops' kernel gradients ran 1.0-1.4x faster than the
unrolled ones, their strided input gradients 0.6-1.2x as fast (slowest on the
smallest maps); the whole step's time stayed within the runs' spread.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

__all__ = [
  'conv_nhwc',
  'gradients_by_taps',
  'input_gradient_by_taps',
  'reference_conv',
  'weight_gradient_by_taps',
  'weight_gradient_by_taps_wins',
  'xla_gradients',
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


def _phase_view(
  *, kernel_size: tuple[int, int], strides: tuple[int, int], out_size: tuple[int, int]
) -> tuple[int, int]:
  """``(H_q, W_q)``: the phase rows and columns of the padded input that reach the last tap.

  Row ``r`` of the padded input is row ``r // s`` of phase ``r % s``, so in a
  ``[B, H_q, s_h, W_q, s_w, F]`` view every tap's strided window is one
  contiguous block (:func:`_tap_block`); ``H_q = (kh - 1) // s_h + H'``.
  """
  (kh, kw), (sh, sw), (out_height, out_width) = kernel_size, strides, out_size
  return (kh - 1) // sh + out_height, (kw - 1) // sw + out_width


def _tap_block(
  index: jax.Array,
  *,
  kernel_width: int,
  strides: tuple[int, int],
  shape: tuple[int, int, int, int],
) -> tuple[tuple[jax.Array | int, ...], tuple[int, ...]]:
  """Start and size of tap ``index``'s window in the ``[B, H_q, s_h, W_q, s_w, F]`` view.

  ``shape`` is ``(B, H', W', F)``; tap ``(i, j) = divmod(index, kw)`` covers rows
  ``i // s_h ...`` of phase ``i % s_h`` and columns likewise (:func:`_phase_view`).
  """
  (sh, sw), (batch, out_height, out_width, features) = strides, shape
  i, j = index // kernel_width, index % kernel_width
  start = (0, i // sh, i % sh, j // sw, j % sw, 0)
  return start, (batch, out_height, 1, out_width, 1, features)


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
  that tap multiplied in the forward pass). The taps run in a ``fori_loop``
  over one ``[B, H_q, s, W_q, s, I]`` view of the padded input, in which each
  window is a contiguous block, so one window exists at a time.

  Args:
    x: the convolution's input ``[B, H, W, I]``.
    output_gradient: the gradient of its output ``[B, H', W', O]``.
    kernel_size: ``(kh, kw)``.
    strides: ``(s_h, s_w)``.
    padding: ``((top, bottom), (left, right))`` zero padding, each >= 0.
    precision: of the matrix products.
  """
  batch, out_height, out_width, out_features = output_gradient.shape
  _, height, width, in_features = x.shape
  (kh, kw), (sh, sw) = kernel_size, strides
  (top, _), (left, _) = padding
  # The padded input as phases (_phase_view): padded rows beyond the last tap's are cropped
  # (negative high padding), rows missing below are zeros.
  phase_height, phase_width = _phase_view(
    kernel_size=kernel_size, strides=strides, out_size=(out_height, out_width)
  )
  padded = lax.pad(
    x,
    jnp.zeros((), x.dtype),
    (
      (0, 0, 0),
      (top, phase_height * sh - height - top, 0),
      (left, phase_width * sw - width - left, 0),
      (0, 0, 0),
    ),
  )
  phases = padded.reshape(batch, phase_height, sh, phase_width, sw, in_features)
  gradient = output_gradient.reshape(-1, out_features)  # [N, O]
  dtype = jnp.result_type(x.dtype, output_gradient.dtype)

  def tap(index: jax.Array, taps: jax.Array) -> jax.Array:
    start, size = _tap_block(
      index, kernel_width=kw, strides=strides, shape=(batch, out_height, out_width, in_features)
    )
    window = lax.dynamic_slice(phases, start, size).reshape(-1, in_features)  # [N, I]
    product = lax.dot_general(
      window, gradient, (((0,), (0,)), ((), ())), precision=precision
    )  # [I, O]
    return lax.dynamic_update_index_in_dim(taps, product.astype(dtype), index, 0)

  # A loop, not k * k unrolled products: XLA:CPU then keeps one window alive at a time (the
  # unrolled form held them together: +25% memory on W6's step at 640 px, batch 4).
  taps = lax.fori_loop(0, kh * kw, tap, jnp.zeros((kh * kw, in_features, out_features), dtype))
  return taps.reshape(kh, kw, in_features, out_features)


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
  it there); the taps' sum, less the padding, is the gradient. The taps run
  in a ``fori_loop`` adding each product in place into one sum. XLA:CPU runs
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
  batch, out_height, out_width, _ = output_gradient.shape
  _, height, width, in_features = input_shape
  (kh, kw), (sh, sw) = kernel.shape[:2], strides
  (top, bottom), (left, right) = padding
  # The taps are summed here, not inside one product: in at least float32 (bfloat16 sums
  # would round at every tap), returned in that dtype.
  accumulate = jnp.promote_types(output_gradient.dtype, jnp.float32)
  # The padded input's rows and columns as phases (_phase_view): tap (i, j) adds to one
  # contiguous block of the [B, H_q, s_h, W_q, s_w, I] sum.
  phase_height, phase_width = _phase_view(
    kernel_size=(kh, kw), strides=strides, out_size=(out_height, out_width)
  )

  def tap(index: jax.Array, total: jax.Array) -> jax.Array:
    i, j = index // kw, index % kw
    weights = lax.dynamic_index_in_dim(
      lax.dynamic_index_in_dim(kernel, i, 0, keepdims=False), j, 0, keepdims=False
    )  # [I, O]
    product = lax.dot_general(
      output_gradient,
      weights,
      (((3,), (1,)), ((), ())),
      precision=precision,
      preferred_element_type=accumulate,
    )  # [B, H', W', I]
    start, size = _tap_block(
      index, kernel_width=kw, strides=strides, shape=(batch, out_height, out_width, in_features)
    )
    block = lax.dynamic_slice(total, start, size)
    return lax.dynamic_update_slice(total, block + product.reshape(size), start)

  # A loop: one tap's product alive at a time, summed in place (unrolled, XLA:CPU kept the
  # k * k products alive together).
  total = lax.fori_loop(
    0,
    kh * kw,
    tap,
    jnp.zeros((batch, phase_height, sh, phase_width, sw, in_features), accumulate),
  ).reshape(batch, phase_height * sh, phase_width * sw, in_features)
  # Padded rows and columns no tap reaches got nothing: zeros, then the padding is cropped.
  total = lax.pad(
    total,
    jnp.zeros((), accumulate),
    (
      (0, 0, 0),
      (0, max(0, height + top + bottom - phase_height * sh), 0),
      (0, max(0, width + left + right - phase_width * sw), 0),
      (0, 0, 0),
    ),
  )
  return total[:, top : top + height, left : left + width]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_with_tap_gradient(
  x: jax.Array,
  kernel: jax.Array,
  strides: tuple[int, int],
  padding: Padding,
  precision: lax.PrecisionLike,
) -> jax.Array:
  """XLA's convolution, differentiated by :func:`gradients_by_taps` in a step compiled for the
  CPU and by :func:`xla_gradients` elsewhere."""
  return reference_conv(x, kernel, strides=strides, padding=padding, precision=precision)


def _conv_forward(x, kernel, strides, padding, precision):
  return _conv_with_tap_gradient(x, kernel, strides, padding, precision), (x, kernel)


def gradients_by_taps(
  x: jax.Array,
  kernel: jax.Array,
  output_gradient: jax.Array,
  *,
  strides: tuple[int, int],
  padding: Padding,
  precision: lax.PrecisionLike = None,
) -> tuple[jax.Array, jax.Array]:
  """A convolution's gradients by input and kernel as XLA:CPU runs them fast.

  ``[B, H, W, I], [k, k, I, O], [B, H', W', O] -> ([B, H, W, I], [k, k, I, O])``
  in the dtypes of ``x`` and ``kernel``: by kernel :func:`weight_gradient_by_taps`;
  by input :func:`input_gradient_by_taps` when strided, else XLA's.
  """
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


def xla_gradients(
  x: jax.Array,
  kernel: jax.Array,
  output_gradient: jax.Array,
  *,
  strides: tuple[int, int],
  padding: Padding,
  precision: lax.PrecisionLike = None,
) -> tuple[jax.Array, jax.Array]:
  """XLA's own gradients of :func:`reference_conv` (the shapes of :func:`gradients_by_taps`)."""
  _, backward = jax.vjp(
    lambda x, kernel: reference_conv(
      x, kernel, strides=strides, padding=padding, precision=precision
    ),
    x,
    kernel,
  )
  return backward(output_gradient)


def _conv_backward(strides, padding, precision, residuals, output_gradient):
  x, kernel = residuals
  # The taps are measured to pay on XLA:CPU only; GPUs and TPUs keep XLA's gradients
  # (cuDNN's on CUDA). The branch is chosen when the step is lowered for its platform: the
  # other is not in the compiled program.
  options = {'strides': strides, 'padding': padding, 'precision': precision}
  return lax.platform_dependent(
    x,
    kernel,
    output_gradient,
    cpu=functools.partial(gradients_by_taps, **options),
    default=functools.partial(xla_gradients, **options),
  )


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
