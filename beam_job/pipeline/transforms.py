"""The job's steps as DoFns and composite PTransforms: resolve inputs, read, decode + resize, infer, rows.

Every per-image step sends a failure record (stage, error type, message) to a tagged dead-letter output
instead of raising, so that every listed path ends as exactly one row: a feature row or a failure row.
Elements between steps are (image_id, ImageTask); failure and feature outputs are (record, timings_ms).
"""

from __future__ import annotations

import time

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference

from beam_job import storage
from beam_job.layout import FAILURES, FEATURES
from beam_job.pipeline import METRICS_NAMESPACE, progress
from beam_job.pipeline.handler import DelgModelHandler, InferenceError
from beam_job.pipeline.inputs import check_regular_file, text_to_path
from beam_job.pipeline.options import JobConfig, RunContext
from beam_job.pipeline.rows import failure_record, feature_record

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

    __slots__ = ("data", "image_id", "path", "prepared", "timings")

    def __init__(self, image_id: str, path: str, data: bytes | None = None, prepared=None,
                 timings: dict[str, float] | None = None):
        self.image_id = image_id
        self.path = path
        self.data = data
        self.prepared = prepared
        self.timings: dict[str, float] = dict(timings or {})

    def with_stage(self, stage: str, ms: float, **changes) -> ImageTask:
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


def _failure_row(job: JobConfig, run: RunContext, image_id: str, path: str, stage: str, error_type: str, message: str,
                 timings: dict[str, float]):
    Metrics.counter(METRICS_NAMESPACE, f"failures_{stage}").inc()
    record = failure_record(image_id, path, stage, error_type, _valid_text(message),
                            model=run.model_identity, preset=job.extraction.name)
    return beam.pvalue.TaggedOutput(FAILED, (record, dict(timings)))


def _failure(job: JobConfig, run: RunContext, image_id: str, path: str, stage: str, exc: BaseException,
             timings: dict[str, float]):
    return _failure_row(job, run, image_id, path, stage, type(exc).__name__, str(exc) or repr(exc), timings)


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

    def __init__(self, job: JobConfig, run: RunContext):
        self._job = job
        self._run = run

    def setup(self):
        self._progress = progress.ProgressReporter(self._run.progress_dir)
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
                yield _failure(self._job, self._run, image_id, path, "read", exc, {})

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

    def __init__(self, job: JobConfig, run: RunContext):
        self._job = job
        self._run = run

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
        except Exception as exc:
            timings = {"read": (time.perf_counter() - t0) * 1000.0}
            yield _failure(self._job, self._run, image_id, path, "read", exc, timings)
            return
        ms = (time.perf_counter() - t0) * 1000.0
        self._read_ms.update(int(round(ms)))
        self._bytes.update(len(data))
        self._count.inc()
        yield image_id, ImageTask(image_id, path, data=data, timings={"read": ms})


class DecodeAndResizeFn(beam.DoFn):
    """(image_id, ImageTask) -> same with .prepared (imaging.PreparedImage); failures at "decode"/"preprocess"."""

    def __init__(self, job: JobConfig, run: RunContext):
        self._job = job
        self._run = run

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
        except Exception as exc:
            stage = getattr(exc, "stage", stage) if stage == "decode" else stage
            timings = {**task.timings, "decode": (time.perf_counter() - t0) * 1000.0}
            yield _failure(self._job, self._run, image_id, task.path, stage, exc, timings)
            return
        ms = (time.perf_counter() - t0) * 1000.0
        self._decode_ms.update(int(round(ms)))
        self._count.inc()
        yield image_id, task.with_stage("decode", ms, data=None, prepared=prepared)


class ToRowsFn(beam.DoFn):
    """(image_id, PredictionResult) -> (feature record, timings); failures at stages "inference" (the model call
    raised: the handler's InferenceError) and "postprocess"."""

    def __init__(self, job: JobConfig, run: RunContext):
        self._job = job
        self._run = run

    def setup(self):
        self._keypoints = Metrics.distribution(METRICS_NAMESPACE, "keypoints_per_image")
        self._count = Metrics.counter(METRICS_NAMESPACE, "images_extracted")

    def process(self, element):
        image_id, result = element
        task = result.example
        if isinstance(result.inference, InferenceError):
            error = result.inference
            yield _failure_row(self._job, self._run, image_id, task.path, "inference", error.error_type,
                               error.message, task.timings)
            return
        features, identity, infer_ms = result.inference
        timings = {**task.timings, "inference": infer_ms}
        t0 = time.perf_counter()
        try:
            record = feature_record(image_id, task.path, features, model=identity, preset=self._job.extraction.name,
                                    descriptor_dtype=self._job.descriptor_dtype)
        except Exception as exc:
            yield _failure(self._job, self._run, image_id, task.path, "postprocess", exc, timings)
            return
        timings["postprocess"] = (time.perf_counter() - t0) * 1000.0
        self._keypoints.update(int(record["num_features"]))
        self._count.inc()
        yield record, timings


class ExtractFeatures(beam.PTransform):
    """(image_id, path) -> {"features": (record, timings), "failures": (record, timings)}.

    Steps (labels as shown in the Dataflow UI): ReadBytes, DecodeAndResize, RunInference, ToRows.
    """

    def __init__(self, job: JobConfig, run: RunContext, model_handler: DelgModelHandler | None = None):
        """model_handler: the unkeyed handler to use (default: DelgModelHandler for job.extraction)."""
        super().__init__()
        self._job = job
        self._run = run
        self._handler = model_handler or DelgModelHandler(
            job.extraction, share_across_processes=job.share_model_across_processes)

    def expand(self, pairs):
        job = self._job
        read = pairs | "ReadBytes" >> beam.ParDo(ReadBytesFn(job, self._run)).with_outputs(FAILED, main="ok")
        decode = DecodeAndResizeFn(job, self._run)
        decoded = read.ok | "DecodeAndResize" >> beam.ParDo(decode).with_outputs(FAILED, main="ok")
        predictions = decoded.ok | "RunInference" >> RunInference(KeyedModelHandler(self._handler))
        rows = predictions | "ToRows" >> beam.ParDo(ToRowsFn(job, self._run)).with_outputs(FAILED, main="ok")
        failures = (read[FAILED], decoded[FAILED], rows[FAILED]) | "MergeFailures" >> beam.Flatten()
        return {"features": rows.ok, "failures": failures}
