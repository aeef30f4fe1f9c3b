"""The output's layout (beam_job/layout.py): the names under <output> that readers of old outputs rely on."""

import pytest

from beam_job import layout


@pytest.mark.parametrize("output", ["out", "out/", "gs://bucket/out", "gs://bucket/out/"])
def test_every_path_under_the_output(output):
    root = output.rstrip("/")
    assert layout.features_dir(output) == f"{root}/features"
    assert layout.failures_dir(output) == f"{root}/failures"
    assert layout.shard_glob(layout.features_dir(output)) == f"{root}/features/*.parquet"
    assert layout.shard_prefix(output, layout.FAILURES, "r1") == f"{root}/failures/part-r1"
    assert layout.run_shards_glob(output, layout.FEATURES, "r1") == f"{root}/features/part-r1-*-of-*.parquet"
    assert layout.runs_dir(output) == f"{root}/runs"
    assert layout.run_dir(output, "r1") == f"{root}/runs/r1"
    assert layout.summary_path(output, "r1") == f"{root}/runs/r1/summary.json"
    assert layout.summaries_glob(output) == f"{root}/runs/*/summary.json"
    assert layout.report_path(output, "r1") == f"{root}/runs/r1/report.html"
    assert layout.success_path(output) == f"{root}/_SUCCESS"
    assert layout.identity_path(output) == f"{root}/_output.json"
    assert layout.claim_path(output) == f"{root}/_claim.json"
    assert layout.legacy_tmp_dir(output) == f"{root}/_tmp"
    assert layout.temp_dir_globs(output) == (f"{root}/features/beam-temp-**", f"{root}/failures/beam-temp-**",
                                             f"{root}/_tmp/**")


def test_run_shards_are_told_apart_by_name():
    assert layout.is_run_shard("part-r1-00000-of-00002.parquet", "r1")
    assert not layout.is_run_shard("part-r10-00000-of-00001.parquet", "r1")
    assert not layout.is_run_shard("beam-temp-part-r1-abc", "r1")


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown kind"):
        layout.kind_dir("out", "stats")


def test_job_config_paths_come_from_the_layout():
    from beam_job.config import get_preset
    from beam_job.pipeline.options import JobConfig

    job = JobConfig(inputs=("x/*.jpg",), manifests=(), output="gs://b/out/", extraction=get_preset("tiny"),
                    run_id="r1")
    assert (job.features_dir, job.failures_dir, job.run_dir, job.summary_path, job.success_path) == (
        "gs://b/out/features", "gs://b/out/failures", "gs://b/out/runs/r1", "gs://b/out/runs/r1/summary.json",
        "gs://b/out/_SUCCESS")
