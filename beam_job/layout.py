"""The output's layout: every path and prefix under `<output>`, defined here and nowhere else.

```
<output>/
  features/part-<run_id>-SSSSS-of-NNNNN.parquet   feature rows (one per image)
  failures/part-<run_id>-SSSSS-of-NNNNN.parquet   failure rows, append-only per run
  features/beam-temp-part-<run_id>-<uuid>/        Beam's temp files while a run writes (also under failures/)
  runs/<run_id>/summary.json                      the run's summary
  runs/<run_id>/report.html                       the run as an offline page
  _SUCCESS                                        written last, when the run succeeded
  _output.json                                    the output's identity (model, settings, fingerprint)
  _claim.json                                     present while a run owns the output
  _tmp/                                           temp shards of earlier versions of the job (only ever removed)
```

The job (`beam_job.pipeline`), the report (`beam_job.report`) and retrieval (`beam_job.retrieval`) all name
these paths through this module; it imports nothing but `beam_job.storage` (for `join`), so none of them
needs the pipeline package to find the output's files.

Who may delete what (nothing else under `<output>` deletes anything; docs/pipeline.md, "Output layout"):

* shards (`features/*.parquet`, `failures/*.parquet`): only `pipeline.resume.clear_outputs`, called by the
  launcher (`launch.Launch.__enter__`) for `--overwrite`, while it holds the claim and once every check passed.
  Otherwise shards are never deleted: `failures/` is append-only across runs.
* Beam's temp folders (`<kind>/beam-temp-*`) and the legacy `_tmp/`: Beam's own finalize removes its run's
  temp folder; `pipeline.resume.remove_temp_files` removes every leftover (of failed attempts and killed
  runs), called by `FinalizeRun` (`pipeline.summary.finalize_run`, after the commit) and by `clear_outputs`,
  both while the run holds the claim; the launcher (`launch.Launch`) removes its own run's temp folders
  (`is_run_temp`) when the run failed, was stopped by a signal or lost its claim.
* `_SUCCESS`: `pipeline.summary.finalize_run` writes it when the run succeeded and deletes it when the run
  failed; the launcher (`launch.Launch.run`) deletes it when the pipeline raised; `clear_outputs` deletes it.
* `_output.json`: only `clear_outputs` deletes it (the launcher writes it, through `pipeline.resume`).
* `_claim.json`: only `pipeline.claim.release` deletes it, called by the launcher at the end of every run
  (and when a check refuses the run after the claim was taken), only while the claim is still this run's
  (`--take_over_claim` replaces a crashed run's claim, never deletes it).
* `runs/<run_id>/`: never deleted by the job, not even by `--overwrite`.
"""

from __future__ import annotations

from beam_job.storage import join

FEATURES = "features"  # a kind of row, and the folder its shards go to
FAILURES = "failures"
KINDS = (FEATURES, FAILURES)
RUNS_DIR = "runs"
SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.html"
SUCCESS_FILE = "_SUCCESS"
OUTPUT_FILE = "_output.json"
CLAIM_FILE = "_claim.json"
SHARD_SUFFIX = ".parquet"
TEMP_DIR_PREFIX = "beam-temp-"  # Beam's FileBasedSink temp folders, beside the final shards of a kind
LEGACY_TMP_DIR = "_tmp"  # temp shards of earlier versions of the job


def kind_dir(output: str, kind: str) -> str:
    """`<output>/features` or `<output>/failures`."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind of shard {kind!r}: one of {KINDS}")
    return join(output, kind)


def features_dir(output: str) -> str:
    return kind_dir(output, FEATURES)


def failures_dir(output: str) -> str:
    return kind_dir(output, FAILURES)


def shard_glob(directory: str) -> str:
    """Every final shard in a folder of shards (never Beam's temp files, which sit in subfolders)."""
    return join(directory, "*" + SHARD_SUFFIX)


def shard_name_prefix(run_id: str) -> str:
    """A run's shards are named `<this>-SSSSS-of-NNNNN.parquet` (Beam adds the numbering and the suffix)."""
    return f"part-{run_id}"


def shard_prefix(output: str, kind: str, run_id: str) -> str:
    """The file path prefix handed to Beam's sink for a run's shards of a kind."""
    return join(kind_dir(output, kind), shard_name_prefix(run_id))


def run_shards_glob(output: str, kind: str, run_id: str) -> str:
    """A run's committed shards of a kind, by name."""
    return shard_prefix(output, kind, run_id) + "-*-of-*" + SHARD_SUFFIX


def is_run_shard(name: str, run_id: str) -> bool:
    """Whether a shard's file name (no folder) is one of the run's."""
    return name.startswith(shard_name_prefix(run_id) + "-")


def is_run_temp(path: str, run_id: str) -> bool:
    """Whether a temp path (a `beam-temp-part-<run_id>-<uuid>` folder or a file in one) is the run's."""
    return f"/{TEMP_DIR_PREFIX}{shard_name_prefix(run_id)}-" in path


def temp_dir_globs(output: str) -> tuple[str, ...]:
    """Patterns matching every temp file under the output (object stores: temp folders are name prefixes)."""
    kinds = tuple(join(kind_dir(output, kind), TEMP_DIR_PREFIX + "**") for kind in KINDS)
    return (*kinds, join(legacy_tmp_dir(output), "**"))


def legacy_tmp_dir(output: str) -> str:
    return join(output, LEGACY_TMP_DIR)


def runs_dir(output: str) -> str:
    return join(output, RUNS_DIR)


def run_dir(output: str, run_id: str) -> str:
    return join(runs_dir(output), run_id)


def summary_path(output: str, run_id: str) -> str:
    return join(run_dir(output, run_id), SUMMARY_FILE)


def summaries_glob(output: str) -> str:
    """Every run's summary: `<output>/runs/*/summary.json`."""
    return join(runs_dir(output), "*", SUMMARY_FILE)


def report_path(output: str, run_id: str) -> str:
    return join(run_dir(output, run_id), REPORT_FILE)


def success_path(output: str) -> str:
    return join(output, SUCCESS_FILE)


def identity_path(output: str) -> str:
    return join(output, OUTPUT_FILE)


def claim_path(output: str) -> str:
    return join(output, CLAIM_FILE)
