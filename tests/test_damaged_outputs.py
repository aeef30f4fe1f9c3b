"""An output that is not what the job wrote is named, with the way out, and a resumed run is judged as the run
uninterrupted (issue 16, items 2, 6, 7).

* `resume.check_output_shards` (the launcher calls it before a resume) reads each shard's footer: an empty,
  truncated or junk file, a damaged footer, another schema, a shard in the other kind's folder.
* A damaged data page of the id or path column passes the footer check; the resume finds it when it reads the
  column (page checksums) and the job fails in one line naming the file.
* Duplicated feature rows (a shard copied) fail the run, naming the shards; moving the copy away mends it.
* `ResolveInputsFn` skips by (image_id, path), and `run_status` judges the inputs the run lists.
"""

import glob
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from beam_job import cli, storage
from beam_job.config import get_preset
from beam_job.features import DelgFeatures
from beam_job.layout import FAILURES, FEATURES
from beam_job.pipeline import resume
from beam_job.pipeline.options import JobConfig, RunContext
from beam_job.pipeline.rows import failure_record, feature_record, table_for
from beam_job.pipeline.summary import run_status
from beam_job.pipeline.transforms import DUPLICATE, FAILED, SKIPPED, DuplicateImageIdError, ResolveInputsFn
from beam_job.pipeline.writer import parquet_writer, shard_schema

from helpers import make_good_images

TINY = ["--preset", "tiny", "--no_progress"]
JOB = JobConfig(inputs=("unused/*.jpg",), manifests=(), output="unused", extraction=get_preset("tiny"))
RUN = RunContext(model_identity="embedded:tiny@sha256:000000000000", started_at="2026-12-03T00:00:00+00:00")


def _features(seed, n=3):
    rng = np.random.default_rng(seed)
    g = rng.standard_normal(2048).astype(np.float32)
    return DelgFeatures(global_descriptor=g / np.linalg.norm(g), locations=rng.random((n, 2), dtype=np.float32),
                        descriptors=rng.standard_normal((n, 128)).astype(np.float32), scales=np.ones(n, np.float32),
                        attention=np.ones(n, np.float32), original_hw=(50, 60), processed_hw=(50, 60),
                        scale_factors=(1.0, 1.0))


def _write(path, kind, records):
    """A shard exactly as the job writes one (its schema, footer metadata and writer settings)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    schema = shard_schema(kind, JOB, RUN)
    writer = parquet_writer(path, schema)
    writer.write_table(table_for(kind, records, schema))
    writer.close()
    return path


@pytest.fixture
def good_output(tmp_path):
    """An output with one feature shard and one failure shard written by the job's own writer."""
    output = str(tmp_path / "good")
    _write(f"{output}/features/part-a-00000-of-00001.parquet", FEATURES,
           [feature_record(f"id{i}", f"/img/{i}.jpg", _features(i), model=RUN.model_identity, preset="tiny")
            for i in range(4)])
    _write(f"{output}/failures/part-a-00000-of-00001.parquet", FAILURES,
           [failure_record("bad", "/img/bad.jpg", "decode", "ImageDecodeError", "truncated",
                           model=RUN.model_identity, preset="tiny")])
    return output


def _flip(path, offset, mask=0x10):
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)[0]
        fh.seek(offset)
        fh.write(bytes([byte ^ mask]))


def _other_schema(path):
    pq.write_table(pa.table({"a": [1, 2], "b": ["x", "y"]}), path)


def _damages(output):
    """name -> (damage(output) -> the damaged file, the words the error must say)."""
    feature_shard = f"{output}/features/part-a-00000-of-00001.parquet"
    failure_shard = f"{output}/failures/part-a-00000-of-00001.parquet"

    def truncated(out):
        data = open(feature_shard, "rb").read()
        open(feature_shard, "wb").write(data[: len(data) // 2])
        return feature_shard

    def empty(out):
        open(feature_shard, "wb").close()
        return feature_shard

    def footer_length_flipped(out):  # one bit of the 4-byte footer length before the closing "PAR1"
        _flip(feature_shard, os.path.getsize(feature_shard) - 6, 0x40)
        return feature_shard

    def truncated_failures(out):
        data = open(failure_shard, "rb").read()
        open(failure_shard, "wb").write(data[:-3])
        return failure_shard

    def junk(out):
        path = f"{output}/features/x.parquet"
        open(path, "wb").write(b"not a parquet file\n" * 20)
        return path

    def failures_in_features(out):
        path = f"{output}/features/part-b-00000-of-00001.parquet"
        shutil.copy(failure_shard, path)
        return path

    def features_in_failures(out):
        path = f"{output}/failures/part-b-00000-of-00001.parquet"
        shutil.copy(feature_shard, path)
        return path

    def other_schema_in_features(out):
        _other_schema(f"{output}/features/other.parquet")
        return f"{output}/features/other.parquet"

    def other_schema_in_failures(out):
        _other_schema(f"{output}/failures/other.parquet")
        return f"{output}/failures/other.parquet"

    not_parquet = "is not a readable Parquet file ("
    return {"truncated": (truncated, not_parquet), "empty": (empty, not_parquet),
            "footer_length_flipped": (footer_length_flipped, not_parquet),
            "truncated_failures": (truncated_failures, not_parquet), "junk": (junk, not_parquet),
            "failures_in_features": (failures_in_features, "holds failure rows (the failures schema), not feature "
                                                           "rows: it belongs in failures/"),
            "features_in_failures": (features_in_failures, "holds feature rows (the features schema), not failure "
                                                           "rows: it belongs in features/"),
            "other_schema_in_features": (other_schema_in_features, "is a Parquet file of another schema (columns: "
                                                                   "a, b), not one of the job's features shards"),
            "other_schema_in_failures": (other_schema_in_failures, "is a Parquet file of another schema (columns: "
                                                                   "a, b), not one of the job's failures shards")}


@pytest.mark.parametrize("damage", sorted(_damages("x")))
def test_check_output_shards_names_the_damaged_shard_and_the_way_out(good_output, tmp_path, damage):
    assert resume.check_output_shards(good_output) is None  # an output as the job wrote it passes
    output = str(tmp_path / "damaged")
    shutil.copytree(good_output, output)
    make, says = _damages(output)[damage]
    path = make(output)
    with pytest.raises(ValueError) as err:
        resume.check_output_shards(output)
    message = str(err.value)
    assert isinstance(err.value, resume.DamagedShardError) and "\n" not in message
    assert message.startswith(f"{path} {says}"), message
    folder = os.path.dirname(path)
    assert f"move it out of {folder}/ (or delete it) and run again with --skip_existing" in message
    assert f"--overwrite to start {output} over" in message
    # The way out works: moved away, the output passes again.
    os.replace(path, str(tmp_path / "moved.parquet"))
    if damage in ("truncated", "empty", "footer_length_flipped", "truncated_failures"):
        assert resume.check_output_shards(output) is None


def test_check_output_shards_names_the_first_of_several_and_counts_the_rest(good_output):
    for name in ("x.parquet", "y.parquet"):
        open(f"{good_output}/features/{name}", "wb").close()
    with pytest.raises(resume.DamagedShardError, match=r"features/x\.parquet is not a readable Parquet file .*"
                                                       r"\(1 more shard\(s\) are damaged too"):
        resume.check_output_shards(good_output)


def _column_chunk_end(path, column):
    """The offset of the last byte of a column's chunk in row group 0 (inside its last page's payload)."""
    meta = pq.ParquetFile(path).metadata.row_group(0)
    chunk = next(meta.column(i) for i in range(meta.num_columns) if meta.column(i).path_in_schema == column)
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    return start + chunk.total_compressed_size - 1


@pytest.mark.parametrize("column", ["image_id", "path"])
def test_a_flipped_bit_in_a_data_page_passes_the_footer_check_and_is_named_when_read(good_output, column):
    """Footers do not cover data pages: the check before launch cannot see this; the resume reads the id and
    path columns with page checksums on, and names the file."""
    shard = f"{good_output}/features/part-a-00000-of-00001.parquet"
    _flip(shard, _column_chunk_end(shard, column))
    assert resume.check_output_shards(good_output) is None
    with pytest.raises(resume.DamagedShardError) as err:
        resume.read_outcome_keys(shard, FEATURES)
    assert str(err.value).startswith(f"{shard} cannot be read (") and "CRC" in str(err.value)
    assert f"move it out of {good_output}/features/" in str(err.value)


def _manifest(tmp_path):
    """4 decodable images and a missing file, as a plain-text manifest."""
    lines = [*sorted(make_good_images(str(tmp_path / "img"), n_rgb=3))[:4], str(tmp_path / "img" / "absent.jpg")]
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    return str(tmp_path / "list.txt")


def _job_error(capsys, argv):
    capsys.readouterr()
    status = cli.main(argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("delg-extract: ")]
    return status, lines


def test_a_damaged_id_page_fails_the_resume_in_one_line_naming_the_shard(tmp_path, capsys):
    output = str(tmp_path / "out")
    run = ["--manifest", _manifest(tmp_path), "--output", output, *TINY]
    assert cli.main(run) == 0
    shard = glob.glob(f"{output}/features/*.parquet")[0]
    _flip(shard, _column_chunk_end(shard, "image_id"))
    status, lines = _job_error(capsys, [*run, "--skip_existing"])
    assert status == 1 and len(lines) == 1, lines
    assert lines[0].startswith("delg-extract: job failed: ") and f"{shard} cannot be read (" in lines[0]
    assert f"move it out of {output}/features/" in lines[0]
    assert not os.path.exists(f"{output}/_SUCCESS")
    assert not glob.glob(f"{output}/*/beam-temp-*")  # the failed run's temp folders are removed


def _snapshot(output):
    return sorted((os.path.relpath(os.path.join(d, f), output), os.path.getsize(os.path.join(d, f)))
                  for d, _, files in os.walk(output) for f in files)


def test_a_damaged_shard_is_refused_before_launch_naming_it_and_the_resume_works_once_it_is_moved(tmp_path, capsys):
    """Junk under features/ used to fail the resume after launch with "Could not open Parquet input source
    '<Buffer>'", no file named, _SUCCESS deleted and beam-temp-* left: now exit 2 before any work, one line."""
    output = str(tmp_path / "out")
    run = ["--manifest", _manifest(tmp_path), "--output", output, *TINY]
    assert cli.main(run) == 0
    junk = f"{output}/features/x.parquet"
    with open(junk, "wb") as fh:
        fh.write(b"not parquet at all")
    before = _snapshot(output)
    status, lines = _job_error(capsys, [*run, "--skip_existing"])
    assert status == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"delg-extract: error: {junk} ") and f"move it out of {output}/features/" in lines[0]
    assert _snapshot(output) == before  # nothing launched, written or deleted; the claim released
    os.replace(junk, str(tmp_path / "x.parquet"))
    assert cli.main([*run, "--skip_existing"]) == 0


def test_duplicated_feature_rows_fail_the_run_naming_the_shards_until_the_copy_is_moved(tmp_path, capsys):
    """A copied feature shard used to end in `succeeded` with `duplicate_feature_rows` in the summary only."""
    output = str(tmp_path / "out")
    run = ["--manifest", _manifest(tmp_path), "--output", output, *TINY, "--rows_per_shard", "2"]
    assert cli.main(run) == 0
    original = sorted(glob.glob(f"{output}/features/part-*.parquet"))[0]  # 2 rows
    copy = f"{output}/features/part-copy.parquet"
    shutil.copy(original, copy)
    status, lines = _job_error(capsys, [*run, "--skip_existing"])
    assert status == 1 and len(lines) == 1, lines
    assert "features/ holds 2 image id(s) more than once (2 extra feature row(s), in " in lines[0]
    assert original in lines[0] and copy in lines[0] and "move the extra shard(s) out of features/" in lines[0]
    assert not os.path.exists(f"{output}/_SUCCESS")
    summaries = sorted(glob.glob(f"{output}/runs/*/summary.json"), key=os.path.getmtime)
    summary = storage.read_json(summaries[-1])
    assert summary["status"] == "failed" and summary["output"]["duplicate_feature_rows"] == 2
    # The way out given: move the copy away and resume.
    os.replace(copy, str(tmp_path / "part-copy.parquet"))
    assert cli.main([*run, "--skip_existing"]) == 0
    assert os.path.exists(f"{output}/_SUCCESS")


# ----------------------------------------------------------------------------- what a resume skips

def _resolve(listed, done=()):
    """Run ResolveInputsFn on one id: (to process, {path: (error_type, message)} of duplicate-id failure rows,
    skipped kinds, identical listings collapsed)."""
    fn = ResolveInputsFn(JOB, RUN)
    fn.setup()
    todo, duplicates, skipped, collapsed = [], {}, [], 0
    for out in fn.process(("same", {"input": list(listed), "done": list(done)})):
        tag = getattr(out, "tag", None)
        if tag == SKIPPED:
            skipped.append(out.value)
        elif tag == FAILED:
            record, _ = out.value
            duplicates[record["path"]] = (record["error_type"], record["message"])
        elif tag == DUPLICATE:
            collapsed += 1
        else:
            todo.append(out[1])
    assert collapsed == len(listed) - len(set(listed))
    return todo, duplicates, sorted(skipped)


def test_resume_skips_by_image_id_and_path_not_by_id():
    dup = DuplicateImageIdError.__name__
    assert dup == resume.DUPLICATE_ID_ERROR
    # A fresh run: the first path is the id's, the other is a duplicate; identical listings collapse.
    todo, duplicates, skipped = _resolve(["b", "a", "b"])
    assert todo == ["a"] and list(duplicates) == ["b"] and not skipped
    assert duplicates["b"] == (dup, "image_id same is also listed for a: give each path its own id")
    # Killed between the commits, features first: "a" has its row, "b" must still get its duplicate row.
    assert _resolve(["a", "b"], [(FEATURES, "a")]) == ([], duplicates, [FEATURES])
    # Failures first: "b"'s duplicate row is kept, "a" is extracted.
    assert _resolve(["a", "b"], [(FAILURES, "b")]) == (["a"], {}, [FAILURES])
    # Both committed: nothing left to do.
    assert _resolve(["a", "b"], [(FEATURES, "a"), (FAILURES, "b")]) == ([], {}, [FAILURES, FEATURES])
    # The id's feature row is for a path this run does not list: every listed path is a duplicate of it.
    _, duplicates, _ = _resolve(["c"], [(FEATURES, "a")])
    assert duplicates == {"c": (dup, "image_id same already has its feature row, for a: give each path its "
                                     "own id")}
    # Only duplicates recorded and listed again: the first of them becomes the id's own path.
    assert _resolve(["b"], [(FAILURES, "b")]) == (["b"], {}, [])


# ----------------------------------------------------------------------------- the verdict

def _run(processed, failures, skipped=0, skipped_failing=0, retried=0, still_failing=0):
    return {"processed": processed, "failures": failures, "skipped_existing": skipped,
            "skipped_existing_failures": skipped_failing, "retried": retried, "retried_still_failing": still_failing}


def _output(images, failures, duplicate_rows=0):
    return {"images": images, "failures": failures, "duplicate_feature_rows": duplicate_rows}


def test_a_killed_run_and_its_resume_get_the_verdict_of_the_run_uninterrupted():
    # 210 inputs, 10 failing. Uninterrupted: succeeded.
    assert run_status(_run(210, 10), _output(210, 10), 0.5) == ("succeeded", "")
    # Killed after the 200 features were committed: the resume tries the 10 and they fail. It was judged
    # "10 of 10 images new to the output failed (100% > 50%)"; over what the run lists, it is 10 of 210.
    assert run_status(_run(10, 10, skipped=200), _output(210, 10), 0.5) == ("succeeded", "")
    # Killed after the failures were committed: they are retries that still fail, not counted.
    assert run_status(_run(210, 10, retried=10, still_failing=10), _output(210, 10), 0.5)[0] == "succeeded"
    # A run that lists only broken inputs is not hidden by a big good output.
    status, reason = run_status(_run(10, 10), _output(1010, 10), 0.5)
    assert status == "failed" and reason.startswith("10 of the 10 images this run lists failed (100% > ")
    # A retry of failures that still fail (one of them a duplicate id, kept) does not fail a good output.
    assert run_status(_run(3, 3, skipped=1, skipped_failing=1, retried=3, still_failing=3),
                      _output(100, 4), 0.5) == ("succeeded", "")
    # The whole output over the ratio fails whatever this run did.
    assert run_status(_run(1, 0), _output(10, 6), 0.5)[1].endswith("over the whole output)")


def test_duplicate_feature_rows_fail_the_verdict_first():
    status, reason = run_status(_run(0, 0, skipped=12), _output(12, 0, duplicate_rows=12), 0.5,
                                duplicated=(12, ["o/features/part-a.parquet", "o/features/part-a-copy.parquet"]))
    assert status == "failed" and "\n" not in reason
    assert reason.startswith("features/ holds 12 image id(s) more than once (12 extra feature row(s), in "
                             "o/features/part-a.parquet, o/features/part-a-copy.parquet)")
