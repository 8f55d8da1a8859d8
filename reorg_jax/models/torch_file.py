"""Reading PyTorch ``.pt`` checkpoints without PyTorch and without running their pickles.

Glossary: *record*, a member of the zip archive; *storage*, the raw bytes of one
or more tensors; *stand-in*, an inert :class:`StandIn` object recorded in place
of a class the pickle names.

File format (``torch.save`` since PyTorch 1.6, protocol 2 pickle): a zip archive
whose records sit under one folder ``<archive>/``:

* ``data.pkl``: the pickled object. A tensor is ``torch._utils._rebuild_tensor_v2(
  storage, offset, size, stride, requires_grad, hooks[, metadata])`` (``offset``,
  ``size``, ``stride`` in elements; ``_rebuild_tensor_v3`` adds a ``dtype`` after
  ``hooks`` for dtypes without a legacy storage class, whose storage is then
  ``torch.storage.UntypedStorage``); a parameter wraps one in
  ``torch._utils._rebuild_parameter``; a storage is the persistent id
  ``('storage', torch.HalfStorage, key, location, numel)``. A module (upstream's
  ``Model``, torch's ``Conv2d``, ...) is ``NEWOBJ`` of its class, then ``BUILD``
  with its ``__dict__``: ``_parameters``, ``_buffers``,
  ``_non_persistent_buffers_set``, ``_modules``, other attributes.
* ``data/<key>``: the bytes of storage ``key``, ``numel`` elements.
* ``byteorder``: ``little`` or ``big`` (absent in old files: little); ``version``
  and, since PyTorch 2.x, ``.format_version``, ``.storage_alignment`` and
  ``.data/serialization_id`` are not needed here.

Safety rule: nothing a file names is imported or called. ``find_class``
answers from a fixed table: the tensor rebuild functions, storage classes and
dtypes, ``collections.OrderedDict``, ``torch.Size``, ``torch.device``,
``_codecs.encode`` (latin-1 only, for bytes) and the data-only builtins
``set``, ``frozenset``, ``bytearray``, ``bytes``, ``complex`` and ``slice``
(protocol 2 spells the module ``__builtin__``) are answered with this module's
own code or the plain Python type. Classes under ``torch.nn.modules.``, ``models.``,
``utils.``, ``sas_yolov7.models.`` and ``sas_yolov7.utils.``, ``torch.Tensor``,
``torch.nn.parameter.Parameter`` and NumPy's array, dtype and scalar
reconstructors become stand-ins that only record their arguments and state
(NumPy arrays of plain numeric dtypes are then rebuilt from their recorded
bytes). Every other name raises :class:`TorchFileError`.

What the objects mean (a model's state dict, a checkpoint's entries) is
:mod:`reorg_jax.models.torch_checkpoint`'s.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import sys
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, NamedTuple

import numpy as np

__all__ = ['StandIn', 'TorchFileError', 'describe', 'read_pt']


class TorchFileError(ValueError):
  """A ``.pt`` file that cannot be read safely: missing, malformed or naming a refused class."""


class StandIn:
  """An inert record of an object of an allowed class; no code of that class ever runs.

  Attributes:
    qualname: ``module.name`` of the class (or function) the pickle named.
    args: positional arguments it was created with.
    kwargs: keyword arguments it was created with (``NEWOBJ_EX`` only).
    state: what ``BUILD`` passed (a module's ``__dict__``), or ``None``.
  """

  __slots__ = ('args', 'kwargs', 'state')
  qualname: ClassVar[str] = ''

  def __new__(cls, *args: Any, **kwargs: Any) -> StandIn:
    obj = object.__new__(cls)
    obj.args, obj.kwargs, obj.state = args, kwargs, None
    return obj

  def __setstate__(self, state: Any) -> None:
    self.state = state

  @property
  def attributes(self) -> dict[str, Any]:
    """The recorded ``__dict__`` (merged with slot state when ``BUILD`` passed both)."""
    state = self.state
    if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], Mapping):
      return {**(state[0] if isinstance(state[0], Mapping) else {}), **state[1]}
    return dict(state) if isinstance(state, Mapping) else {}

  def __repr__(self) -> str:
    return f'<stand-in {self.qualname}>'


# Names recorded as stand-ins: any under these modules, and these exact ones.
_STANDIN_PREFIXES = tuple(
  'torch.nn.modules. models. utils. sas_yolov7.models. sas_yolov7.utils.'.split()
)
_STANDIN_NAMES = frozenset(
  'numpy.core.multiarray._reconstruct numpy._core.multiarray._reconstruct '
  'numpy.core.multiarray.scalar numpy._core.multiarray.scalar numpy.ndarray numpy.dtype '
  'torch.Tensor torch.nn.parameter.Parameter'.split()
)

# Legacy storage class (``torch.<name>``, or ``torch.cuda.<name>`` in files saved from a GPU)
# -> element dtype; ``torch.storage.UntypedStorage`` holds bytes.
_STORAGES = dict(
  pair.split(':')
  for pair in (
    'DoubleStorage:float64 FloatStorage:float32 HalfStorage:float16 BFloat16Storage:bfloat16 '
    'LongStorage:int64 IntStorage:int32 ShortStorage:int16 CharStorage:int8 ByteStorage:uint8 '
    'BoolStorage:bool ComplexFloatStorage:complex64 ComplexDoubleStorage:complex128'
  ).split()
)
_DTYPES = frozenset(
  'float16 float32 float64 bfloat16 float8_e4m3fn float8_e5m2 int8 int16 int32 int64 uint8 uint16 '
  'uint32 uint64 bool complex64 complex128'.split()
)
# Plain NumPy type codes rebuilt from pickled arrays; anything else stays a stand-in.
_NUMPY_CODES = frozenset('b1 i1 i2 i4 i8 u1 u2 u4 u8 f2 f4 f8 c8 c16'.split())
_RENAMED_MODULES = {'__builtin__': 'builtins', 'copy_reg': 'copyreg'}


def _numpy_dtype(name: str) -> np.dtype:
  if name == 'bfloat16' or name.startswith('float8'):
    try:
      import ml_dtypes
    except ImportError:
      raise TorchFileError(f'dtype {name} needs the ml_dtypes package') from None
    return np.dtype(getattr(ml_dtypes, name))
  return np.dtype(name)


class _StorageType(NamedTuple):
  dtype: str


class _DType(NamedTuple):
  name: str


class _Storage(NamedTuple):
  dtype: np.dtype
  data: bytes
  swap: bool  # saved in the other byte order than the host's


class _Call:
  """One allowed function, wrapped so ``BUILD`` cannot alter it."""

  __slots__ = ('fn', 'name')

  def __init__(self, name: str, fn: Callable[..., Any]) -> None:
    self.name, self.fn = name, fn

  def __call__(self, *args: Any) -> Any:
    return self.fn(*args)

  def __setstate__(self, state: Any) -> None:
    raise pickle.UnpicklingError(f'BUILD applied to {self.name}')


def _ints(value: Any, what: str) -> tuple[int, ...]:
  if not isinstance(value, tuple | list) or not all(
    isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
  ):
    raise pickle.UnpicklingError(f'tensor {what} {value!r} is not a tuple of non-negative ints')
  return tuple(value)


def _tensor(storage: Any, offset: Any, size: Any, stride: Any, dtype: np.dtype) -> np.ndarray:
  """The ``[*size]`` array a tensor views in ``storage``, copied to native byte order."""
  if not isinstance(storage, _Storage):
    raise pickle.UnpicklingError(f'tensor storage is {type(storage).__name__}, not a storage')
  (offset,) = _ints((offset,), 'offset')
  shape, strides = _ints(size, 'size'), _ints(stride, 'stride')
  if len(shape) != len(strides):
    raise pickle.UnpicklingError(f'tensor size {shape} and stride {strides} differ in length')
  if 0 in shape:
    return np.zeros(shape, dtype)
  count = len(storage.data) // dtype.itemsize
  last = offset + sum((n - 1) * s for n, s in zip(shape, strides, strict=True))
  if last >= count:
    raise pickle.UnpicklingError(f'tensor reaches element {last} of a {count}-element storage')
  flat = np.frombuffer(storage.data, dtype, count)
  if storage.swap and dtype.itemsize > 1:
    flat = flat.byteswap()
  view = np.lib.stride_tricks.as_strided(
    flat[offset:], shape, [s * dtype.itemsize for s in strides], writeable=False
  )
  return np.array(view)


def _metadata(array: np.ndarray, metadata: Any) -> np.ndarray:
  """Applies the negation and conjugation bits (storages hold the values without them)."""
  metadata = metadata if isinstance(metadata, Mapping) else {}
  array = -array if metadata.get('neg') else array
  return np.conj(array) if metadata.get('conj') else array


def _rebuild_tensor(storage, offset, size, stride, *_):
  return _tensor(storage, offset, size, stride, getattr(storage, 'dtype', None))


def _rebuild_tensor_v2(storage, offset, size, stride, grad, hooks, metadata=None):
  return _metadata(_rebuild_tensor(storage, offset, size, stride), metadata)


def _rebuild_tensor_v3(storage, offset, size, stride, grad, hooks, dtype, metadata=None):
  if not isinstance(dtype, _DType):
    raise pickle.UnpicklingError(f'tensor dtype {dtype!r} is not a torch dtype')
  return _metadata(_tensor(storage, offset, size, stride, _numpy_dtype(dtype.name)), metadata)


def _latin1(text: Any, encoding: Any = 'utf-8') -> bytes:
  if not isinstance(text, str) or encoding not in ('latin1', 'latin-1'):
    raise pickle.UnpicklingError(f'_codecs.encode({type(text).__name__}, {encoding!r})')
  return text.encode('latin1')


_FUNCTIONS: dict[str, Callable[..., Any]] = {
  'torch._utils._rebuild_tensor': _rebuild_tensor,
  'torch._utils._rebuild_tensor_v2': _rebuild_tensor_v2,
  'torch._utils._rebuild_tensor_v3': _rebuild_tensor_v3,
  'torch._utils._rebuild_parameter': lambda data, *_: data,
  'torch._utils._rebuild_parameter_with_state': lambda data, *_: data,
  'torch._tensor._rebuild_from_type_v2': lambda func, new_type, args, state: func(*args),
  'collections.OrderedDict': OrderedDict,
  'torch.Size': tuple,
  'torch.device': lambda *parts: ':'.join(str(p) for p in parts),
  '_codecs.encode': _latin1,
  'builtins.set': set,
  'builtins.frozenset': frozenset,
  'builtins.bytearray': bytearray,
  'builtins.bytes': bytes,
  'builtins.complex': complex,
  'builtins.slice': slice,
}


class _Unpickler(pickle.Unpickler):
  def __init__(self, archive: zipfile.ZipFile, prefix: str, path: str) -> None:
    super().__init__(io.BytesIO(archive.read(f'{prefix}/data.pkl')))
    self.archive, self.prefix, self.path = archive, prefix, path
    self.records, order = set(archive.namelist()), f'{prefix}/byteorder'
    saved = archive.read(order).strip().decode() if order in self.records else 'little'
    self.swap = saved != sys.byteorder
    self.storages: dict[str, _Storage] = {}
    self.stand_ins: dict[str, type[StandIn]] = {}

  def find_class(self, module: str, name: str) -> Any:
    qualname = f'{_RENAMED_MODULES.get(module, module)}.{name}'
    if qualname in _FUNCTIONS:
      return _Call(qualname, _FUNCTIONS[qualname])
    if module in ('torch', 'torch.cuda') and name in _STORAGES:
      return _StorageType(_STORAGES[name])
    if qualname == 'torch.storage.UntypedStorage':
      return _StorageType('uint8')
    if module == 'torch' and name in _DTYPES:
      return _DType(name)
    if qualname in _STANDIN_NAMES or qualname.startswith(_STANDIN_PREFIXES):
      if qualname not in self.stand_ins:
        self.stand_ins[qualname] = type(name, (StandIn,), {'__slots__': (), 'qualname': qualname})
      return self.stand_ins[qualname]
    shown = qualname if qualname.isprintable() else repr(qualname)
    raise TorchFileError(f'{self.path}: refusing to load {shown} named in its pickle')

  def persistent_load(self, pid: Any) -> _Storage:
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == 'storage'):
      raise pickle.UnpicklingError(f'unknown persistent id {pid!r:.80}')
    _, kind, key, _, numel = pid
    if not isinstance(kind, _StorageType) or not isinstance(key, str) or not isinstance(numel, int):
      raise pickle.UnpicklingError(f'malformed storage id {pid!r:.80}')
    if key not in self.storages:
      record = f'{self.prefix}/data/{key}'
      if record not in self.records:
        raise pickle.UnpicklingError(f'storage record {record} is missing')
      data = self.archive.read(record)
      dtype = _numpy_dtype(kind.dtype)
      if len(data) < numel * dtype.itemsize:
        raise pickle.UnpicklingError(f'storage record {record} is shorter than {numel} elements')
      self.storages[key] = _Storage(dtype, data, self.swap)
    return self.storages[key]


def _numpy_dtype_of(d: Any) -> np.dtype | None:
  if not (isinstance(d, StandIn) and d.qualname == 'numpy.dtype' and d.args):
    return None
  code, order = d.args[0], d.state[1] if isinstance(d.state, tuple) and len(d.state) > 1 else '|'
  ok = isinstance(code, str) and code in _NUMPY_CODES and order in ('<', '>', '|', '=')
  return np.dtype(order + code) if ok else None


def _numpy_value(obj: StandIn) -> Any:
  """A real NumPy array or scalar for a recorded one of a plain dtype, else ``obj``."""
  scalar = obj.qualname.endswith('multiarray.scalar')
  if scalar and len(obj.args) == 2:
    dtype, raw, shape, fortran = _numpy_dtype_of(obj.args[0]), obj.args[1], (), False
  elif (
    obj.qualname.endswith('._reconstruct') and isinstance(obj.state, tuple) and len(obj.state) == 5
  ):
    _, shape, dtype, fortran, raw = obj.state
    dtype = _numpy_dtype_of(dtype)
  else:
    return obj
  if dtype is None or not isinstance(raw, bytes) or not isinstance(shape, tuple):
    return obj
  if not all(isinstance(n, int) and n >= 0 for n in shape):
    return obj
  if len(raw) != math.prod(shape) * dtype.itemsize:
    return obj
  array = np.frombuffer(raw, dtype).reshape(shape, order='F' if fortran else 'C')
  array = array.astype(dtype.newbyteorder('='), order='K')
  return array[()] if scalar else array


def _resolve(obj: Any, memo: dict[int, Any]) -> Any:
  """Replaces recorded NumPy arrays and scalars by real ones, in place where mutable."""
  if id(obj) in memo:
    return memo[id(obj)]
  if isinstance(obj, StandIn) and obj.qualname.startswith('numpy.'):
    memo[id(obj)] = _numpy_value(obj)
  elif isinstance(obj, _DType):
    memo[id(obj)] = f'torch.{obj.name}'
  elif isinstance(obj, dict):
    memo[id(obj)] = obj
    for key, value in obj.items():
      obj[key] = _resolve(value, memo)
  elif isinstance(obj, list):
    memo[id(obj)] = obj
    obj[:] = [_resolve(value, memo) for value in obj]
  elif isinstance(obj, tuple) and not hasattr(obj, '_fields'):
    memo[id(obj)] = tuple(_resolve(value, memo) for value in obj)
  elif isinstance(obj, StandIn):
    memo[id(obj)] = obj
    obj.args, obj.state = _resolve(obj.args, memo), _resolve(obj.state, memo)
  else:
    memo[id(obj)] = obj
  return memo[id(obj)]


def _one_line(error: BaseException) -> str:
  return ' '.join(f'{type(error).__name__}: {error}'.split())


def describe(obj: Any) -> str:
  return obj.qualname if isinstance(obj, StandIn) else f'a {type(obj).__name__}'


def read_pt(path: str | os.PathLike) -> Any:
  """The content of a ``torch.save`` zip file, with tensors as NumPy arrays.

  Tensors (and parameters) become arrays of their saved dtype, NumPy arrays of
  plain dtypes stay arrays, and objects of allowed classes become
  :class:`StandIn` records. See the module docstring for what is allowed.

  Raises:
    TorchFileError: one line naming the file, when it is missing or unreadable,
      not a zip archive (a legacy pre-1.6 file or anything else), malformed, or
      when its pickle names a class outside the allowed set.
  """
  try:
    with open(path, 'rb') as file:
      head = file.read(512)
  except OSError as error:
    raise TorchFileError(f'{path}: cannot read it ({_one_line(error)})') from None
  if not zipfile.is_zipfile(path):
    if head[:1] == b'\x80' or head[257:262] == b'ustar':
      raise TorchFileError(f'{path}: legacy torch.save format (PyTorch < 1.6), not supported')
    raise TorchFileError(f'{path}: not a zip archive (truncated, or not a torch.save file)')
  try:
    with zipfile.ZipFile(path) as archive:
      pickles = [n for n in archive.namelist() if n.count('/') == 1 and n.endswith('/data.pkl')]
      if not pickles:
        raise TorchFileError(f'{path}: zip archive without a <archive>/data.pkl record')
      content = _Unpickler(archive, pickles[0][: -len('/data.pkl')], str(path)).load()
    return _resolve(content, {})
  except TorchFileError:
    raise
  except Exception as error:
    raise TorchFileError(f'{path}: malformed checkpoint ({_one_line(error)})') from None
