"""Open and validate a GGUF file; expose each tensor's raw bytes zero-copy.

The header is parsed here (:func:`_parse_header`) with every count and length
checked against the bytes actually left in the file, so a corrupted file costs
work and memory bounded by its size and fails with :class:`GGUFError` naming
the file, the tensor and the rule. We do not hand the header to
``gguf.GGUFReader``: it trusts the file (a corrupted count makes it loop over
2**63 items or raise any exception type) and it builds a numpy view per array
item, which takes ~10 s on a 262k-token vocabulary. ``gguf`` stays the source of
the format constants and, in the tests, the independent oracle our parse is
compared with. Tensor bytes are a view of one ``np.memmap`` of the file.

Shapes are in torch order: a 2-D weight is ``(N rows, K row length)``; GGUF
stores ``ne`` innermost first, so its dims are reversed here.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

if TYPE_CHECKING:
    from teacher.config import ModelConfig

__all__ = [
    "SUPPORTED_TYPES",
    "GGUFError",
    "GGUFModel",
    "TensorRecord",
    "open_gguf",
]

Q = GGMLQuantizationType

#: Quant types present in real Q2_K .. Q6_K / Q8_0 files; everything else (the IQ
#: family, ternary and MXFP4 types) is refused, naming the tensor and its type.
SUPPORTED_TYPES: frozenset[GGMLQuantizationType] = frozenset(
    {Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q8_0, Q.Q5_0, Q.Q4_0, Q.Q4_1, Q.F16, Q.BF16,
     Q.F32}
)  # fmt: skip

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_DIM = 1 << 32  # no real tensor dimension comes near this; larger is corruption
INT64_MAX = (1 << 63) - 1
MAX_NAME_LEN = 1 << 16
MAX_NESTING = 4  # arrays of arrays: we recurse, so keep Python's stack safe
DEFAULT_ALIGNMENT = 32

# struct format of each scalar GGUF value type (little-endian)
_SCALAR_FMT: dict[int, str] = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}


class GGUFError(ValueError):
    """A malformed or unsupported GGUF file. The message names file, tensor and rule."""


def _err(path: Path, rule: str, detail: str, tensor: str | None = None) -> GGUFError:
    where = f"{path}" + (f": tensor '{tensor}'" if tensor is not None else "")
    return GGUFError(f"{where}: {detail} (rule: {rule})")


@dataclass(frozen=True)
class TensorRecord:
    """One tensor: its type, its torch-order shape and its raw bytes (a memmap view)."""

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]
    data: np.ndarray = field(repr=False)

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclass(frozen=True)
class _TensorInfo:
    name: str
    raw_type: int
    ne: tuple[int, ...]  # GGUF order: ne[0] is the row length
    offset: int  # relative to the data section


class _Scanner:
    """Bounded little-endian reader over the file bytes; every read checks the size."""

    def __init__(self, buf: mmap.mmap | bytes, size: int, path: Path) -> None:
        self.buf = buf
        self.size = size
        self.path = path
        self.offs = 0

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.offs + n > self.size:
            raise _err(
                self.path,
                "header fits in the file",
                f"truncated header: {what} needs {n} bytes at offset {self.offs}, "
                f"file has {self.size}",
            )

    def unpack(self, fmt: str, what: str) -> tuple[Any, ...]:
        n = struct.calcsize(fmt)
        self.need(n, what)
        vals = struct.unpack_from(fmt, self.buf, self.offs)
        self.offs += n
        return vals

    def u32(self, what: str) -> int:
        return int(self.unpack("<I", what)[0])

    def u64(self, what: str) -> int:
        return int(self.unpack("<Q", what)[0])

    def string(self, what: str, max_len: int | None = None) -> bytes:
        n = self.u64(f"{what} length")
        if max_len is not None and n > max_len:
            raise _err(self.path, "string length sane", f"{what} length {n} > {max_len}")
        self.need(n, what)
        s = bytes(self.buf[self.offs : self.offs + n])
        self.offs += n
        return s

    def text(self, what: str, rule: str, max_len: int | None = None) -> str:
        """A string that must be UTF-8 (metadata keys, tensor names)."""
        raw = self.string(what, max_len)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _err(self.path, rule, f"{what} is not valid UTF-8: {raw[:40]!r}") from None

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        """Read one metadata value of GGUF type ``vtype``; all lengths bounded by the file."""
        if vtype in _SCALAR_FMT:
            return self.unpack(_SCALAR_FMT[vtype], what)[0]
        if vtype == GGUFValueType.STRING:
            # values are data, not structure: decode leniently
            return self.string(what).decode("utf-8", errors="replace")
        if vtype == GGUFValueType.ARRAY:
            if depth >= MAX_NESTING:
                raise _err(
                    self.path,
                    "array nesting sane",
                    f"{what}: arrays nested deeper than {MAX_NESTING}",
                )
            itype = self.u32(f"{what} array item type")
            alen = self.u64(f"{what} array length")
            if itype in _SCALAR_FMT:
                dt = np.dtype(_SCALAR_FMT[itype])
                self.need(alen * dt.itemsize, f"{what} array of {alen} items")
                arr = np.frombuffer(self.buf, dtype=dt, count=alen, offset=self.offs)
                self.offs += alen * dt.itemsize
                return arr.tolist()
            if itype not in (GGUFValueType.STRING, GGUFValueType.ARRAY):
                raise _err(
                    self.path, "known value type", f"{what}: unknown array item type {itype}"
                )
            # each string item takes >= 8 bytes, each array item >= 12: bound the loop first
            self.need(
                alen * (8 if itype == GGUFValueType.STRING else 12), f"{what} array of {alen} items"
            )
            return [self.value(itype, f"{what}[{i}]", depth + 1) for i in range(alen)]
        raise _err(self.path, "known value type", f"{what}: unknown value type {vtype}")


def _parse_header(
    buf: mmap.mmap | bytes, size: int, path: Path, strict: bool = True
) -> tuple[int, dict[str, Any], list[_TensorInfo], int]:
    """Parse and check the header; return (version, metadata, tensor infos, data start)."""
    sc = _Scanner(buf, size, path)
    sc.need(4, "magic")
    magic = bytes(buf[0:4])
    if magic != GGUF_MAGIC:
        raise _err(path, "magic is 'GGUF'", f"bad magic {magic!r}")
    sc.offs = 4
    version = sc.u32("version")
    if version not in SUPPORTED_VERSIONS:
        raise _err(
            path,
            "version supported",
            f"GGUF version {version} (supported: {', '.join(map(str, SUPPORTED_VERSIONS))};"
            " big-endian files are not supported)",
        )
    n_tensors = sc.u64("tensor count")
    n_kv = sc.u64("kv count")
    rest = size - sc.offs
    # a tensor info is >= 24 bytes (name len, n_dims, type, offset), a kv >= 13
    if n_tensors * 24 > rest:
        raise _err(
            path,
            "tensor count fits in the file",
            f"tensor count {n_tensors} cannot fit in {size} bytes",
        )
    if n_kv * 13 > rest:
        raise _err(path, "kv count fits in the file", f"kv count {n_kv} cannot fit in {size} bytes")

    alignment = DEFAULT_ALIGNMENT
    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = sc.text(f"key #{i}", "keys are UTF-8", MAX_NAME_LEN)
        if key in metadata:
            raise _err(path, "keys unique", f"duplicate metadata key '{key}'")
        vtype = sc.u32(f"type of '{key}'")
        if key == "general.alignment":
            if vtype != GGUFValueType.UINT32:
                raise _err(path, "alignment is uint32", f"general.alignment has value type {vtype}")
            alignment = sc.u32("general.alignment")
            if alignment == 0 or alignment & (alignment - 1):
                raise _err(path, "alignment is a power of two", f"general.alignment = {alignment}")
            metadata[key] = alignment
            continue
        metadata[key] = sc.value(vtype, f"'{key}'")

    infos: list[_TensorInfo] = []
    names: set[str] = set()
    for i in range(n_tensors):
        name = sc.text(f"tensor #{i} name", "tensor names are UTF-8", MAX_NAME_LEN)
        if name in names:
            raise _err(path, "tensor names unique", "duplicate tensor name", name)
        names.add(name)
        n_dims = sc.u32(f"tensor '{name}' n_dims")
        if not 1 <= n_dims <= MAX_DIMS:
            raise _err(path, "dims sane", f"n_dims = {n_dims} (must be 1..{MAX_DIMS})", name)
        ne = tuple(int(d) for d in sc.unpack(f"<{n_dims}Q", f"tensor '{name}' dims"))
        raw_type = sc.u32(f"tensor '{name}' type")
        offset = sc.u64(f"tensor '{name}' offset")
        infos.append(_TensorInfo(name, raw_type, ne, offset))
    data_start = -(-sc.offs // alignment) * alignment
    for info in infos:
        _check_tensor(path, info, alignment, data_start, size, strict)
    return version, metadata, infos, data_start


def _check_tensor(
    path: Path, info: _TensorInfo, alignment: int, data_start: int, size: int, strict: bool = True
) -> None:
    name = info.name
    for d in info.ne:
        if not 1 <= d < MAX_DIM:
            raise _err(
                path,
                "dims sane",
                f"dimension {d} in ne={list(info.ne)} (each must be 1..2^32-1)",
                name,
            )
    n = 1
    for d in info.ne:
        n *= d
    if n > INT64_MAX:
        raise _err(path, "element count fits int64", f"ne={list(info.ne)} has {n} elements", name)
    try:
        qtype = Q(info.raw_type)
    except ValueError:
        raise _err(
            path, "quant type supported", f"unknown ggml type {info.raw_type}", name
        ) from None
    if strict and qtype not in SUPPORTED_TYPES:
        supported = ", ".join(sorted(t.name for t in SUPPORTED_TYPES))
        raise _err(
            path, "quant type supported", f"type {qtype.name} (supported: {supported})", name
        )
    block, type_size = GGML_QUANT_SIZES[qtype]
    if info.ne[0] % block:
        raise _err(
            path,
            "row length is a multiple of the block",
            f"row length {info.ne[0]} is not a multiple of {qtype.name}'s block of {block}",
            name,
        )
    nbytes = n // block * type_size
    if info.offset % alignment:
        raise _err(
            path,
            "tensor offset aligned",
            f"offset {info.offset} not a multiple of {alignment}",
            name,
        )
    end = data_start + info.offset + nbytes
    if end > size:
        raise _err(
            path,
            "tensor data inside the file",
            f"data [{data_start + info.offset}, {end}) runs past the end of the file ({size} bytes)",
            name,
        )


class GGUFModel:
    """A validated GGUF file: metadata, tensors (raw bytes mapped, not read) and the config."""

    def __init__(
        self,
        path: Path,
        version: int,
        metadata: dict[str, Any],
        tensors: dict[str, TensorRecord],
        mapped: np.memmap,
    ) -> None:
        self.path = path
        self.version = version
        self.metadata = metadata
        self.tensors = tensors
        self.mapped = mapped  # the np.memmap every TensorRecord.data views
        self._config: ModelConfig | None = None

    @property
    def config(self) -> ModelConfig:
        if self._config is None:
            from teacher.config import config_from_metadata  # lazy: written by a colleague

            self._config = config_from_metadata(self.metadata, self.path)
        return self._config

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def tensor(self, name: str) -> TensorRecord:
        try:
            return self.tensors[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor '{name}' in the file") from None

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def __repr__(self) -> str:
        return f"GGUFModel({str(self.path)!r}, arch={self.architecture!r}, tensors={len(self.tensors)})"


def open_gguf(path: str | os.PathLike[str], *, strict: bool = True) -> GGUFModel:
    """Validate ``path`` and map it. Raises :class:`GGUFError` for anything malformed.

    ``strict=False`` (``q4k inspect``) also maps tensors of ggml types the teacher
    does not serve, so a report can list every one of them; the file must still
    be well formed."""
    p = Path(path)
    try:
        size = p.stat().st_size
    except OSError as exc:
        raise _err(p, "file readable", f"cannot stat: {exc}") from None
    if size == 0:
        raise _err(p, "header fits in the file", "empty file")
    try:
        with open(p, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            version, metadata, infos, data_start = _parse_header(mm, size, p, strict)
        mapped = np.memmap(p, dtype=np.uint8, mode="r")
    except GGUFError:
        raise
    except (OSError, ValueError, OverflowError, struct.error, MemoryError) as exc:
        raise _err(p, "header parses", f"{type(exc).__name__}: {exc}") from None
    if mapped.size != size:
        raise _err(p, "file unchanged while opening", f"size changed from {size} to {mapped.size}")

    tensors: dict[str, TensorRecord] = {}
    for info in infos:
        qtype = Q(info.raw_type)
        block, type_size = GGML_QUANT_SIZES[qtype]
        n = int(np.prod(info.ne, dtype=np.int64))
        start = data_start + info.offset
        data = mapped[start : start + n // block * type_size].view(np.ndarray)
        tensors[info.name] = TensorRecord(info.name, qtype, tuple(reversed(info.ne)), data)
    return GGUFModel(p, version, metadata, tensors, mapped)
