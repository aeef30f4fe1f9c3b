"""Read and write the official DELF/DELG `DatumProto` tensor files (PCA parameters, .delg_global) and .npy.

The official code stores PCA means, projection matrices and variances (and `.delg_global` descriptors)
as one serialized `delf.protos.DatumProto` (proto2):

    DatumShape  { repeated int64  dim   = 1 [packed]; }
    FloatList   { repeated float  value = 1 [packed]; }
    Uint32List  { repeated uint32 value = 1 [packed]; }
    DatumProto  { DatumShape shape = 1; oneof kind_oneof { FloatList float_list = 2; Uint32List uint32_list = 3; } }

The messages are built at import time from these facts with the installed `protobuf` runtime
(descriptor_pb2 + message_factory, in a private descriptor pool): no protoc step and no generated files.
Values are row-major. Floating inputs are stored as float32 and unsigned integers as uint32, as the
official writer does; the reader also accepts unpacked repeated fields (protobuf parses both).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError


class DatumError(ValueError):
    """A file is not a valid DatumProto (or a PCA file does not fit its configuration)."""


# --------------------------------------------------------------------------------------------------
# The DatumProto messages, from their .proto definition (delf/protos/datum.proto)
# --------------------------------------------------------------------------------------------------


def _datum_message_class():
    proto = descriptor_pb2.FileDescriptorProto(name="delf/protos/datum.proto", package="delf.protos", syntax="proto2")
    field = descriptor_pb2.FieldDescriptorProto
    for name, value_type in (("DatumShape", field.TYPE_INT64), ("FloatList", field.TYPE_FLOAT),
                             ("Uint32List", field.TYPE_UINT32)):
        repeated = proto.message_type.add(name=name).field.add(
            name="dim" if name == "DatumShape" else "value", number=1, type=value_type, label=field.LABEL_REPEATED)
        repeated.options.packed = True
    datum = proto.message_type.add(name="DatumProto")
    datum.oneof_decl.add(name="kind_oneof")
    for number, name, type_name, oneof in ((1, "shape", "DatumShape", None), (2, "float_list", "FloatList", 0),
                                           (3, "uint32_list", "Uint32List", 0)):
        entry = datum.field.add(name=name, number=number, type=field.TYPE_MESSAGE, label=field.LABEL_OPTIONAL,
                                type_name=f".delf.protos.{type_name}")
        if oneof is not None:
            entry.oneof_index = oneof
    pool = descriptor_pool.DescriptorPool()  # private: never clashes with a compiled delf package
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("delf.protos.DatumProto"))


DatumProto = _datum_message_class()


# --------------------------------------------------------------------------------------------------
# DatumProto encode / decode
# --------------------------------------------------------------------------------------------------


def array_to_datum_bytes(array: np.ndarray) -> bytes:
    """Serialize an array as a DatumProto: float16/32/64 -> float_list (float32), uint8..64 -> uint32_list.

    Raises DatumError for other dtypes (signed integers, bool, ...), as the official writer does.
    """
    array = np.asarray(array)
    message = DatumProto()
    message.shape.SetInParent()  # present even for a 0-d array, as the official writer leaves it
    message.shape.dim.extend(int(d) for d in array.shape)
    if array.dtype.kind == "f":
        values = message.float_list
        values.SetInParent()
        values.value.extend(np.ascontiguousarray(array, dtype=np.float32).ravel().tolist())
    elif array.dtype.kind == "u":
        if array.size and int(array.max()) > 0xFFFFFFFF:
            raise DatumError("uint64 values above 2**32-1 cannot be stored in a DatumProto uint32_list")
        values = message.uint32_list
        values.SetInParent()
        values.value.extend(array.astype(np.uint64).ravel().tolist())
    else:
        raise DatumError(f"DatumProto stores float or unsigned integer arrays, got dtype {array.dtype}")
    return message.SerializeToString()


def datum_bytes_to_array(data: bytes) -> np.ndarray:
    """Parse a serialized DatumProto into a float32 or uint32 array of its recorded shape."""
    message = DatumProto()
    try:
        message.ParseFromString(bytes(data))
    except DecodeError as err:
        raise DatumError(f"truncated or corrupt DatumProto ({err})") from None
    if not message.HasField("shape"):
        raise DatumError("not a DatumProto: no shape field")
    shape = list(message.shape.dim)
    if any(d < 0 for d in shape):
        raise DatumError(f"DatumProto has a negative dimension: {shape}")
    kind = message.WhichOneof("kind_oneof")
    if kind == "float_list":
        values = np.asarray(message.float_list.value, dtype=np.float32)
    elif kind == "uint32_list":
        values = np.asarray(message.uint32_list.value, dtype=np.uint32)
    else:
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
        from beam_job.delg.loader import read_remote_bytes  # the project's storage layer; no TensorFlow needed

        return read_remote_bytes(path)
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
    variances: np.ndarray | None

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
