"""The job's steps as DoFns and composite PTransforms: resolve inputs, read, decode + resize, infer, rows.

Every per-image step sends a failure record (stage, error type, message) to a tagged dead-letter output
instead of raising, so that every listed path ends as exactly one row: a feature row or a failure row.
Elements between steps are (image_id, ImageTask); failure and feature outputs are (record, timings_ms).
"""

from __future__ import annotations

import ast
import logging
import re
import time
from typing import Dict, Optional, Sequence

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference

from beam_job import storage
from beam_job.layout import FAILURES, FEATURES
from beam_job.pipeline import METRICS_NAMESPACE
from beam_job.pipeline import progress
from beam_job.pipeline.handler import DelgModelHandler
from beam_job.pipeline.inputs import check_regular_file, text_to_path
from beam_job.pipeline.options import JobConfig
from beam_job.pipeline.rows import failure_record, feature_record

_LOGGER = logging.getLogger(__name__)
FAILED = "failed"
SKIPPED = "skipped"
DUPLICATE = "duplicate"


class ImageTask:
    """One image on its way through the job. A value: each step emits a new one (`with_stage`), never
    changing one it has received or emitted (a runner may still hold it, e.g. to retry or to fuse).

    data:     encoded file bytes (after read; dropped after decode).
    prepared: imaging.PreparedImage (after decode + resize).
    timings:  milliseconds per stage so far ("read", "decode", "inference", "postprocess").
    """

    __slots__ = ("image_id", "path", "data", "prepared", "timings")

    def __init__(self, image_id: str, path: str, data: Optional[bytes] = None, prepared=None,
                 timings: Optional[Dict[str, float]] = None):
        self.image_id = image_id
        self.path = path
        self.data = data
        self.prepared = prepared
        self.timings: Dict[str, float] = dict(timings or {})

    def with_stage(self, stage: str, ms: float, **changes) -> "ImageTask":
        """A new task with `stage` timed at `ms` and some of data / prepared replaced."""
        fields = {"data": self.data, "prepared": self.prepared, **changes}
        return ImageTask(self.image_id, self.path, fields["data"], fields["prepared"], {**self.timings, stage: ms})

    def __getstate__(self):
        return (self.image_id, self.path, self.data, self.prepared, self.timings)

    def __setstate__(self, state):
        self.image_id, self.path, self.data, self.prepared, self.timings = state


class FileTooLargeError(OSError):
    """The file is larger than --max_file_bytes."""


class DuplicateImageIdError(ValueError):
    """Two different paths were listed with the same image_id."""


def _valid_text(text: str) -> str:
    """Text that Parquet can store: a character that is not valid UTF-8 (a surrogate) as a \\u escape."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _failure(job: JobConfig, image_id: str, path: str, stage: str, exc: BaseException, timings: Dict[str, float]):
    Metrics.counter(METRICS_NAMESPACE, f"failures_{stage}").inc()
    record = failure_record(image_id, path, stage, type(exc).__name__, _valid_text(str(exc) or repr(exc)),
                            model=job.model_identity, preset=job.extraction.name)
    return beam.pvalue.TaggedOutput(FAILED, (record, dict(timings)))


def _message_from_repr(type_name: str, text: str) -> str:
    """'ValueError("bad input")' -> 'bad input' (Beam's dead letters carry repr(exception))."""
    prefix = type_name + "("
    if text.startswith(prefix) and text.endswith(")"):
        inner = text[len(prefix):-1]
        try:
            value = ast.literal_eval(inner)
            if isinstance(value, str):
                return value
        except (ValueError, SyntaxError):
            pass
        return inner
    return text


# Lines of TensorFlow's wrapper text around an op's own error ("Graph execution error:", "Detected at node
# ... (most recent call last):" followed by indented stack lines, "N root error(s) found.").
_TF_WRAPPER_LINE = re.compile(r"^(Graph execution error:|Detected at node .*|<stack traces unavailable>|"
                              r"\d+ root error\(s\) found\.?)$")


def first_error_line(text: str) -> str:
    r"""The first line of an error text that says what went wrong, without TensorFlow's wrapper lines.

    'Graph execution error:\n\nDetected at node X defined at (most recent call last):\n  File ...\n
    input depth must be ...\n\t [[{{node X}}]]' -> 'input depth must be ...'. Plain one-line texts are
    returned as they are.
    """
    lines = [line for line in text.splitlines() if line.strip()]
    in_stack = False
    for line in lines:
        if _TF_WRAPPER_LINE.match(line.strip()):
            in_stack = line.startswith("Detected at node")
            continue
        if in_stack and line[:1].isspace():
            continue  # a stack line under "Detected at node ..."
        return line.strip()
    return lines[0].strip() if lines else ""


def exception_text(exc_type: type, exc_repr: str, formatted_traceback: Optional[Sequence[str]]) -> str:
    """The exception's own text from a Beam dead letter (exc_type, repr(exc), traceback.format_exception lines).

    repr() of a TensorFlow error is 'InvalidArgumentError()' (its text lives in __str__), so the text is
    taken from the formatted traceback, whose exception line is '<module>.<Type>: <str(exc)>' (the last such
    block: a chained exception's causes come first); repr() is the fallback.
    """
    name = getattr(exc_type, "__qualname__", str(exc_type))
    module = getattr(exc_type, "__module__", None)
    shown = name if module in (None, "builtins", "__main__") else f"{module}.{name}"
    for block in reversed(list(formatted_traceback or [])):
        if block.startswith(shown + ": "):
            return block[len(shown) + 2:]
        if block.rstrip("\n") == shown:
            break  # raised with an empty text
    return _message_from_repr(getattr(exc_type, "__name__", name), exc_repr)


class ResolveInputsFn(beam.DoFn):
    """(image_id, {"input": [paths], "done": [(kind, path)]}) -> (image_id, path) to process.

    "done" holds what the output already records for the id (resume, `resume.read_outcome_keys`): paths with a
    feature row, and paths with a DuplicateImageIdError failure row. Identical listings of a path collapse into
    one. Of the distinct paths, one is the id's own: the path that has its feature row, else the first in sorted
    order that is not recorded as a duplicate. The others are duplicates and get a DuplicateImageIdError
    failure row, unless they have one already. A path is skipped (tag SKIPPED, with the kind of its recorded
    row) only when its own (image_id, path) has an outcome row, never for its id alone: each listed path keeps
    exactly one outcome row, whatever a killed run committed.
    """

    def __init__(self, job: JobConfig):
        self._job = job

    def setup(self):
        self._progress = progress.ProgressReporter(self._job.progress_dir)
        self._skipped = Metrics.counter(METRICS_NAMESPACE, "skipped_existing")
        self._dups = Metrics.counter(METRICS_NAMESPACE, "duplicate_inputs")

    def process(self, element):
        image_id, groups = element
        paths = list(groups["input"])
        if not paths:
            return
        distinct = sorted(set(paths))
        for _ in range(len(paths) - len(distinct)):
            self._dups.inc()
            yield beam.pvalue.TaggedOutput(DUPLICATE, image_id)
        done = list(groups["done"])
        featured = sorted({path for kind, path in done if kind == FEATURES})
        recorded = {path for kind, path in done if kind != FEATURES}
        own = featured[0] if featured else next((p for p in distinct if p not in recorded), distinct[0])
        for path in distinct:
            skipped = FEATURES if path in featured else FAILURES if path in recorded and path != own else None
            if skipped:
                self._skipped.inc()
                self._progress.add("skipped", 1)
                yield beam.pvalue.TaggedOutput(SKIPPED, skipped)
            elif path == own:
                yield image_id, path
            else:
                held = "is also listed for" if own in distinct else "already has its feature row, for"
                exc = DuplicateImageIdError(f"image_id {image_id} {held} {own}: give each path its own id")
                yield _failure(self._job, image_id, path, "read", exc, {})

    def finish_bundle(self):
        self._progress.flush()


class ReadOutcomeKeysFn(beam.DoFn):
    """(shard path, kind) -> (image_id, (kind, path)) for each input the shard gives a kept outcome
    (`resume.read_outcome_keys`: reads the id and path columns only; a damaged shard fails naming itself)."""

    def process(self, element):
        from beam_job.pipeline.resume import read_outcome_keys

        shard, kind = element
        for image_id, path in read_outcome_keys(shard, kind):
            yield image_id, (kind, path)


class ExpandShardsFn(beam.DoFn):
    """(glob, kind) -> (shard path, kind) for each shard the glob matches."""

    def process(self, element):
        pattern, kind = element
        for path in storage.match(pattern):
            yield path, kind


class ReadBytesFn(beam.DoFn):
    """(image_id, path) -> (image_id, ImageTask with .data); failures at stage "read"."""

    def __init__(self, job: JobConfig):
        self._job = job

    def setup(self):
        self._read_ms = Metrics.distribution(METRICS_NAMESPACE, "read_ms")
        self._bytes = Metrics.distribution(METRICS_NAMESPACE, "image_file_bytes")
        self._count = Metrics.counter(METRICS_NAMESPACE, "images_read")

    def process(self, element):
        image_id, path = element
        t0 = time.perf_counter()
        try:
            limit = self._job.max_file_bytes
            real_path = text_to_path(path)
            check_regular_file(real_path)
            with storage.open_read(real_path) as fh:
                data = fh.read(limit + 1)
            if len(data) > limit:
                raise FileTooLargeError(f"file is larger than --max_file_bytes={limit}")
        except Exception as exc:  # noqa: BLE001 - every failure becomes a failure row
            yield _failure(self._job, image_id, path, "read", exc, {"read": (time.perf_counter() - t0) * 1000.0})
            return
        ms = (time.perf_counter() - t0) * 1000.0
        self._read_ms.update(int(round(ms)))
        self._bytes.update(len(data))
        self._count.inc()
        yield image_id, ImageTask(image_id, path, data=data, timings={"read": ms})


class DecodeAndResizeFn(beam.DoFn):
    """(image_id, ImageTask) -> same with .prepared (imaging.PreparedImage); failures at "decode"/"preprocess"."""

    def __init__(self, job: JobConfig):
        self._job = job

    def setup(self):
        self._decode_ms = Metrics.distribution(METRICS_NAMESPACE, "decode_ms")
        self._count = Metrics.counter(METRICS_NAMESPACE, "images_decoded")

    def process(self, element):
        from beam_job.imaging import decode_image, prepare_image

        image_id, task = element
        cfg = self._job.extraction
        t0 = time.perf_counter()
        stage = "decode"
        try:
            image = decode_image(task.data, apply_exif_orientation=cfg.apply_exif_orientation,
                                 max_pixels=cfg.max_image_pixels)
            stage = "preprocess"
            prepared = prepare_image(image, cfg)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a failure row
            stage = getattr(exc, "stage", stage) if stage == "decode" else stage
            timings = {**task.timings, "decode": (time.perf_counter() - t0) * 1000.0}
            yield _failure(self._job, image_id, task.path, stage, exc, timings)
            return
        ms = (time.perf_counter() - t0) * 1000.0
        self._decode_ms.update(int(round(ms)))
        self._count.inc()
        yield image_id, task.with_stage("decode", ms, data=None, prepared=prepared)


class ToRowsFn(beam.DoFn):
    """(image_id, PredictionResult) -> (feature record, timings); failures at stage "postprocess"."""

    def __init__(self, job: JobConfig):
        self._job = job

    def setup(self):
        self._keypoints = Metrics.distribution(METRICS_NAMESPACE, "keypoints_per_image")
        self._count = Metrics.counter(METRICS_NAMESPACE, "images_extracted")

    def process(self, element):
        image_id, result = element
        task = result.example
        features, identity, infer_ms = result.inference
        timings = {**task.timings, "inference": infer_ms}
        t0 = time.perf_counter()
        try:
            record = feature_record(image_id, task.path, features, model=identity, preset=self._job.extraction.name,
                                    descriptor_dtype=self._job.descriptor_dtype)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a failure row
            yield _failure(self._job, image_id, task.path, "postprocess", exc, timings)
            return
        timings["postprocess"] = (time.perf_counter() - t0) * 1000.0
        self._keypoints.update(int(record["num_features"]))
        self._count.inc()
        yield record, timings


class InferenceFailuresFn(beam.DoFn):
    """RunInference dead letters (batch, (exc_type, repr, traceback)) -> failure records at "inference".

    The message is the first line of the error's own text (for TensorFlow errors, the op's message); the
    whole traceback goes to the worker log.
    """

    def __init__(self, job: JobConfig):
        self._job = job

    def process(self, element):
        batch, (exc_type, exc_repr, formatted_traceback) = element
        name = getattr(exc_type, "__name__", str(exc_type))
        message = _valid_text(first_error_line(exception_text(exc_type, exc_repr, formatted_traceback)))
        _LOGGER.warning("inference failed for %d image(s): %s", len(batch), "".join(formatted_traceback or [])[-4000:])
        Metrics.counter(METRICS_NAMESPACE, "failures_inference").inc(len(batch))
        for image_id, task in batch:
            record = failure_record(image_id, task.path, "inference", name, message,
                                    model=self._job.model_identity, preset=self._job.extraction.name)
            yield record, dict(task.timings)


class ExtractFeatures(beam.PTransform):
    """(image_id, path) -> {"features": (record, timings), "failures": (record, timings)}.

    Steps (labels as shown in the Dataflow UI): ReadBytes, DecodeAndResize, RunInference, ToRows,
    InferenceFailures.
    """

    def __init__(self, job: JobConfig, model_handler: Optional[DelgModelHandler] = None):
        """model_handler: the unkeyed handler to use (default: DelgModelHandler for job.extraction)."""
        super().__init__()
        self._job = job
        self._handler = model_handler or DelgModelHandler(
            job.extraction, share_across_processes=job.share_model_across_processes)

    def expand(self, pairs):
        job = self._job
        read = pairs | "ReadBytes" >> beam.ParDo(ReadBytesFn(job)).with_outputs(FAILED, main="ok")
        decoded = read.ok | "DecodeAndResize" >> beam.ParDo(DecodeAndResizeFn(job)).with_outputs(FAILED, main="ok")
        handler = KeyedModelHandler(self._handler)
        predictions, dlq = (decoded.ok
                            | "RunInference" >> RunInference(handler).with_exception_handling())
        rows = predictions | "ToRows" >> beam.ParDo(ToRowsFn(job)).with_outputs(FAILED, main="ok")
        inference_failures = dlq.failed_inferences | "InferenceFailures" >> beam.ParDo(InferenceFailuresFn(job))
        failures = (
            (read[FAILED], decoded[FAILED], inference_failures, rows[FAILED])
            | "MergeFailures" >> beam.Flatten()
        )
        return {"features": rows.ok, "failures": failures}
