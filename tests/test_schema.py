"""The delg_v1 schema is stable: a snapshot of its columns guards against accidental changes."""

import pyarrow as pa
import pytest

from beam_job import schemas


def test_features_schema_snapshot():
    schema = schemas.features_schema()
    assert [(f.name, str(f.type), f.nullable) for f in schema] == [
        ("image_id", "string", False),
        ("path", "string", False),
        ("original_height", "int32", False),
        ("original_width", "int32", False),
        ("processed_height", "int32", False),
        ("processed_width", "int32", False),
        ("global_descriptor", "fixed_size_list<item: float>[2048]", False),
        ("num_features", "int32", False),
        ("locations", "list<item: fixed_size_list<item: float>[2]>", False),
        ("scales", "list<item: float>", False),
        ("attention", "list<item: float>", False),
        ("descriptors", "list<item: fixed_size_list<item: float>[128]>", False),
        ("model", "string", False),
        ("preset", "string", False),
    ]
    assert all(f.metadata and f.metadata[b"doc"] for f in schema)


def test_float16_option_changes_only_descriptors():
    f32, f16 = schemas.features_schema("float32"), schemas.features_schema("float16")
    diff = [a.name for a, b in zip(f32, f16, strict=True) if a.type != b.type]
    assert diff == ["descriptors"]
    assert f16.field("descriptors").type.value_type.value_type == pa.float16()
    with pytest.raises(ValueError):
        schemas.features_schema("float64")


def test_failures_schema_snapshot():
    assert schemas.FAILURES_SCHEMA.names == ["image_id", "path", "stage", "error_type", "message", "model", "preset"]


def test_file_metadata_names_version_model_preset_and_convention():
    meta = schemas.file_metadata(model="m", preset="p", config_json="{}", untrained=True)
    assert meta[b"delg.schema_version"] == b"delg_v1"
    assert meta[b"delg.model"] == b"m" and meta[b"delg.preset"] == b"p"
    assert b"(y, x)" in meta[b"delg.coordinate_convention"]
    assert meta[b"delg.untrained_model"] == b"true"
