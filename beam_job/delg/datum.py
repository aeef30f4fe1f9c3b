"""Read and write the official DELF/DELG `DatumProto` tensor files (PCA parameters, .delg_global) and .npy.

The official code stores PCA means, projection matrices and variances (and `.delg_global` descriptors)
as one serialized `delf.protos.DatumProto`:

    DatumShape  { repeated int64  dim   = 1 [packed]; }
    FloatList   { repeated float  value = 1 [packed]; }
    Uint32List  { repeated uint32 value = 1 [packed]; }
    DatumProto  { DatumShape shape = 1; oneof { FloatList float_list = 2; Uint32List uint32_list = 3; } }

This module encodes and decodes that wire format by hand (no compiled protos, no protobuf runtime), so
it is pure numpy. Values are row-major. Floating inputs are stored as float32 and unsigned integers as
uint32, as the official writer does; the reader also accepts unpacked repeated fields.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Tuple

import numpy as np

# Field numbers of delf.protos.DatumProto and its children.
_SHAPE, _FLOAT_LIST, _UINT32_LIST = 1, 2, 3
_WT_VARINT, _WT_I64, _WT_LEN, _WT_I32 = 0, 1, 2, 5


class DatumError(ValueError):
    """A file is not a valid DatumProto (or a PCA file does not fit its configuration)."""


# --------------------------------------------------------------------------------------------------
# Wire-format primitives
# --------------------------------------------------------------------------------------------------


def _encode_varint(value: int) -> bytes:
    if value < 0:  # int64 negative numbers are 10-byte two's complement varints
        value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _decode_varint(data: bytes, pos: int) -> Tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= len(data):
            raise DatumError("truncated varint in DatumProto")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise DatumError("varint too long in DatumProto")


def _key(field: int, wire_type: int) -> bytes:
    return _encode_varint((field << 3) | wire_type)


def _len_field(field: int, payload: bytes) -> bytes:
    return _key(field, _WT_LEN) + _encode_varint(len(payload)) + payload


def _iter_fields(data: bytes):
    """Yield (field_number, wire_type, value) where value is an int (varint/fixed) or bytes (LEN)."""
    pos = 0
    n = len(data)
    while pos < n:
        key, pos = _decode_varint(data, pos)
        field, wire_type = key >> 3, key & 7
        if field == 0:
            raise DatumError("invalid field number 0 in DatumProto")
        if wire_type == _WT_VARINT:
            value, pos = _decode_varint(data, pos)
        elif wire_type == _WT_I64:
            if pos + 8 > n:
                raise DatumError("truncated fixed64 in DatumProto")
            value = data[pos : pos + 8]
            pos += 8
        elif wire_type == _WT_LEN:
            length, pos = _decode_varint(data, pos)
            if pos + length > n:
                raise DatumError("truncated length-delimited field in DatumProto")
            value = data[pos : pos + length]
            pos += length
        elif wire_type == _WT_I32:
            if pos + 4 > n:
                raise DatumError("truncated fixed32 in DatumProto")
            value = data[pos : pos + 4]
            pos += 4
        else:
            raise DatumError(f"unsupported wire type {wire_type} in DatumProto")
        yield field, wire_type, value


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


# --------------------------------------------------------------------------------------------------
# DatumProto encode / decode
# --------------------------------------------------------------------------------------------------


def array_to_datum_bytes(array: np.ndarray) -> bytes:
    """Serialize an array as a DatumProto: float16/32/64 -> float_list (float32), uint8..64 -> uint32_list.

    Raises DatumError for other dtypes (signed integers, bool, ...), as the official writer does.
    """
    array = np.asarray(array)
    if array.dtype.kind == "f":
        values = np.ascontiguousarray(array, dtype="<f4").ravel()
        list_field = _FLOAT_LIST
        payload = values.tobytes()
    elif array.dtype.kind == "u":
        if array.size and int(array.max()) > 0xFFFFFFFF:
            raise DatumError("uint64 values above 2**32-1 cannot be stored in a DatumProto uint32_list")
        values = array.astype(np.uint64).ravel()
        list_field = _UINT32_LIST
        payload = b"".join(_encode_varint(int(v)) for v in values)
    else:
        raise DatumError(f"DatumProto stores float or unsigned integer arrays, got dtype {array.dtype}")
    dims = b"".join(_encode_varint(int(d)) for d in array.shape)
    shape_msg = _len_field(1, dims) if dims else b""
    out = _len_field(_SHAPE, shape_msg)
    list_msg = _len_field(1, payload) if payload else b""
    out += _len_field(list_field, list_msg)
    return out


def _parse_shape(msg: bytes) -> list:
    dims = []
    for field, wire_type, value in _iter_fields(msg):
        if field != 1:
            continue
        if wire_type == _WT_LEN:  # packed
            pos = 0
            while pos < len(value):
                dim, pos = _decode_varint(value, pos)
                dims.append(_signed64(dim))
        elif wire_type == _WT_VARINT:
            dims.append(_signed64(value))
        else:
            raise DatumError("DatumShape.dim has an unexpected wire type")
    return dims


def _parse_float_list(msg: bytes) -> np.ndarray:
    chunks = []
    for field, wire_type, value in _iter_fields(msg):
        if field != 1:
            continue
        if wire_type == _WT_LEN:
            if len(value) % 4:
                raise DatumError("FloatList packed payload is not a multiple of 4 bytes")
            chunks.append(np.frombuffer(value, dtype="<f4"))
        elif wire_type == _WT_I32:
            chunks.append(np.frombuffer(value, dtype="<f4"))
        else:
            raise DatumError("FloatList.value has an unexpected wire type")
    if not chunks:
        return np.zeros((0,), np.float32)
    return np.concatenate(chunks).astype(np.float32)


def _parse_uint32_list(msg: bytes) -> np.ndarray:
    values = []
    for field, wire_type, value in _iter_fields(msg):
        if field != 1:
            continue
        if wire_type == _WT_LEN:
            pos = 0
            while pos < len(value):
                item, pos = _decode_varint(value, pos)
                values.append(item & 0xFFFFFFFF)
        elif wire_type == _WT_VARINT:
            values.append(value & 0xFFFFFFFF)
        else:
            raise DatumError("Uint32List.value has an unexpected wire type")
    return np.asarray(values, dtype=np.uint32)


def datum_bytes_to_array(data: bytes) -> np.ndarray:
    """Parse a serialized DatumProto into a float32 or uint32 array of its recorded shape."""
    shape = None
    values = None
    for field, wire_type, value in _iter_fields(bytes(data)):
        if wire_type != _WT_LEN:
            continue  # unknown scalar fields are skipped, as protobuf parsers do
        if field == _SHAPE:
            shape = _parse_shape(value)
        elif field == _FLOAT_LIST:
            values = _parse_float_list(value)
        elif field == _UINT32_LIST:
            values = _parse_uint32_list(value)
    if shape is None:
        raise DatumError("not a DatumProto: no shape field")
    if any(d < 0 for d in shape):
        raise DatumError(f"DatumProto has a negative dimension: {shape}")
    if values is None:
        values = np.zeros((0,), np.float32)
    expected = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if values.size != expected:
        raise DatumError(f"DatumProto shape {shape} needs {expected} values, file holds {values.size}")
    return values.reshape(shape)


# --------------------------------------------------------------------------------------------------
# Files (local paths or gs:// URIs)
# --------------------------------------------------------------------------------------------------


def _read_bytes(path: str) -> bytes:
    if path.startswith("gs://"):
        from beam_job.delg.loader import read_gcs_bytes  # google-cloud-storage; no TensorFlow needed

        return read_gcs_bytes(path)
    with open(os.path.expanduser(path), "rb") as handle:
        return handle.read()


def read_datum(path: str) -> np.ndarray:
    """Read a DatumProto file (local path or gs:// URI) into a numpy array."""
    try:
        return datum_bytes_to_array(_read_bytes(path))
    except DatumError as err:
        raise DatumError(f"{path}: {err}") from None


def write_datum(array: np.ndarray, path: str) -> None:
    """Write an array as a DatumProto file (local path), like the official `datum_io.WriteToFile`."""
    with open(os.path.expanduser(path), "wb") as handle:
        handle.write(array_to_datum_bytes(array))


def load_array(path: str) -> np.ndarray:
    """Load a `.npy` array or, for any other name, a DatumProto file (local path or gs:// URI)."""
    if path.lower().endswith(".npy"):
        import io

        return np.load(io.BytesIO(_read_bytes(path)), allow_pickle=False)
    return read_datum(path)


# --------------------------------------------------------------------------------------------------
# PCA parameters
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PcaParameters:
    """PCA / whitening parameters as the official extractor uses them (all float32).

    mean:      (D,) subtracted before projection.
    matrix:    (K, D) projection matrix, one component per row (K >= dim); the first `dim` rows are used.
    dim:       output dimension.
    use_whitening: divide by sqrt(variances[:dim]) after projection.
    variances: (K,) or None.
    """

    mean: np.ndarray
    matrix: np.ndarray
    dim: int
    use_whitening: bool
    variances: Optional[np.ndarray]

    @property
    def input_dim(self) -> int:
        return int(self.mean.shape[0])


def load_pca(config) -> PcaParameters:
    """Load a `beam_job.config.PcaConfig` (DatumProto or .npy files) and check the shapes fit together."""
    mean = np.asarray(load_array(config.mean_path), dtype=np.float32).reshape(-1)
    matrix = np.asarray(load_array(config.projection_matrix_path), dtype=np.float32)
    if matrix.ndim != 2 or matrix.shape[1] != mean.shape[0]:
        raise DatumError(
            f"PCA projection matrix {config.projection_matrix_path} has shape {matrix.shape}; "
            f"expected (K, {mean.shape[0]}) to match the mean in {config.mean_path}"
        )
    if config.pca_dim > matrix.shape[0]:
        raise DatumError(
            f"pca_dim={config.pca_dim} exceeds the {matrix.shape[0]} components in {config.projection_matrix_path}"
        )
    variances = None
    if config.use_whitening:
        # The reference squeezes the variances tensor; accept (K,), (K, 1) or (1, K).
        variances = np.asarray(load_array(config.variances_path), dtype=np.float32).reshape(-1)
        if variances.shape[0] < config.pca_dim:
            raise DatumError(
                f"PCA variances {config.variances_path} hold {variances.shape[0]} values, "
                f"need >= pca_dim={config.pca_dim}"
            )
    return PcaParameters(
        mean=mean, matrix=matrix, dim=int(config.pca_dim), use_whitening=bool(config.use_whitening), variances=variances
    )
