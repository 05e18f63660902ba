"""A GGUF file's metadata and tensor table, read straight from a memory map.

gguf's own `GGUFReader` makes a numpy view for every part of every metadata value: for a
151k-token vocabulary with 151k merges that is over a million views and ~5 s per open, paid by
every start of the server. This reader walks the same layout with `struct` and decodes each
string once (~0.2 s), and gives tensors as numpy views into the map, shaped as `GGUFReader`
shapes them, so gguf's numpy dequantizers accept them for the rare types kvserve does not
dequantize itself.

Layout (little-endian; versions 2 and 3):

    magic "GGUF", version u32, tensor count u64, metadata count u64
    metadata:  key (u64 length + UTF-8), value type u32, value
    tensors:   name, dimension count u32, dimensions u64 each (fastest first), type u32,
               offset u64 (from the data section)
    data section: at the next multiple of `general.alignment` (default 32)

Every length and count is checked against the bytes left before anything is allocated, so a
damaged or hostile file fails with ValueError instead of a hang or a huge allocation.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import quant_shape_to_byte_shape

_MAGIC = b"GGUF"
_STRING, _ARRAY = 8, 9
# value type → (struct format, size)
_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
            6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
          10: "<u8", 11: "<i8", 12: "<f8"}
# unquantized tensor types → numpy element type (every other type is bytes)
_PLAIN = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
          GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
          GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
          GGMLQuantizationType.I64: np.int64}
_MAX_DIMS = 8


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]         # ggml order: fastest-varying dimension first
    n_elements: int
    n_bytes: int
    data: np.ndarray               # a read-only view into the file, numpy order


class GGUFFile:
    """`fields`: metadata key → python value (str, int, float, bool, or a list of those);
    `tensors`: in file order; `path`: the file."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        with open(self.path, "rb") as handle:
            try:
                self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError as error:              # an empty file cannot be mapped
                raise ValueError(f"not a GGUF file ({error})") from error
        self._buffer = memoryview(self._map)
        self._offset = 0
        self.fields: dict[str, Any] = {}
        self.tensors: list[GGUFTensor] = []
        self._read()

    # -- parsing ---------------------------------------------------------------------------

    def _need(self, count: int, what: str) -> None:
        if count < 0 or self._offset + count > len(self._buffer):
            raise ValueError(f"truncated GGUF file: {what} needs {count} bytes at offset {self._offset}, "
                             f"the file has {len(self._buffer)}")

    def _scalar(self, fmt: str, size: int, what: str):
        self._need(size, what)
        (value,) = struct.unpack_from(fmt, self._buffer, self._offset)
        self._offset += size
        return value

    def _u32(self, what: str) -> int:
        return self._scalar("<I", 4, what)

    def _u64(self, what: str) -> int:
        return self._scalar("<Q", 8, what)

    def _string(self, what: str) -> str:
        length = self._u64(what)
        self._need(length, what)
        start = self._offset
        self._offset += length
        return str(self._buffer[start:self._offset], "utf-8", "replace")

    def _value(self, kind: int, key: str) -> Any:
        if kind in _SCALARS:
            return self._scalar(*_SCALARS[kind], key)
        if kind == _STRING:
            return self._string(key)
        if kind != _ARRAY:
            raise ValueError(f"metadata {key!r} has unknown value type {kind}")
        item = self._u32(key)
        count = self._u64(key)
        if item in _NUMPY:
            size = _SCALARS[item][1]
            self._need(count * size, key)
            values = np.frombuffer(self._buffer, dtype=_NUMPY[item], count=count, offset=self._offset)
            self._offset += count * size
            return values.tolist()
        if item == _STRING:
            self._need(count * 8, key)                    # each string is at least its length
            buffer, unpack, offset, end = self._buffer, struct.unpack_from, self._offset, len(self._buffer)
            strings = []
            for _ in range(count):
                if offset + 8 > end:
                    self._offset = offset
                    self._need(8, key)
                (length,) = unpack("<Q", buffer, offset)
                offset += 8
                if offset + length > end:
                    self._offset = offset
                    self._need(length, key)
                strings.append(str(buffer[offset:offset + length], "utf-8", "replace"))
                offset += length
            self._offset = offset
            return strings
        if item == _ARRAY:
            self._need(count * 12, key)                   # each inner array is at least its header
            return [self._value(_ARRAY, key) for _ in range(count)]
        raise ValueError(f"metadata {key!r} is an array of unknown value type {item}")

    def _read(self) -> None:
        self._need(24, "the header")
        if bytes(self._buffer[:4]) != _MAGIC:
            raise ValueError("not a GGUF file (no GGUF magic number)")
        self._offset = 4
        version = self._u32("the version")
        if version not in (2, 3):
            swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
            if swapped in (2, 3):
                raise ValueError("a big-endian GGUF file; kvserve reads little-endian ones")
            raise ValueError(f"GGUF version {version} is not supported (2 and 3 are)")
        tensor_count = self._u64("the tensor count")
        field_count = self._u64("the metadata count")
        for _ in range(field_count):
            key = self._string("a metadata key")
            if key in self.fields:
                raise ValueError(f"metadata key {key!r} appears twice")
            self.fields[key] = self._value(self._u32(key), key)
        infos = []
        for _ in range(tensor_count):
            name = self._string("a tensor name")
            n_dims = self._u32(name)
            if not 0 < n_dims <= _MAX_DIMS:
                raise ValueError(f"tensor {name!r} has {n_dims} dimensions")
            dims = tuple(self._u64(name) for _ in range(n_dims))
            raw_type = self._u32(name)
            try:
                tensor_type = GGMLQuantizationType(raw_type)
            except ValueError:
                raise ValueError(f"tensor {name!r} has unknown type {raw_type}") from None
            infos.append((name, dims, tensor_type, self._u64(name)))
        alignment = self.fields.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"general.alignment {alignment!r} is not a power of two")
        start = -(-self._offset // alignment) * alignment
        names = set()
        for name, dims, tensor_type, offset in infos:
            if name in names:
                raise ValueError(f"tensor {name!r} appears twice")
            names.add(name)
            self.tensors.append(self._tensor(name, dims, tensor_type, start + offset))

    def _tensor(self, name: str, dims: tuple[int, ...], tensor_type: GGMLQuantizationType,
                offset: int) -> GGUFTensor:
        n_elements = 1
        for d in dims:
            n_elements *= d
        block_size, type_size = GGML_QUANT_SIZES[tensor_type]
        if n_elements % block_size:
            raise ValueError(f"tensor {name!r}: {n_elements} values are not whole {tensor_type.name} blocks")
        n_bytes = n_elements // block_size * type_size
        if offset + n_bytes > len(self._buffer):
            raise ValueError(f"truncated GGUF file: tensor {name!r} needs bytes {offset}..{offset + n_bytes}, "
                             f"the file has {len(self._buffer)}")
        numpy_shape = tuple(reversed(dims))
        if tensor_type in _PLAIN:
            item, count = _PLAIN[tensor_type], n_elements
        else:
            item, count = np.uint8, n_bytes
            numpy_shape = quant_shape_to_byte_shape(numpy_shape, tensor_type)
        data = np.frombuffer(self._buffer, dtype=item, count=count, offset=offset).reshape(numpy_shape)
        return GGUFTensor(name, tensor_type, dims, n_elements, n_bytes, data)
