"""Inputs: image ids, manifest formats (CSV / text / Parquet), glob listing through a real Beam run."""

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to

from beam_job.pipeline.inputs import ListInputs, check_inputs, derive_image_id, read_manifest


def test_derived_image_id_is_stable_sha1_prefix():
    assert derive_image_id("gs://b/a.jpg") == derive_image_id("gs://b/a.jpg")
    assert derive_image_id("gs://b/a.jpg") != derive_image_id("gs://b/b.jpg")
    # Documented rule: first 16 hex digits of SHA-1 of the UTF-8 path.
    assert derive_image_id("abc") == "a9993e364706816a"


def test_csv_manifest_with_ids_quotes_and_extra_columns(tmp_path):
    m = tmp_path / "m.csv"
    m.write_text('label,path,image_id\nx,"/data/a, b.jpg",A\ny,/data/c.jpg,\n\nz,/data/d.jpg,D\n')
    assert list(read_manifest(str(m))) == [("A", "/data/a, b.jpg"), (derive_image_id("/data/c.jpg"), "/data/c.jpg"),
                                           ("D", "/data/d.jpg")]


def test_plain_text_manifest_skips_blank_and_comment_lines(tmp_path):
    m = tmp_path / "list.txt"
    m.write_text("# my images\n/data/a.jpg\n\n  /data/b.jpg  \n")
    assert list(read_manifest(str(m))) == [(derive_image_id("/data/a.jpg"), "/data/a.jpg"),
                                           (derive_image_id("/data/b.jpg"), "/data/b.jpg")]


def test_csv_without_path_column_is_refused_with_a_fix(tmp_path):
    m = tmp_path / "bad.csv"
    m.write_text("file,id\n/data/a.jpg,1\n")
    with pytest.raises(ValueError, match="no 'path' column"):
        list(read_manifest(str(m)))
    with pytest.raises(ValueError, match="no 'path' column"):
        check_inputs([], [str(m)])


def test_parquet_manifest_such_as_a_failures_table(tmp_path):
    m = tmp_path / "failures.parquet"
    pq.write_table(
        pa.table({"image_id": ["A", None], "path": ["/x/a.jpg", "/x/b.jpg"], "stage": ["read", "decode"]}), m)
    assert list(read_manifest(str(m))) == [("A", "/x/a.jpg"), (derive_image_id("/x/b.jpg"), "/x/b.jpg")]


def test_check_inputs_counts_and_rejects(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    (tmp_path / "b.jpg").write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    m = tmp_path / "m.txt"
    m.write_text("/x/1.jpg\n/x/2.jpg\n/x/3.jpg\n")
    assert check_inputs([str(tmp_path / "*")], [str(m)], count=True) == 2 + 1 + 3  # dir left out; m.txt matched
    with pytest.raises(ValueError, match="matches no file"):
        check_inputs([str(tmp_path / "*.png")], [])
    with pytest.raises(ValueError, match="does not exist"):
        check_inputs([], [str(tmp_path / "nope.csv")])


def test_list_inputs_expands_globs_and_manifest_patterns_in_beam(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for name in ("a.jpg", "b.jpg"):
        (imgs / name).write_bytes(b"x")
    (tmp_path / "m1.txt").write_text("/elsewhere/c.jpg\n")
    (tmp_path / "m2.txt").write_text(f"{imgs / 'a.jpg'}\n")  # listed twice on purpose: duplicates are kept here
    expected = [(derive_image_id(p), p) for p in
                (str(imgs / "a.jpg"), str(imgs / "b.jpg"), "/elsewhere/c.jpg", str(imgs / "a.jpg"))]
    with beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"])) as p:
        out = p | ListInputs([str(imgs / "*.jpg")], [str(tmp_path / "m*.txt")])
        assert_that(out, equal_to(expected))
