"""No input kills or corrupts a run: the broken/odd corpus end to end, odd names, NaN/inf flags, TF error text.

The corpus (every format and mode the imaging layer decodes, EXIF-rotated, panorama, big photo, unicode,
spaces, names that are not UTF-8 or end in a space, and empty / truncated / random / text / bomb / missing /
broken-link / directory entries) runs through `delg-extract` on the FnApiRunner with the tiny preset, once
from a text + CSV manifest and once from a glob; every listed entry must end as exactly one row.
"""

import csv
import os

import numpy as np
import pytest

from beam_job import cli
from beam_job.config import ExtractionConfig, get_preset
from beam_job.pipeline.inputs import text_to_path
from beam_job.pipeline.options import JobConfig, JobConfigError, RunContext

from helpers import assert_every_entry_once, encode, failing_handler, pattern_image, read_rows, write_corpus

TINY = ["--preset", "tiny", "--no_progress"]
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("odd")
    good, path, expect = write_corpus(root)

    # Manifest run: half the entries in a plain-text manifest (raw bytes, CRLF and LF line ends), the other
    # half in a CSV written by the csv module (quoting where needed), plus a missing file and a directory.
    listed = [*sorted(expect), path[b"folder.jpg"], path[b"missing.jpg"]]
    text_part, csv_part = listed[::2], listed[1::2]
    with open(root / "list.txt", "wb") as fh:
        for i, p in enumerate(text_part):
            fh.write(os.fsencode(p) + (b"\r\n" if i % 2 else b"\n"))
    with open(root / "list.csv", "w", newline="", encoding="utf-8", errors="surrogateescape") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "image_id"])
        writer.writerows([p, ""] for p in csv_part)
    manifest_expect = dict(expect, **{path[b"folder.jpg"]: "read", path[b"missing.jpg"]: "read"})
    runs = {}
    for kind, args, expected in (
        ("manifest", ["--manifest", str(root / "list.txt"), "--manifest", str(root / "list.csv")], manifest_expect),
        ("glob", ["--input", str(root / "img" / "*")], expect),
    ):
        out = str(root / f"out-{kind}")
        code = cli.main([*args, "--output", out, *TINY])
        runs[kind] = {"code": code, "out": out, "expect": expected}
    return {"root": root, "path": path, "good": good, "runs": runs}


@pytest.mark.parametrize("kind", ["manifest", "glob"])
def test_odd_corpus_ends_with_exit_0_and_every_entry_exactly_once(corpus, kind):
    run = corpus["runs"][kind]
    assert run["code"] == 0
    assert_every_entry_once(run["out"], run["expect"])


def test_odd_names_and_sizes_come_out_right(corpus):
    out = corpus["runs"]["glob"]["out"]
    rows = {text_to_path(r["path"]): r for r in read_rows(os.path.join(out, "features")).to_pylist()}
    for name, (_, hw) in corpus["good"].items():
        row = rows[corpus["path"][name]]
        assert (row["original_height"], row["original_width"]) == hw, name
    not_utf8 = corpus["path"][b"caf\xe9 \xff.jpg"]
    assert rows[not_utf8]["path"].endswith("caf\\xe9 \\xff.jpg")  # the documented stored form
    assert rows[corpus["path"][b"trailing.jpg "]]["path"].endswith("/trailing.jpg ")
    assert rows[corpus["path"][b"panorama.jpg"]]["processed_width"] == 96
    failures = {text_to_path(r["path"]): r for r in read_rows(os.path.join(out, "failures")).to_pylist()}
    assert failures[corpus["path"][b"bomb 50000x50000.png"]]["error_type"] == "ImageTooLargeError"
    assert failures[corpus["path"][b"broken link.jpg"]]["error_type"] == "FileNotFoundError"
    manifest_failures = read_rows(os.path.join(corpus["runs"]["manifest"]["out"], "failures")).to_pylist()
    folder = next(r for r in manifest_failures if text_to_path(r["path"]) == corpus["path"][b"folder.jpg"])
    assert folder["error_type"] == "IsADirectoryError"
    assert "not a regular file" in failures[corpus["path"][b"pipe.jpg"]]["message"]


def test_failures_table_as_manifest_reaches_the_same_files(corpus):
    """The failures table (stored-form paths) fed back as a manifest: a repaired file whose name is not UTF-8
    gets its feature row under the same id and path; every other failure fails again under its own id."""
    first = corpus["runs"]["manifest"]["out"]
    before = read_rows(os.path.join(first, "failures")).to_pylist()
    repaired = corpus["path"][b"bad \xff\xfe.jpg"]
    with open(repaired, "wb") as fh:
        fh.write(corpus["good"][b"fmt.jpg"][0])
    out = str(corpus["root"] / "out-retry")
    code = cli.main(["--manifest", os.path.join(first, "failures", "*.parquet"), "--output", out, *TINY,
                     "--max_failure_ratio", "1"])
    assert code == 0
    features = read_rows(os.path.join(out, "features")).to_pylist()
    failures = read_rows(os.path.join(out, "failures")).to_pylist()
    repaired_row = next(r for r in before if text_to_path(r["path"]) == repaired)
    assert [(r["image_id"], r["path"]) for r in features] == [(repaired_row["image_id"], repaired_row["path"])]
    assert sorted((r["image_id"], r["path"]) for r in failures) == sorted(
        (r["image_id"], r["path"]) for r in before if r is not repaired_row)


# ----------------------------------------------------------------------------- float options

@pytest.mark.parametrize("flag,value", [
    ("--image_scales", "nan,1"), ("--image_scales", "inf,1"), ("--image_scales", "1,-inf"),
    ("--image_scales", "1e999"), ("--score_threshold", "nan"), ("--score_threshold", "inf"),
    ("--score_threshold", "-Infinity"), ("--max_failure_ratio", "nan"), ("--max_failure_ratio", "inf"),
    ("--progress_interval", "nan"), ("--progress_interval", "inf"), ("--progress_interval", "0"),
])
def test_float_flags_refuse_nan_and_infinities_before_any_work(tmp_path, capsys, flag, value):
    (tmp_path / "a.jpg").write_bytes(encode(pattern_image(), "JPEG"))
    out = tmp_path / "out"
    code = cli.main(["--input", str(tmp_path / "*.jpg"), "--output", str(out), *TINY, f"{flag}={value}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and flag in err[0] and repr(value) in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("field,value", [
    ("image_scales", (float("nan"), 1.0)), ("image_scales", (1.0, float("inf"))),
    ("score_threshold", float("nan")), ("score_threshold", float("-inf")),
])
def test_extraction_config_refuses_nan_and_infinities(field, value):
    with pytest.raises(ValueError, match=f"{field} must") as info:
        get_preset("tiny", **{field: value})
    assert "\n" not in str(info.value)
    assert get_preset("tiny", score_threshold=-1).score_threshold == -1.0  # finite values stay accepted
    with pytest.raises(ValueError, match="score_threshold"):
        ExtractionConfig.from_dict(dict(get_preset("tiny").to_dict(), score_threshold=float("nan")))


def test_job_config_refuses_a_nan_failure_ratio():
    with pytest.raises(JobConfigError, match="max_failure_ratio"):
        JobConfig(inputs=("x",), manifests=(), output="o", extraction=get_preset("tiny"),
                  max_failure_ratio=float("nan"))


# ----------------------------------------------------------------------------- inference failure text

def _tf_error(fn):
    try:
        fn()
    except Exception as exc:
        return exc
    raise AssertionError("no error")


def _graph_reshape():
    """A real TensorFlow graph-execution error (wrapped in 'Graph execution error: ... Detected at node')."""
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([None, None, 3], tf.uint8)])
    def reshape(x):
        return tf.reshape(x, [7, -1, 5])

    return reshape


class _RaisingModel:
    """A loaded model whose call raises the given error (the handler's side of a failing model call)."""

    def __init__(self, exc):
        self._exc = exc

    def identity(self):
        return "raising"

    def extract(self, prepared):
        raise self._exc


def test_a_failing_model_call_gives_the_first_line_of_the_errors_own_text():
    import tensorflow as tf

    from beam_job.pipeline.handler import DelgModelHandler, InferenceError
    from beam_job.pipeline.transforms import ImageTask

    handler = DelgModelHandler(get_preset("tiny"))

    def inference(exc):
        (result,) = handler.run_inference([ImageTask("id", "a.png")], _RaisingModel(exc))
        return result.inference

    eager = _tf_error(lambda: tf.reshape(tf.zeros([3]), [2]))
    # What Beam's with_exception_handling() dead letters would carry, (type, repr, traceback): a TensorFlow
    # error's repr() has no text, which is why the handler catches the model call's error itself.
    assert repr(eager) == "InvalidArgumentError()"
    assert inference(eager) == InferenceError("InvalidArgumentError", str(eager).splitlines()[0])
    assert "Input to reshape is a tensor with 3 values" in inference(eager).message
    graph = _tf_error(lambda: _graph_reshape()(np.zeros((4, 5, 3), np.uint8)))
    text = str(graph)
    assert text.startswith("Graph execution error:")
    expected = next(line for line in text.splitlines() if line.startswith("Input to reshape"))
    assert inference(graph) == InferenceError("InvalidArgumentError", expected)
    assert inference(ValueError("plain\nsecond")) == InferenceError("ValueError", "plain")
    assert inference(KeyError()) == InferenceError("KeyError", "")  # no text: failure_record shows the type name


def test_inference_failure_row_carries_the_tensorflow_error_line(tmp_path):
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.testing.util import assert_that, equal_to

    from beam_job.pipeline.transforms import ExtractFeatures

    def fail(prepared):  # image 'boom' goes through a TensorFlow op that fails at run time
        _graph_reshape()(prepared.image)

    good, boom = tmp_path / "a.png", tmp_path / "b.png"
    good.write_bytes(encode(pattern_image(), "PNG"))
    boom.write_bytes(encode(pattern_image(30, 36), "PNG"))
    from beam_job.imaging import decode_image, prepare_image

    prepared = prepare_image(decode_image(boom.read_bytes()), get_preset("tiny"))
    text = str(_tf_error(lambda: _graph_reshape()(prepared.image)))
    expected = next(line for line in text.splitlines() if line.startswith("Input to reshape"))
    job = JobConfig(inputs=(), manifests=(str(tmp_path / "unused.txt"),), output=str(tmp_path / "out"),
                    extraction=get_preset("tiny"))
    run = RunContext(model_identity="embedded:tiny", started_at="2026-12-03T00:00:00+00:00")
    with beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"])) as p:
        out = (p | beam.Create([("boom", str(boom)), ("fine", str(good))])
               | ExtractFeatures(job, run, failing_handler(job.extraction, (30, 36), fail)))
        failures = out["failures"] | "Fields" >> beam.Map(
            lambda e: (e[0]["image_id"], e[0]["stage"], e[0]["error_type"], e[0]["message"]))
        assert_that(failures, equal_to([("boom", "inference", "InvalidArgumentError", expected)]), label="Failures")
        ids = out["features"] | "Ids" >> beam.Map(lambda e: e[0]["image_id"])
        assert_that(ids, equal_to(["fine"]), label="Features")
