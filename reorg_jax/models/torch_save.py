"""Writing a PyTorch ``state_dict`` file without PyTorch: what ``torch.save(state_dict)`` writes.

Glossary: *record*, a member of the zip archive; *storage*, the raw bytes of one
tensor; a *state dict* maps PyTorch keys (``model.3.bn.weight``) to arrays.

:func:`save_state_dict` writes the ``torch.save`` zip format (the one
:mod:`reorg_jax.models.torch_file` reads; see its docstring): records under
one folder ``archive/``, ``data.pkl`` an ``OrderedDict`` of tensors pickled
with protocol 2, each tensor ``torch._utils._rebuild_tensor_v2(storage, 0,
size, stride, False, OrderedDict())`` over its own storage ``data/<i>``
(little-endian, each record's data 64-byte aligned as PyTorch aligns them),
``byteorder`` and ``version``. ``torch.load`` reads it with its default
``weights_only=True``: the pickle names only ``collections.OrderedDict``,
``torch._utils._rebuild_tensor_v2`` and the storage classes.

The pickle is written opcode by opcode, so nothing of PyTorch is imported.
"""

from __future__ import annotations

import io
import os
import struct
import zipfile
from collections.abc import Mapping

import numpy as np

__all__ = ['STORAGES', 'save_state_dict']

# NumPy dtype -> the legacy storage class PyTorch pickles for it
STORAGES = {
  np.dtype(np.float32): 'FloatStorage',
  np.dtype(np.float64): 'DoubleStorage',
  np.dtype(np.float16): 'HalfStorage',
  np.dtype(np.int64): 'LongStorage',
  np.dtype(np.int32): 'IntStorage',
  np.dtype(np.int16): 'ShortStorage',
  np.dtype(np.int8): 'CharStorage',
  np.dtype(np.uint8): 'ByteStorage',
  np.dtype(np.bool_): 'BoolStorage',
}

_ARCHIVE = 'archive'
_ALIGNMENT = 64
_PADDING_FIELD = 0x4246  # the extra-field id PyTorch pads records with


def _text(value: str) -> bytes:
  data = value.encode('utf-8')
  return b'X' + struct.pack('<I', len(data)) + data  # BINUNICODE


def _integer(value: int) -> bytes:
  if 0 <= value < 256:
    return b'K' + bytes([value])  # BININT1
  if -(2**31) <= value < 2**31:
    return b'J' + struct.pack('<i', value)  # BININT
  data = value.to_bytes((value.bit_length() + 8) // 8, 'little', signed=True)
  return b'\x8a' + bytes([len(data)]) + data  # LONG1


def _tuple(values: tuple[int, ...]) -> bytes:
  return b'(' + b''.join(_integer(v) for v in values) + b't'  # MARK ... TUPLE


def _global(module: str, name: str) -> bytes:
  return b'c' + module.encode() + b'\n' + name.encode() + b'\n'  # GLOBAL


_EMPTY_ORDERED_DICT = _global('collections', 'OrderedDict') + b')R'  # OrderedDict()


def _pickle(arrays: list[tuple[str, np.ndarray]]) -> bytes:
  out = [b'\x80\x02', _EMPTY_ORDERED_DICT, b'(']  # PROTO 2, the dict, MARK
  for index, (key, array) in enumerate(arrays):
    storage = (
      b'('
      + _text('storage')
      + _global('torch', STORAGES[array.dtype])
      + _text(str(index))
      + _text('cpu')
      + _integer(array.size)
      + b'tQ'  # TUPLE, BINPERSID
    )
    strides = tuple(s // array.itemsize for s in array.strides)
    out += [
      _text(key),
      _global('torch._utils', '_rebuild_tensor_v2'),
      b'(',
      storage,
      _integer(0),
      _tuple(array.shape),
      _tuple(strides),
      b'\x89',  # NEWFALSE: requires_grad
      _EMPTY_ORDERED_DICT,  # backward hooks
      b'tR',  # TUPLE, REDUCE
    ]
  out.append(b'u.')  # SETITEMS, STOP
  return b''.join(out)


def _write_record(archive: zipfile.ZipFile, name: str, data: bytes) -> None:
  """Writes ``data`` stored uncompressed, its first byte at a multiple of 64 in the file."""
  info = zipfile.ZipInfo(f'{_ARCHIVE}/{name}', date_time=(1980, 1, 1, 0, 0, 0))
  info.compress_type = zipfile.ZIP_STORED
  start = archive.fp.tell() + 30 + len(info.filename.encode())  # after the local header
  pad = -(start + 4) % _ALIGNMENT
  info.extra = struct.pack('<HH', _PADDING_FIELD, pad) + b'Z' * pad
  archive.writestr(info, data)


def save_state_dict(state_dict: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
  """Writes ``state_dict`` as ``torch.save`` would, without PyTorch.

  Args:
    state_dict: PyTorch key -> array (any shape, including 0-d; dtypes of
      :data:`STORAGES`), in the order to write.
    path: the file (replaced if it exists).

  Raises:
    ValueError: an array of a dtype PyTorch has no storage for here.
    OSError: the file cannot be written.
  """
  arrays = []
  for key, value in state_dict.items():
    array = np.array(value, order='C', copy=None)  # (ascontiguousarray makes 0-d arrays 1-d)
    if array.dtype not in STORAGES:
      raise ValueError(f'{key}: no PyTorch storage for dtype {array.dtype}')
    arrays.append((key, array.astype(array.dtype.newbyteorder('<'), copy=False)))
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, 'w', zipfile.ZIP_STORED) as archive:
    _write_record(archive, 'data.pkl', _pickle(arrays))
    _write_record(archive, 'byteorder', b'little')
    for index, (_, array) in enumerate(arrays):
      _write_record(archive, f'data/{index}', array.tobytes())
    _write_record(archive, 'version', b'3\n')
  with open(path, 'wb') as file:
    file.write(buffer.getvalue())
