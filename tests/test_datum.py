"""DatumProto reader/writer: round trips, cross-check against the protobuf runtime, errors, PCA loading, gs://."""

import numpy as np
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from beam_job.config import PcaConfig
from beam_job.delg import datum


def _datum_classes(packed: bool = True):
    """An independent construction of delf.protos.DatumProto (packed or not) to cross-check the module's codec."""
    fdp = descriptor_pb2.FileDescriptorProto(
        name=f"datum_test_{packed}.proto", package=f"t{int(packed)}", syntax="proto2")
    F = descriptor_pb2.FieldDescriptorProto

    def message(name, fields):
        msg = fdp.message_type.add(name=name)
        for number, fname, ftype, label, type_name in fields:
            field = msg.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:
                field.type_name = type_name
            if label == F.LABEL_REPEATED:
                field.options.packed = packed
        return msg

    pkg = fdp.package
    message("DatumShape", [(1, "dim", F.TYPE_INT64, F.LABEL_REPEATED, None)])
    message("FloatList", [(1, "value", F.TYPE_FLOAT, F.LABEL_REPEATED, None)])
    message("Uint32List", [(1, "value", F.TYPE_UINT32, F.LABEL_REPEATED, None)])
    msg = message(
        "DatumProto",
        [
            (1, "shape", F.TYPE_MESSAGE, F.LABEL_OPTIONAL, f".{pkg}.DatumShape"),
            (2, "float_list", F.TYPE_MESSAGE, F.LABEL_OPTIONAL, f".{pkg}.FloatList"),
            (3, "uint32_list", F.TYPE_MESSAGE, F.LABEL_OPTIONAL, f".{pkg}.Uint32List"),
        ],
    )
    msg.oneof_decl.add(name="kind_oneof")
    msg.field[1].oneof_index = 0
    msg.field[2].oneof_index = 0
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{pkg}.DatumProto"))


@pytest.mark.parametrize(
    "array",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4) / 7,
        np.array([1.5, -2.25, 3e-8], dtype=np.float64),
        np.arange(24, dtype=np.uint8).reshape(2, 3, 4),
        np.array([0, 1, 2**32 - 1], dtype=np.uint64),
        np.zeros((0, 128), np.float32),
    ],
)
def test_round_trip(array):
    back = datum.datum_bytes_to_array(datum.array_to_datum_bytes(array))
    assert back.shape == array.shape
    assert back.dtype == (np.float32 if array.dtype.kind == "f" else np.uint32)
    np.testing.assert_array_equal(back, array.astype(back.dtype))


def test_our_bytes_parse_with_protobuf_and_back():
    cls = _datum_classes(packed=True)
    array = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    msg = cls.FromString(datum.array_to_datum_bytes(array))
    assert list(msg.shape.dim) == [5, 3]
    assert msg.WhichOneof("kind_oneof") == "float_list"
    np.testing.assert_array_equal(np.asarray(msg.float_list.value, np.float32), array.ravel())
    # And protobuf's own serialization (as the official datum_io writes it) parses with ours.
    ref = cls()
    ref.shape.dim.extend([2, 2])
    ref.uint32_list.value.extend([7, 0, 300, 4294967295])
    np.testing.assert_array_equal(
        datum.datum_bytes_to_array(ref.SerializeToString()), np.array([[7, 0], [300, 4294967295]], np.uint32)
    )


def test_wire_bytes_match_the_official_format_byte_for_byte():
    """Hand-derived wire bytes (proto2, packed repeated fields), independent of any protobuf library:
    field 1 (shape) = 0a len {0a len dims}, field 2 (float_list) = 12 len {0a len float32 LE}, field 3 = 1a."""
    assert datum.array_to_datum_bytes(np.array([1.5, -2.0], np.float32)) == bytes.fromhex(
        "0a03" "0a0102" "120a" "0a08" "0000c03f" "000000c0")
    assert datum.array_to_datum_bytes(np.array([[300]], np.uint32)) == bytes.fromhex(
        "0a04" "0a020101" "1a04" "0a02" "ac02")  # uint32 300 = varint ac 02
    assert datum.array_to_datum_bytes(np.float32(3.5)) == bytes.fromhex("0a00" "1206" "0a04" "00006040")
    assert datum.array_to_datum_bytes(np.zeros((0, 128), np.float32)) == bytes.fromhex("0a05" "0a03008001" "1200")
    assert datum.DatumProto.DESCRIPTOR.full_name == "delf.protos.DatumProto"


def test_unpacked_repeated_fields_are_accepted():
    cls = _datum_classes(packed=False)
    ref = cls()
    ref.shape.dim.extend([3])
    ref.float_list.value.extend([0.5, -1.0, 2.0])
    data = ref.SerializeToString()
    assert data != datum.array_to_datum_bytes(np.array([0.5, -1.0, 2.0], np.float32))  # really unpacked
    np.testing.assert_array_equal(datum.datum_bytes_to_array(data), np.array([0.5, -1.0, 2.0], np.float32))


def test_errors():
    good = datum.array_to_datum_bytes(np.ones((4, 2), np.float32))
    with pytest.raises(datum.DatumError, match="truncated"):
        datum.datum_bytes_to_array(good[:-3])
    with pytest.raises(datum.DatumError, match="no shape"):
        datum.datum_bytes_to_array(b"")
    cls = _datum_classes()
    bad = cls()
    bad.shape.dim.extend([3, 3])
    bad.float_list.value.extend([1.0, 2.0])
    with pytest.raises(datum.DatumError, match=r"needs 9 values, file holds 2"):
        datum.datum_bytes_to_array(bad.SerializeToString())
    with pytest.raises(datum.DatumError, match="float or unsigned"):
        datum.array_to_datum_bytes(np.array([1, -2], np.int32))


def test_files_and_npy(tmp_path):
    array = np.linspace(0, 1, 6, dtype=np.float32).reshape(2, 3)
    datum.write_datum(array, str(tmp_path / "m.datum"))
    np.save(tmp_path / "m.npy", array.astype(np.float64))
    np.testing.assert_array_equal(datum.read_datum(str(tmp_path / "m.datum")), array)
    np.testing.assert_array_equal(datum.load_array(str(tmp_path / "m.datum")), array)
    np.testing.assert_array_equal(datum.load_array(str(tmp_path / "m.npy")), array.astype(np.float64))
    (tmp_path / "junk.datum").write_bytes(b"\x0a\x05\x0a")
    with pytest.raises(datum.DatumError, match=r"junk\.datum"):
        datum.read_datum(str(tmp_path / "junk.datum"))


def _pca_files(tmp_path, dim=8, k=8, whitening_len=8):
    rng = np.random.default_rng(1)
    mean = rng.standard_normal(dim).astype(np.float32)
    matrix = np.linalg.qr(rng.standard_normal((dim, dim)))[0][:k].astype(np.float32)
    variances = rng.uniform(0.5, 2, whitening_len).astype(np.float32)
    datum.write_datum(mean, str(tmp_path / "mean.datum"))
    datum.write_datum(matrix, str(tmp_path / "matrix.datum"))
    datum.write_datum(variances.reshape(-1, 1), str(tmp_path / "var.datum"))  # squeezed like the reference
    return mean, matrix, variances


def test_load_pca_checks_shapes(tmp_path):
    _mean, matrix, variances = _pca_files(tmp_path)
    cfg = PcaConfig(str(tmp_path / "mean.datum"), str(tmp_path / "matrix.datum"), 4, True, str(tmp_path / "var.datum"))
    params = datum.load_pca(cfg)
    assert params.dim == 4 and params.input_dim == 8 and params.use_whitening
    np.testing.assert_array_equal(params.matrix, matrix)
    np.testing.assert_array_equal(params.variances, variances)
    with pytest.raises(datum.DatumError, match="pca_dim=9 exceeds the 8 components"):
        datum.load_pca(PcaConfig(cfg.mean_path, cfg.projection_matrix_path, 9))
    datum.write_datum(matrix[:, :5], str(tmp_path / "narrow.datum"))
    with pytest.raises(datum.DatumError, match=r"expected \(K, 8\)"):
        datum.load_pca(PcaConfig(cfg.mean_path, str(tmp_path / "narrow.datum"), 4))


def test_read_datum_from_gcs(gcs_bucket):
    array = np.arange(6, dtype=np.float32).reshape(3, 2)
    gcs_bucket.blob("pca/mean.datum").upload_from_string(datum.array_to_datum_bytes(array))
    np.testing.assert_array_equal(datum.load_array(f"gs://{gcs_bucket.name}/pca/mean.datum"), array)
