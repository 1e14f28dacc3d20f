"""Reading a GGUF file's header (metadata and tensor table) without loading its weights.

The header says how long the file must be, so a truncated file or a missing part of a split file
is found before anything is converted; it works on the first bytes of a stream, so a file split in
parts is read from its first part. The ``gguf`` package's reader needs the whole file (and fails
with unrelated errors on short or weight-less ones), hence this small reader of the format
(https://github.com/ggml-org/ggml/blob/master/docs/gguf.md).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from tunelab.errors import TunelabError

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class GgufFormatError(TunelabError):
    """The bytes are not a complete GGUF header."""


@dataclass
class GgufHeader:
    """What a GGUF header says: metadata (arrays as their length only), tensors and the file size it needs."""

    version: int
    metadata: dict[str, Any]
    array_lengths: dict[str, int]
    tensors: list[tuple[str, tuple[int, ...], int]] = field(default_factory=list)  # name, ggml dims, ggml type
    expected_size: int = 0

    @property
    def architecture(self) -> str:
        """``general.architecture`` (empty when the file does not say)."""
        return str(self.metadata.get("general.architecture", ""))


class _Stream:
    """Reads from a sequence of files as if they were one (the parts of a split GGUF)."""

    def __init__(self, paths: Iterable[Path]) -> None:
        self._paths = list(paths)
        self._index = 0
        self._file: BinaryIO | None = None
        self.position = 0

    def read(self, size: int) -> bytes:
        chunks: list[bytes] = []
        while size > 0:
            if self._file is None:
                if self._index >= len(self._paths):
                    break
                self._file = open(self._paths[self._index], "rb")  # noqa: SIM115 (closed below)
                self._index += 1
            chunk = self._file.read(size)
            if not chunk:
                self._file.close()
                self._file = None
                continue
            chunks.append(chunk)
            size -= len(chunk)
        data = b"".join(chunks)
        self.position += len(data)
        return data

    def exact(self, size: int) -> bytes:
        data = self.read(size)
        if len(data) != size:
            raise GgufFormatError("the header ends early")
        return data

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _unpack(stream: _Stream, fmt: str) -> Any:
    return struct.unpack(fmt, stream.exact(struct.calcsize(fmt)))[0]


def _string(stream: _Stream) -> str:
    length = _unpack(stream, "<Q")
    if length > 1 << 30:
        raise GgufFormatError(f"a string of {length} bytes in the header")
    return stream.exact(length).decode("utf-8", errors="replace")


def _value(stream: _Stream, kind: int) -> Any:
    if kind in _SCALARS:
        return _unpack(stream, _SCALARS[kind])
    if kind == _STRING:
        return _string(stream)
    raise GgufFormatError(f"unknown metadata type {kind}")


def _skip_array(stream: _Stream) -> int:
    kind, count = _unpack(stream, "<I"), _unpack(stream, "<Q")
    if kind == _STRING:
        for _ in range(count):
            stream.exact(_unpack(stream, "<Q"))
    elif kind in _SCALARS:
        stream.exact(struct.calcsize(_SCALARS[kind]) * count)
    elif kind == _ARRAY:
        for _ in range(count):
            _skip_array(stream)
    else:
        raise GgufFormatError(f"unknown array type {kind}")
    return count


def _tensor_bytes(dims: tuple[int, ...], ggml_type: int) -> int:
    try:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    except ImportError:
        raise TunelabError("reading GGUF files needs the gguf package: pip install 'tunelab[export]'") from None

    try:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except ValueError:
        raise GgufFormatError(f"unknown tensor type {ggml_type}") from None
    count = 1
    for dim in dims:
        count *= dim
    return count // block * size


def read_header(paths: Path | list[Path]) -> GgufHeader:
    """Parse the header of a GGUF file (or of its parts in order) and compute the size it needs.

    Raises:
        GgufFormatError: no GGUF magic, an unknown version, or the header ends early.
    """
    stream = _Stream([paths] if isinstance(paths, Path) else paths)
    try:
        if stream.read(4) != MAGIC:
            raise GgufFormatError("not a GGUF file (it does not start with 'GGUF')")
        version = _unpack(stream, "<I")
        if version not in (2, 3):
            raise GgufFormatError(f"GGUF version {version} is not supported (2 or 3)")
        n_tensors, n_kv = _unpack(stream, "<Q"), _unpack(stream, "<Q")
        metadata: dict[str, Any] = {}
        arrays: dict[str, int] = {}
        for _ in range(n_kv):
            key, kind = _string(stream), _unpack(stream, "<I")
            if kind == _ARRAY:
                arrays[key] = _skip_array(stream)
            else:
                metadata[key] = _value(stream, kind)
        header = GgufHeader(version, metadata, arrays)
        data_end = 0
        for _ in range(n_tensors):
            name = _string(stream)
            dims = tuple(_unpack(stream, "<Q") for _ in range(_unpack(stream, "<I")))
            ggml_type, offset = _unpack(stream, "<I"), _unpack(stream, "<Q")
            header.tensors.append((name, dims, ggml_type))
            data_end = max(data_end, offset + _tensor_bytes(dims, ggml_type))
        alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        data_start = -(-stream.position // alignment) * alignment
        header.expected_size = data_start + data_end
        return header
    finally:
        stream.close()
