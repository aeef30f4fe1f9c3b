"""Inputs: image ids, the stored form of paths, manifest formats (CSV / text / Parquet), glob listing in Beam."""

import hashlib
import os

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to

from beam_job import cli, storage
from beam_job.pipeline.inputs import (
    ListInputs,
    ManifestError,
    case_variant_pattern,
    check_inputs,
    derive_image_id,
    folder_pattern,
    path_to_text,
    read_manifest,
    text_to_path,
)

from helpers import fails_with

NOT_UTF8 = os.fsdecode(b"caf\xe9 \xff.jpg")  # what os.listdir gives for these bytes (surrogate escapes)


def test_derived_image_id_is_stable_sha1_prefix():
    assert derive_image_id("gs://b/a.jpg") == derive_image_id("gs://b/a.jpg")
    assert derive_image_id("gs://b/a.jpg") != derive_image_id("gs://b/b.jpg")
    # Documented rule: first 16 hex digits of SHA-1 of the UTF-8 path.
    assert derive_image_id("abc") == "a9993e364706816a"
    # A name that is not UTF-8: SHA-1 of its raw bytes (no "surrogates not allowed" error).
    assert derive_image_id("/d/" + NOT_UTF8) == hashlib.sha1(b"/d/caf\xe9 \xff.jpg").hexdigest()[:16]


@pytest.mark.parametrize("path,as_is", [
    ("/data/a.jpg", True), ("gs://b/dir/photo 1.jpg ", True), ("/d/фото 東京.png", True), ("C:\\x\\y.jpg", True),
    ("/d/a\\x41.jpg", True),  # "\x41" text is no escape (escapes are 80..ff only)
    ("/d/" + NOT_UTF8, False), ("/d/a\\xe9.jpg", False), ("/d/a\\\\b.jpg", False),
    (os.fsdecode(b"/d/\\xff\xff\\"), False), ("/d/\ud800.jpg", False),
])
def test_stored_form_is_utf8_and_gives_back_the_same_path(path, as_is):
    text = path_to_text(path)
    text.encode("utf-8")  # valid UTF-8: Beam coders and Parquet strings accept it
    assert (text == path) == as_is
    if path != "/d/\ud800.jpg":  # a lone surrogate that is no escaped byte is kept, not restored
        assert text_to_path(text) == path
    assert path_to_text(os.fsdecode(b"/d/caf\xe9.jpg")) == "/d/caf\\xe9.jpg"


def test_csv_manifest_with_ids_quotes_and_extra_columns(tmp_path):
    m = tmp_path / "m.csv"
    m.write_text('label,path,image_id\nx,"/data/a, b.jpg",A\ny,/data/c.jpg,\n\nz,/data/d.jpg,D\n')
    assert list(read_manifest(str(m))) == [("A", "/data/a, b.jpg"), (derive_image_id("/data/c.jpg"), "/data/c.jpg"),
                                           ("D", "/data/d.jpg")]


def test_csv_paths_are_verbatim_and_quoting_is_the_csv_modules(tmp_path):
    m = tmp_path / "m.csv"
    m.write_bytes(b'path,image_id\r\n/d/trailing.jpg ,T\r\n" /d/quoted .jpg ", Q \r\n"/d/two\nlines.jpg",\r\n'
                  b'/d/caf\xe9.jpg,\r\n,orphan-id\r\n')
    assert list(read_manifest(str(m))) == [
        ("T", "/d/trailing.jpg "), ("Q", " /d/quoted .jpg "),
        (derive_image_id("/d/two\nlines.jpg"), "/d/two\nlines.jpg"),
        (derive_image_id(os.fsdecode(b"/d/caf\xe9.jpg")), "/d/caf\\xe9.jpg"),
    ]  # the row without a path is skipped (logged, counted), it does not stop the job


def test_plain_text_manifest_lines_are_paths_as_written(tmp_path):
    m = tmp_path / "list.txt"
    m.write_bytes(b"\xef\xbb\xbf# my images\n/data/a.jpg\r\n\n   \n  /data/b.jpg  \n/data/c.jpg\r/d/caf\xe9.jpg\n"
                  b" # not a comment\n/data/last.jpg")
    expected = ["/data/a.jpg", "  /data/b.jpg  ", "/data/c.jpg", os.fsdecode(b"/d/caf\xe9.jpg"), " # not a comment",
                "/data/last.jpg"]
    assert list(read_manifest(str(m))) == [(derive_image_id(p), path_to_text(p)) for p in expected]


def test_csv_without_path_column_is_refused_with_a_fix(tmp_path):
    m = tmp_path / "bad.csv"
    m.write_text("file,id\n/data/a.jpg,1\n")
    with pytest.raises(ValueError, match="no 'path' column"):
        list(read_manifest(str(m)))
    with pytest.raises(ValueError, match="no 'path' column"):
        check_inputs([], [str(m)])


def test_parquet_manifest_such_as_a_failures_table(tmp_path):
    m = tmp_path / "failures.parquet"
    stored = path_to_text("/x/" + NOT_UTF8)
    pq.write_table(pa.table({"image_id": ["A", None, None], "path": ["/x/a.jpg", "/x/b.jpg", stored],
                             "stage": ["read", "decode", "decode"]}), m)
    assert list(read_manifest(str(m))) == [("A", "/x/a.jpg"), (derive_image_id("/x/b.jpg"), "/x/b.jpg"),
                                           (derive_image_id("/x/" + NOT_UTF8), stored)]


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


def test_local_glob_lists_every_entry_but_directories(tmp_path, monkeypatch):
    names = ["a.jpg", "trailing.jpg ", " lead.jpg", NOT_UTF8, "x.png"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "broken.jpg").symlink_to(tmp_path / "gone.jpg")  # Beam's own listing drops it silently
    (tmp_path / "dir.jpg").mkdir()
    (tmp_path / "dir.jpg" / "inner.jpg").write_bytes(b"x")
    (tmp_path / "linkdir.jpg").symlink_to(tmp_path / "dir.jpg")
    expected = sorted(str(tmp_path / n) for n in [*names, "broken.jpg"] if n != "x.png")
    assert storage.match(str(tmp_path / "*.jpg*")) == expected
    assert storage.match(str(tmp_path / "**.jpg")) == sorted(
        [p for p in expected if p.endswith(".jpg")] + [str(tmp_path / "dir.jpg" / "inner.jpg")])
    assert storage.match(str(tmp_path / "broken.jpg")) == [str(tmp_path / "broken.jpg")]
    assert storage.match(str(tmp_path / "dir.jpg")) == []
    monkeypatch.chdir(tmp_path)  # a relative glob lists relative paths
    assert storage.match("*.png") == ["x.png"]


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


def test_list_inputs_carries_names_that_are_not_utf8_through_beam(tmp_path):
    """A glob and a text manifest over names that are not UTF-8 or end in a space give one element each."""
    imgs = tmp_path / os.fsdecode(b"imgs \xe9")  # the pattern itself is not UTF-8 either
    imgs.mkdir()
    raw_names = [b"caf\xe9.jpg", b"\xff\xfe.jpg", b"space.jpg ", b"plain.jpg"]
    for raw in raw_names:
        (imgs / os.fsdecode(raw)).write_bytes(b"x")
    manifest = tmp_path / "list.txt"
    manifest.write_bytes(b"".join(os.fsencode(str(imgs)) + b"/" + raw + b"\r\n" for raw in raw_names[:3]))
    paths = [str(imgs / os.fsdecode(raw)) for raw in raw_names]
    expected = [(derive_image_id(p), path_to_text(p)) for p in paths + paths[:3]]
    with beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"])) as p:
        out = p | ListInputs([str(imgs / "*")], [str(manifest)])
        assert_that(out, equal_to(expected))
    assert check_inputs([str(imgs / "*")], [str(manifest)], count=True) == 7


# ----------------------------------------------------------------------------- strict CSV manifests, folders

TINY_RUN = ["--preset", "tiny", "--no_progress"]


def _tiny_images(directory, names):
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", (48, 40), (10 + 40 * i, 200, 30)).save(directory / name)
    return [str(directory / n) for n in names]


@pytest.mark.parametrize("case", ["unterminated_quote", "text_after_quote", "cell_over_field_limit", "extra_cells"])
def test_malformed_csv_manifest_is_refused_before_launch_naming_file_and_line(tmp_path, capsys, case):
    """Every way a CSV manifest can be malformed stops the run before launch with one line naming the file and the
    line, instead of rows silently lost (an unterminated quote swallowed every later row) or a raw traceback."""
    good = _tiny_images(tmp_path / "img", ["a.jpg"])[0]
    later = "".join(f"{tmp_path}/img/later{i}.jpg,L{i}\n" for i in range(3000))
    body, needles = {
        "unterminated_quote": (f'"{good},B\n' + later, ["line 3", "never closed"]),
        "text_after_quote": (f'"{good}",B\n"{good}"x,C\n' + later, ["line 4", "malformed CSV"]),
        "cell_over_field_limit": ("/x" * 70_000 + ",B\n" + later, ["line 3", "longer than 131072 characters"]),
        "extra_cells": (f"{tmp_path}/img/a, b.jpg,B\n" + later, ["line 3", "3 cells where the header has 2"]),
    }[case]
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"path,image_id\n{good},A\n" + body)
    out = tmp_path / "out"
    fails_with(capsys, ["--manifest", str(manifest), "--output", str(out), *TINY_RUN],
             f"CSV manifest {manifest}, ", *needles)
    assert not out.exists()  # nothing launched: no claim, no shard, no _SUCCESS
    with pytest.raises(ManifestError, match=needles[0]):
        list(read_manifest(str(manifest)))


def test_malformed_csv_manifest_past_the_launcher_check_fails_the_job_naming_the_line(tmp_path):
    """A manifest too large for the launcher's full check (remote runs) is parsed as strictly inside the job."""
    manifest = tmp_path / "m.csv"
    manifest.write_text('path\n/x/a.jpg\n/x/b.jpg\n"/x/c.jpg\n/x/d.jpg\n')
    with pytest.raises(Exception, match=r"m\.csv, line 4: a quoted cell opened there is never closed"):
        with beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"])) as p:
            _ = p | ListInputs([], [str(manifest)])


def test_csv_manifest_quoting_that_is_well_formed_still_reads(tmp_path):
    m = tmp_path / "m.csv"
    m.write_text('path,image_id\n"/d/a ""q"".jpg",A\n"/d/b,\nc.jpg",B,,\n/d/c.jpg\n')
    assert list(read_manifest(str(m))) == [("A", '/d/a "q".jpg'), ("B", "/d/b,\nc.jpg"),
                                           (derive_image_id("/d/c.jpg"), "/d/c.jpg")]


def test_folder_input_lists_the_files_directly_in_it(tmp_path, capsys):
    """--input <folder> (with or without a trailing '/') reads the images in it, as 'folder/*' would: files in
    subfolders are left out; an empty folder is refused before launch like a glob that matches nothing."""
    folder = tmp_path / "photos"
    top = _tiny_images(folder, ["a.jpg", "b.png"])
    _tiny_images(folder / "sub", ["deep.jpg"])
    assert folder_pattern(str(folder)) == str(folder / "*")
    assert folder_pattern(str(folder) + "/") == str(folder / "*")
    assert folder_pattern("gs://bucket/photos/") == "gs://bucket/photos/*"
    assert folder_pattern("gs://bucket/photos/a.jpg") == "gs://bucket/photos/a.jpg"
    assert folder_pattern(top[0]) == top[0]
    assert check_inputs([str(folder)], [], count=True) == 2

    out = tmp_path / "out"
    assert cli.main(["--input", str(folder), "--output", str(out), *TINY_RUN]) == 0
    table = pq.read_table(str(out / "features"))
    assert sorted(table.column("path").to_pylist()) == top
    assert (out / "_SUCCESS").exists()

    empty = tmp_path / "empty"
    (empty / "only_a_subfolder").mkdir(parents=True)
    (empty / "only_a_subfolder" / "x.jpg").write_bytes(b"x")
    fails_with(capsys, ["--input", str(empty) + "/", "--output", str(tmp_path / "out2"), *TINY_RUN],
             f"--input {empty}/ matches no file", f"{empty}/**")
    assert not (tmp_path / "out2").exists()


def test_gcs_folder_input_is_the_prefix_ending_in_a_slash(gcs_bucket):
    """gs://bucket/photos/ lists the objects directly under the prefix (as gs://bucket/photos/* does); without the
    slash it is refused with the fix named; an empty prefix is refused like a glob that matches nothing."""
    for name in ("photos/a.jpg", "photos/b.jpg", "photos/sub/c.jpg"):
        gcs_bucket.blob(name).upload_from_string(b"x")
    base = f"gs://{gcs_bucket.name}"
    assert check_inputs([f"{base}/photos/"], [], count=True) == 2
    assert check_inputs([f"{base}/photos/"], []) is None
    with pytest.raises(ValueError, match=f"trailing '/', '{base}/photos/'"):
        check_inputs([f"{base}/photos"], [])
    with pytest.raises(ValueError, match="matches no file"):
        check_inputs([f"{base}/empty/"], [], count=True)


def test_a_glob_matches_case_sensitively_and_a_local_run_says_what_it_left_out(tmp_path, caplog):
    """'*.jpg' leaves out x.JPG (as Linux and gs:// match): the launcher's listing says how many and how to add
    them; a folder reads them all, whatever the extension's case."""
    import logging

    folder = tmp_path / "photos"
    _tiny_images(folder, ["a.jpg", "b.JPG", "c.Jpg", "d.png"])
    assert case_variant_pattern("d/*.jpg") == "d/*.[jJ][pP][gG]"
    assert case_variant_pattern("d/*") is None and case_variant_pattern("d/a.jpg") is None
    caplog.set_level(logging.INFO, logger="beam_job.pipeline.inputs")
    assert check_inputs([str(folder / "*.jpg")], [], count=True) == 1
    hints = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(hints) == 1, hints
    assert "matched 1 files and left out 2 whose extension differs only in case (.JPG, .Jpg" in hints[0], hints
    assert f"add --input '{folder / '*.JPG'}'" in hints[0], hints
    caplog.clear()
    assert check_inputs([str(folder)], [], count=True) == 4  # the folder: every file, any case
    assert check_inputs([str(folder / "*.png")], [], count=True) == 1
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
