"""Pipeline wiring: `build_pipeline(p, job, run)` (pure wiring) and `run_pipeline(job, run, beam_args)` (options, run).

Step labels (as in the Dataflow UI):
  ListInputs -> [ExistingOutcomes] -> GroupById -> ResolveInputs -> SpreadWork (Reshuffle) ->
  ExtractFeatures/{ReadBytes, DecodeAndResize, RunInference, ToRows, MergeFailures} ->
  WriteFeatures/{ToTables, Commit}, WriteFailures/{ToTables, Commit} -> FinalizeRun
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from beam_job.layout import FAILURES, FEATURES, kind_dir, shard_glob
from beam_job.pipeline import METRICS_NAMESPACE
from beam_job.pipeline.inputs import ListInputs
from beam_job.pipeline.options import JobConfig, RunContext
from beam_job.pipeline.summary import FinalizeRunFn
from beam_job.pipeline.transforms import (
    DUPLICATE,
    FAILED,
    SKIPPED,
    ExpandShardsFn,
    ExtractFeatures,
    ReadOutcomeKeysFn,
    ResolveInputsFn,
)
from beam_job.pipeline.writer import WriteShards

_LOGGER = logging.getLogger(__name__)

DEFAULT_LOCAL_RUNNER = "FnApiRunner"
LOCAL_RUNNERS = {"fnapirunner", "directrunner", "switchingdirectrunner", "bundlebaseddirectrunner", "prismrunner"}


class ExistingOutcomes(beam.PTransform):
    """(image_id, (kind, path)) for each input that already has its kept outcome row under the output: every
    feature row, and every DuplicateImageIdError failure row (resume.read_outcome_keys; reads the id and path
    columns, and error_type of failure shards)."""

    def __init__(self, output: str):
        super().__init__()
        self._globs = [(shard_glob(kind_dir(output, kind)), kind) for kind in (FEATURES, FAILURES)]

    def expand(self, pbegin):
        return (
            pbegin
            | "ShardPatterns" >> beam.Create(self._globs, reshuffle=False)
            | "ListShards" >> beam.ParDo(ExpandShardsFn())
            | "SpreadShards" >> beam.Reshuffle()
            | "ReadKeys" >> beam.ParDo(ReadOutcomeKeysFn())
        )


def build_pipeline(p: beam.Pipeline, job: JobConfig, run: RunContext) -> dict[str, beam.PCollection]:
    """Wire the whole job into `p`. Returns the main PCollections (for tests and extensions):
    "inputs" (image_id, path), "features" and "failures" (record, timings), "files" ({kind: committed
    shard paths}), "summary" (one summary dict, after all shards are committed).
    """
    listed = p | "ListInputs" >> ListInputs(job.inputs, job.manifests)
    if job.skip_existing:
        done = p | "ExistingOutcomes" >> ExistingOutcomes(job.output)
    else:
        done = p | "NoExistingOutcomes" >> beam.Create([])
    resolved = (
        {"input": listed, "done": done}
        | "GroupById" >> beam.CoGroupByKey()
        | "ResolveInputs" >> beam.ParDo(ResolveInputsFn(job, run)).with_outputs(FAILED, SKIPPED, DUPLICATE, main="todo")
    )
    work = resolved.todo | "SpreadWork" >> beam.Reshuffle()
    extracted = work | "ExtractFeatures" >> ExtractFeatures(job, run)
    failures = (extracted["failures"], resolved[FAILED]) | "AllFailures" >> beam.Flatten()
    written = {FEATURES: extracted["features"] | "WriteFeatures" >> WriteShards(FEATURES, job, run),
               FAILURES: failures | "WriteFailures" >> WriteShards(FAILURES, job, run)}
    stats = (written[FEATURES]["stats"], written[FAILURES]["stats"]) | "AllStats" >> beam.Flatten()
    counts = {
        "listed": listed | "CountListed" >> beam.combiners.Count.Globally(),
        "skipped": resolved[SKIPPED] | "CountSkipped" >> beam.combiners.Count.PerElement(),
        "duplicates": resolved[DUPLICATE] | "CountDuplicates" >> beam.combiners.Count.Globally(),
    }
    # Runs once, after both sinks committed: every input of FinalizeRun is a side input.
    summary = (
        p
        | "FinalizeTrigger" >> beam.Create([None], reshuffle=False)
        | "FinalizeRun" >> beam.ParDo(
            FinalizeRunFn(job, run),
            infos=beam.pvalue.AsList(stats),
            listed=beam.pvalue.AsSingleton(counts["listed"]),
            skipped=beam.pvalue.AsDict(counts["skipped"]),
            duplicates=beam.pvalue.AsSingleton(counts["duplicates"]),
            features_committed=beam.pvalue.AsList(written[FEATURES]["files"]),
            failures_committed=beam.pvalue.AsList(written[FAILURES]["files"]),
        )
    )
    return {"inputs": listed, "features": extracted["features"], "failures": failures,
            "files": {kind: w["files"] for kind, w in written.items()}, "summary": summary}


def with_default_runner(beam_args: Sequence[str]) -> list[str]:
    """Beam args with --runner=FnApiRunner added when no runner is given (DirectRunner would try to
    download the Prism binary first, which stalls or fails offline)."""
    args = list(beam_args)
    if not any(a == "--runner" or a.startswith("--runner=") for a in args):
        args.append(f"--runner={DEFAULT_LOCAL_RUNNER}")
    return args


def runner_name(options: PipelineOptions) -> str:
    runner = options.view_as(StandardOptions).runner
    if runner is None:
        return DEFAULT_LOCAL_RUNNER
    return runner if isinstance(runner, str) else type(runner).__name__


def is_local_runner(options: PipelineOptions) -> bool:
    return runner_name(options).lower() in LOCAL_RUNNERS


def _metric_value(result):
    """(value, "committed" | "attempted") of one MetricResult: the committed value where the runner reports one,
    else the attempted value (portable runners such as Flink's may report attempted values only; an attempted
    value also counts work of retried bundles)."""
    try:
        committed = result.committed
    except Exception:  # some runners raise instead of returning None for an unsupported committed value
        committed = None
    if committed is not None:
        return committed, "committed"
    return result.attempted, "attempted"


def metrics_report(result) -> list[str]:
    """Human-readable lines of the job's counters and distributions (namespaces delg and RunInference); a value
    the runner reports as attempted only is marked "(attempted)"."""
    lines: list[str] = []
    try:
        metrics = result.metrics().query()
    except Exception:  # some runners have no metrics API
        return ["(metrics unavailable on this runner)"]
    counters: dict[str, list] = {}
    for c in metrics.get("counters", []):
        if c.key.metric.namespace in (METRICS_NAMESPACE, "RunInference"):
            name = f"{c.key.metric.namespace}/{c.key.metric.name}"
            value, kind = _metric_value(c)
            cur = counters.setdefault(name, [0, set()])
            cur[0] += int(value or 0)
            cur[1].add(kind)
    for name in sorted(counters):
        lines.append(f"counter {name} = {counters[name][0]}{_kind_note(counters[name][1])}")
    dists: dict[str, list] = {}
    for d in metrics.get("distributions", []):
        value, kind = _metric_value(d)
        if d.key.metric.namespace in (METRICS_NAMESPACE, "RunInference") and value is not None:
            name = f"{d.key.metric.namespace}/{d.key.metric.name}"
            cur = dists.setdefault(name, [0, 0, None, None, set()])
            cur[0] += value.count
            cur[1] += value.sum
            cur[2] = value.min if cur[2] is None else min(cur[2], value.min)
            cur[3] = value.max if cur[3] is None else max(cur[3], value.max)
            cur[4].add(kind)
    for name in sorted(dists):
        count, total, lo, hi, kinds = dists[name]
        mean = total / count if count else 0.0
        lines.append(f"distribution {name}: count={count} mean={mean:.1f} min={lo} max={hi}{_kind_note(kinds)}")
    return lines


def _kind_note(kinds) -> str:
    return " (attempted)" if "attempted" in kinds else ""


def counter_value(result, name: str, namespace: str = METRICS_NAMESPACE) -> int:
    """Sum of a counter over all steps (0 when absent): committed values, attempted ones where the runner
    reports no committed value."""
    from apache_beam.metrics.metric import MetricsFilter

    found = result.metrics().query(MetricsFilter().with_namespace(namespace).with_name(name))["counters"]
    return int(sum(_metric_value(c)[0] or 0 for c in found))


def run_pipeline(job: JobConfig, run: RunContext, beam_args: Sequence[str],
                 test_pipeline: beam.Pipeline | None = None, on_submit: Callable[[Any], None] | None = None):
    """Build and run the job; blocks until it finishes and returns the PipelineResult.

    on_submit: called with the PipelineResult as soon as the runner returns one, before the wait (a remote
    runner's job can then be cancelled while the launcher waits; the local runners return it at the end).
    """
    if test_pipeline is not None:
        p = test_pipeline
    else:
        p = beam.Pipeline(options=PipelineOptions(with_default_runner(beam_args)))
    build_pipeline(p, job, run)
    result = p.run()
    if on_submit is not None:
        on_submit(result)
    result.wait_until_finish()
    return result
