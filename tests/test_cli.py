"""CLI: invalid configuration fails before launch with one line (exit 2); presets listing; python -m beam_job."""

import os
import subprocess
import sys

import numpy as np
import pytest

from beam_job import cli
from beam_job.config import PRESETS

from helpers import fails_with, synthetic_output

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def image_dir(tmp_path):
    from PIL import Image

    d = tmp_path / "img"
    d.mkdir()
    Image.new("RGB", (48, 40), (10, 200, 30)).save(d / "a.jpg")
    return d


def test_config_errors_are_one_line_before_launch(tmp_path, image_dir, capsys):
    out = str(tmp_path / "out")
    good_input = ["--input", str(image_dir / "*.jpg")]
    fails_with(capsys, ["--output", out, "--preset", "tiny"], "no inputs", "--input")
    fails_with(capsys, [*good_input, "--preset", "tiny"], "--output is required")
    fails_with(capsys, [*good_input, "--output", out, "--preset", "nope"], "--preset", "invalid choice")
    fails_with(capsys, [*good_input, "--output", out, "--preset", "tiny", "--image_scales", "-1"],
                "image_scales must all be > 0")
    fails_with(capsys, [*good_input, "--output", out, "--preset", "tiny", "--max_feature_num", "many"],
                "--max_feature_num", "invalid int value")
    fails_with(capsys, [*good_input, "--output", out, "--preset", "tiny", "--max_failure_ratio", "2"],
                "--max_failure_ratio must be between 0 and 1")
    fails_with(capsys, [*good_input, "--output", out, "--preset", "tiny", "--skip_existing", "--overwrite"],
                "pick one")
    fails_with(capsys, [*good_input, "--output", out, "--preset", "tiny", "stray"], "unexpected argument 'stray'")
    fails_with(capsys, [*good_input, "--output", out, "--preset", "tiny", "--ouptut=x"], "unknown flag '--ouptut=x'")
    fails_with(capsys, ["--input", str(image_dir / "*.png"), "--output", out, "--preset", "tiny"], "matches no file")
    fails_with(capsys, ["--manifest", str(tmp_path / "none.csv"), "--output", out, "--preset", "tiny"],
                "does not exist")
    unreadable = tmp_path / "a_directory"
    unreadable.mkdir()  # listing it raises an OSError (as an unreachable bucket does), not a traceback
    fails_with(capsys, ["--manifest", str(unreadable), "--output", out, "--preset", "tiny"],
                "cannot list the inputs", "credentials")
    assert not os.path.exists(out)  # nothing was launched or written


def test_unwritable_output_and_unusable_models_fail_before_launch(tmp_path, image_dir, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    good_input = ["--input", str(image_dir / "*.jpg")]
    fails_with(capsys, [*good_input, "--output", str(blocker / "out"), "--preset", "tiny"], "not writable")
    out = str(tmp_path / "out")
    fails_with(capsys, [*good_input, "--output", out, "--preset", "r50_gldv2clean"], "has no model", "--model")
    fails_with(capsys, [*good_input, "--output", out, "--preset", "tiny", "--model", str(tmp_path / "no_model")],
                "cannot be used")
    assert not os.path.exists(out)  # refused before the claim: no output folder is created


def _launch(image_dir, out, *extra):
    """The launch's checks and claim (Launch.__enter__) for a tiny job; the caller leaves the block."""
    from beam_job.launch import Launch
    from beam_job.pipeline.options import job_config_from_args, parse_job_args

    argv = ["--input", str(image_dir / "*.jpg"), "--output", str(out), "--preset", "tiny", "--no_progress", *extra]
    args, pipeline_args = parse_job_args(argv)
    return Launch(job_config_from_args(args), pipeline_args)


@pytest.mark.parametrize("runner", ["DataflowRunner", "FlinkRunner", "PortableRunner", "SparkRunner"])
def test_remote_runner_launcher_does_not_judge_its_own_cpu_for_bf16(tmp_path, image_dir, monkeypatch, capsys,
                                                                    runner):
    """A launcher whose CPU lacks bf16 (SIMULATED: precision.cpu_flags monkeypatched to report a launcher CPU
    with neither avx512_bf16 nor amx_bf16) launching bf16 onto remote workers: no refusal at the model check,
    whose other checks still run; the workers judge their own CPUs at model load."""
    from beam_job.delg import precision
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "avx512f"})
    assert precision.check_precision("bf16") is not None  # the simulated CPU would be refused for local work
    with _launch(image_dir, tmp_path / "out", "--precision", "bf16", f"--runner={runner}") as launch:
        identity = launch.context.model_identity
        assert launch.local is False and launch.job.extraction.precision == "bf16"
        assert identity.startswith("embedded:tiny@sha256:") and identity.endswith("+bf16")
    # Every other model check still runs on the launcher: an unusable model is refused before launch.
    fails_with(capsys, ["--input", str(image_dir / "*.jpg"), "--output", str(tmp_path / "out2"), "--preset", "tiny",
                         "--precision", "bf16", f"--runner={runner}", "--model", str(tmp_path / "no_model")],
                "cannot be used", "does not exist")


@pytest.mark.parametrize("runner", ["FnApiRunner", "DirectRunner", None])
def test_local_runner_launcher_still_refuses_bf16_on_a_cpu_without_it(tmp_path, image_dir, monkeypatch, capsys,
                                                                      runner):
    """The same launcher CPU without bf16 (SIMULATED through precision.cpu_flags) with a local runner, whose
    workers are this machine: refused before launch in one line, as before; fp32 passes."""
    from beam_job.delg import precision

    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "avx512f"})
    out = tmp_path / "out"
    argv = ["--input", str(image_dir / "*.jpg"), "--output", str(out), "--preset", "tiny", "--no_progress",
            *([f"--runner={runner}"] if runner else [])]
    line = fails_with(capsys, [*argv, "--precision", "bf16"], "needs a CPU with native bfloat16",
                       "lacks the CPU flags avx512_bf16 and amx_bf16", "--precision fp32")
    assert line.startswith("delg-extract: error: model embedded:tiny cannot be used: ")
    assert not (out / "features").exists()
    with _launch(image_dir, out, "--precision", "fp32", *argv[7:]) as launch:
        assert launch.local is True and "+" not in launch.context.model_identity.rsplit("@", 1)[1]
    assert not os.path.exists(out / "_claim.json")  # released when the block ends


def test_presets_listing(capsys):
    assert cli.main(["presets"]) == 0
    text = capsys.readouterr().out
    for name in PRESETS:
        assert name in text
    assert cli.main(["--list_presets"]) == 0
    assert "embedded:tiny" in capsys.readouterr().out


def test_python_dash_m_entry_point_exits_2_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "beam_job", "--output", str(tmp_path / "o")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == ["delg-extract: error: no inputs: give --input 'images/*.jpg' and/or --manifest list.csv"]


@pytest.mark.parametrize("private_hook", [True, False], ids=["fast-exit", "fallback-without-atexit-hook"])
def test_console_exit_keeps_the_status_runs_exit_handlers_and_flushes(tmp_path, private_hook):
    """delg-extract ends with os._exit (no interpreter teardown) through CPython's private atexit._run_exitfuncs:
    atexit handlers and buffered output must survive. Where the hook is missing (another interpreter, or a
    CPython that drops it) the process exits normally, with the same status, handlers and output."""
    marker = tmp_path / "atexit-ran"
    code = (
        "import atexit, sys\n"
        + ("" if private_hook else "del atexit._run_exitfuncs\n")
        + f"atexit.register(lambda: open({str(marker)!r}, 'w').write('yes'))\n"
        "print('buffered line')  # stdout is a pipe here, so block-buffered\n"
        "from beam_job.cli import exit_without_teardown\n"
        "exit_without_teardown(3)\n"
        "print('not reached')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3
    assert proc.stdout == "buffered line\n"
    assert marker.read_text() == "yes"


def test_console_exit_waits_for_a_running_non_daemon_thread(tmp_path):
    marker = tmp_path / "thread-finished"
    code = (
        "import threading, time\n"
        f"threading.Thread(target=lambda: (time.sleep(0.5), open({str(marker)!r}, 'w').write('done'))).start()\n"
        "from beam_job.cli import exit_without_teardown\n"
        "exit_without_teardown(4)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 4
    assert marker.read_text() == "done"


def test_flags_are_beam_pipeline_options_and_beam_flags_pass_through():
    from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions

    from beam_job.pipeline.options import DelgOptions, job_config_from_args, parse_job_args
    from beam_job.pipeline.pipeline import with_default_runner

    argv = ["--input", "x/*.jpg", "--output", "o", "--image_scales", "0.5,1", "--global_scales_ind", "0,1",
            "--no_exif", "--direct_num_workers=2", "--direct_running_mode", "multi_processing"]
    args, pipeline_args = parse_job_args(argv)
    assert args.input == ["x/*.jpg"] and pipeline_args == argv
    options = PipelineOptions(pipeline_args)
    ours = options.view_as(DelgOptions)  # Beam parses our flags with its own
    assert (ours.input, ours.output, ours.no_exif) == (["x/*.jpg"], "o", True)
    assert options.view_as(DirectOptions).direct_num_workers == 2
    # The options survive Beam's round trip to workers (values re-parsed from --name=value).
    again = PipelineOptions.from_dictionary(options.get_all_options(drop_default=True)).view_as(DelgOptions)
    job = job_config_from_args(again)
    assert job.extraction.image_scales == (0.5, 1.0) and job.extraction.global_scales_ind == (0, 1)
    assert job.extraction.apply_exif_orientation is False and job.inputs == ("x/*.jpg",)
    assert with_default_runner(pipeline_args)[-1] == "--runner=FnApiRunner"
    assert with_default_runner(["--runner=DataflowRunner"]) == ["--runner=DataflowRunner"]


def test_hyphenated_flags_are_the_same_flags_ours_and_beams():
    """`--max-feature-num 500` is --max_feature_num (issue 17: it was silently ignored), for Beam's flags too."""
    from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions

    from beam_job.pipeline.options import DelgOptions, job_config_from_args, parse_job_args

    argv = ["--input", "x/*.jpg", "--output", "out-dir", "--preset", "tiny", "--max-feature-num", "500",
            "--skip-existing", "--no-exif", "--image-scales=0.5,1", "--global-scales-ind", "0,1", "--run-id",
            "my-run-1", "--direct-num-workers=2", "--direct-running-mode", "multi_processing"]
    args, pipeline_args = parse_job_args(argv)
    job = job_config_from_args(args)
    assert job.extraction.max_feature_num == 500 and job.skip_existing and not job.extraction.apply_exif_orientation
    assert job.extraction.image_scales == (0.5, 1.0) and job.run_id == "my-run-1" and job.output == "out-dir"
    options = PipelineOptions(pipeline_args)  # what the pipeline and the workers see
    assert options.view_as(DirectOptions).direct_num_workers == 2
    assert options.view_as(DirectOptions).direct_running_mode == "multi_processing"
    assert options.view_as(DelgOptions).max_feature_num == 500
    assert "--max_feature_num" in pipeline_args and "--direct_num_workers=2" in pipeline_args


def test_unknown_hyphenated_flags_and_unquoted_globs_are_refused_saying_the_fix(tmp_path, image_dir, capsys):
    out = str(tmp_path / "out")
    base = ["--output", out, "--preset", "tiny"]
    fails_with(capsys, ["--input", str(image_dir / "*.jpg"), *base, "--max-featur-num", "5"],
                "unknown flag '--max-featur-num'", "did you mean --max_feature_num?")
    fails_with(capsys, ["--input", str(image_dir / "*.jpg"), *base, "--direct-num-worker=2"],
                "unknown flag '--direct-num-worker=2'", "did you mean --direct_num_workers?")
    for name in ("b.jpg", "c.jpg"):
        (image_dir / name).write_bytes((image_dir / "a.jpg").read_bytes())
    expanded = sorted(str(p) for p in image_dir.glob("*.jpg"))  # what the shell makes of an unquoted glob
    fails_with(capsys, ["--input", *expanded, *base], f"unexpected argument {expanded[1]!r}",
                "the shell expanded an unquoted glob into 3 paths: quote the glob",
                f"--input {str(image_dir / '*.jpg')!r}")
    assert not os.path.exists(out)


def test_help_lists_the_flags_and_docs_table_is_derived_from_them(capsys):
    from beam_job.pipeline.options import FLAGS, flags_markdown

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert all(f"--{flag.name}" in text for flag in FLAGS)
    with open(os.path.join(REPO, "docs", "pipeline.md"), encoding="utf-8") as fh:
        assert flags_markdown() in fh.read(), "docs/pipeline.md's flag table is stale: paste flags_markdown()"


def test_no_private_beam_name_is_imported():
    import re

    private = re.compile(r"from apache_beam[\w.]* import [^\n]*\b_[A-Za-z]|apache_beam(\.\w+)*\._[A-Za-z]")
    offenders = []
    for root in ("beam_job", "dataflow", "benchmarks"):
        for dirpath, _, files in os.walk(os.path.join(REPO, root)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(dirpath, name)
                    with open(path, encoding="utf-8") as fh:
                        offenders += [f"{path}: {m.group(0)}" for m in private.finditer(fh.read())]
    assert not offenders, offenders


def test_pipeline_layer_does_not_import_tensorflow():
    code = ("import sys, beam_job.cli, beam_job.pipeline.pipeline, beam_job.pipeline.handler; "
            "from beam_job.pipeline.pipeline import build_pipeline; "
            "bad = [m for m in ('tensorflow', 'keras') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ----------------------------------------------------------------------------- hostile run ids (issue 16, item 3)

HOSTILE_RUN_IDS = ["x/../../../../escape", "a/b", "..", "", ".", ".hidden", "-x", "a\\b", "a b", "a\nb", "run:1",
                   "é", "a" * 129]


def test_run_ids_outside_the_safe_alphabet_are_refused_before_the_output_exists(tmp_path, image_dir, capsys):
    """Each one used to write somewhere else: Beam temp files outside <output>, shards in features/part-a/,
    summary.json at <output>/ or <output>/runs/. Now one line saying what is allowed, nothing created."""
    out = tmp_path / "deep" / "er" / "out"
    for run_id in HOSTILE_RUN_IDS:
        for flag in (["--run_id", run_id], [f"--run_id={run_id}"]):
            if flag[0] == "--run_id" and run_id.startswith("-"):
                continue  # argparse reads '-x' as a flag; '--run_id=-x' reaches the check
            line = fails_with(capsys, ["--input", str(image_dir / "*.jpg"), "--output", str(out), "--preset", "tiny",
                                        "--skip_existing", *flag], "--run_id", "letters, digits, '.', '_' or '-'")
            assert "\n" not in line
    assert sorted(os.listdir(tmp_path)) == ["img"]  # not even the output's parents: refused before anything


def test_python_dash_m_refuses_an_escaping_run_id_and_accepts_the_default_ones(tmp_path, image_dir):
    from beam_job.pipeline.options import check_run_id, new_run_id

    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "beam_job", "--input", str(image_dir / "*.jpg"), "--output", str(out),
                           "--preset", "tiny", "--run_id", "x/../../../../escape"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        "delg-extract: error: --run_id: run id 'x/../../../../escape' is not allowed: use 1 to 128 letters, digits, "
        "'.', '_' or '-', starting with a letter, digit or '_' (e.g. 20261123T211400Z-3f9a1c)"]
    assert sorted(os.listdir(tmp_path)) == ["img"]
    for run_id in [new_run_id() for _ in range(50)] + ["r1", "run0", "crashed", "_a", "a.b-c_D", "a" * 128]:
        assert check_run_id(run_id) == run_id


def test_report_refuses_a_hostile_run_id_from_the_flag_or_from_a_summary(tmp_path, capsys):
    """`delg-extract report --run_id` and the run id a summary.json holds both name the page's folder."""
    import json

    out = str(tmp_path / "out")
    rid = synthetic_output(out, n_rows=4, per_shard=4)
    for bad in ("../../escape", "..", ""):
        fails_with(capsys, ["report", out, "--run_id", bad], "--run_id", "is not allowed")
    assert cli.main(["report", out, "--run-id", rid]) == 0  # the hyphenated spelling too (issue 17)
    assert os.path.exists(os.path.join(out, "runs", rid, "report.html"))
    os.remove(os.path.join(out, "runs", rid, "report.html"))
    path = os.path.join(out, "runs", rid, "summary.json")
    summary = json.load(open(path))
    summary["run_id"] = "../../../escape"
    json.dump(summary, open(path, "w"))
    fails_with(capsys, ["report", out], "the run id in", "summary.json", "'../../../escape' is not allowed")
    assert not os.path.exists(tmp_path / "escape") and not os.path.exists(os.path.join(out, "escape"))
    assert not os.path.exists(os.path.join(out, "runs", rid, "report.html"))


# ----------------------------------------------------------------------------- impossible settings (item 10)

def test_settings_no_image_can_work_with_fail_before_launch_in_one_line(tmp_path, image_dir, capsys):
    """They used to be accepted, and then every image failed at inference (the job exited 1)."""
    out = tmp_path / "out"
    run = ["--input", str(image_dir / "*.jpg"), "--output", str(out), "--preset", "tiny"]
    for value in ("2147483648", "99999999999999999999", "4294967296"):
        fails_with(capsys, [*run, "--max_feature_num", value], "max_feature_num must be between 1 and 2147483647",
                    "int32")
    fails_with(capsys, [*run, "--max_feature_num", "1e20"], "--max_feature_num", "invalid int value")
    for scales, shown in (("1e-9,1", "1e-09"), ("1,0.05", "0.05"), ("0.00001", "1e-05")):
        fails_with(capsys, [*run, "--image_scales", scales, "--global_scales_ind", "0"],
                    f"image_scales {shown} too small", "max_image_size 96", "smallest usable scale here is 0.0521")
    # the bound follows the settings: the largest image they allow
    fails_with(capsys, [*run, "--max_image_size", "1024", "--image_scales", "0.004,1", "--global_scales_ind", "1"],
                "image_scales 0.004 too small", "max_image_size 1024", "is 0.004883")
    fails_with(capsys, [*run, "--max_image_size", "-1", "--image_scales", "1e-4", "--global_scales_ind", "0"],
                "image_scales 0.0001 too small", "max_image_pixels 100000000", "is 0.0005")
    fails_with(capsys, [*run, "--max_image_size", "2147483648"], "max_image_size must be -1 (off) or a positive size")
    assert not os.path.exists(out)


def test_the_smallest_usable_scale_works_for_the_largest_image(tmp_path, capsys):
    """The bound is tight: at 0.0521 with the tiny preset (96 px) the largest image still gets its level."""
    import pyarrow.parquet as pq
    from PIL import Image

    d = tmp_path / "img"
    d.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype="uint8")).save(d / "big.png")
    out = tmp_path / "out"
    assert cli.main(["--input", str(d / "*.png"), "--output", str(out), "--preset", "tiny", "--no_progress",
                     "--image_scales", "0.0521,1"]) == 0, capsys.readouterr().err[-2000:]
    features = [str(p) for p in (out / "features").glob("*.parquet")]
    table = pq.read_table(features[0], columns=["global_descriptor"])
    assert len(features) == 1 and table.num_rows == 1
    assert np.isfinite(np.asarray(table.column(0).to_pylist()[0])).all()  # the 5-px level pooled, no NaN
    assert not list((out / "failures").glob("*.parquet"))
