"""--precision: fp32 default, bf16 in a process of its own (close to fp32), refusals in one line; the launcher's
model check reads saved_model.pb only."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import tensorflow as tf

from beam_job.config import get_preset
from beam_job.delg import precision as precision_mod
from beam_job.delg.extractor import check_extraction
from beam_job.delg.loader import ModelLoadError, inspect_delg_model, load_delg_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_precision_is_a_validated_config_field_recorded_in_the_config_json():
    assert get_preset("tiny").precision == "fp32"
    assert json.loads(get_preset("tiny", precision="bf16").to_json())["precision"] == "bf16"
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, got 'fp16'"):
        get_preset("tiny", precision="fp16")


def test_bf16_refused_in_one_line_where_it_cannot_apply(monkeypatch):
    monkeypatch.setattr(precision_mod, "cpu_flags", lambda: {"avx2", "avx512f"})
    problem = precision_mod.check_precision("bf16")
    assert "needs a CPU with native bfloat16" in problem and "\n" not in problem
    monkeypatch.setattr(precision_mod, "cpu_flags", lambda: {"avx512_bf16"})
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")
    assert "unset TF_ENABLE_ONEDNN_OPTS=0" in precision_mod.check_precision("bf16")
    with pytest.raises(ValueError, match="TF_ENABLE_ONEDNN_OPTS"):
        check_extraction(get_preset("tiny", precision="bf16"))  # the launcher's check refuses it too
    assert precision_mod.check_precision("fp32") is None


def test_bf16_without_amx_is_allowed_with_a_speed_caution(monkeypatch):
    monkeypatch.setattr(precision_mod, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    assert precision_mod.check_precision("bf16") is None
    note = precision_mod.bf16_speed_note("bf16")
    assert "without AMX" in note and "bench_cpu_bf16.py" in note and "\n" not in note
    assert precision_mod.bf16_speed_note("fp32") is None
    monkeypatch.setattr(precision_mod, "cpu_flags", lambda: {"avx512_bf16", "amx_bf16", "amx_tile"})
    assert precision_mod.bf16_speed_note("bf16") is None


def test_this_test_process_runs_fp32_and_refuses_a_bf16_model(tiny_model_path):
    load_delg_model(tiny_model_path)  # fp32: the process precision is now fp32
    # On a CPU with native bf16 the mix is what gets refused; elsewhere the CPU is.
    reason = "already runs DELG models in fp32" if precision_mod.check_precision("bf16") is None else "native bfloat16"
    with pytest.raises(ModelLoadError, match=reason):
        load_delg_model(tiny_model_path, precision="bf16")


def test_launcher_check_reads_saved_model_pb_without_restoring_weights(tiny_model_path, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("the check must not load the model")

    monkeypatch.setattr(tf.saved_model, "load", no_load)
    config = get_preset("tiny", model=tiny_model_path)
    identity = check_extraction(config)
    _, info = inspect_delg_model(tiny_model_path)
    assert identity == info.identity and identity.startswith(tiny_model_path + "@sha256:")
    assert (info.format, info.has_local, info.has_global, info.takes_global_scales_ind) == ("tf2", True, True, True)
    with pytest.raises(ValueError, match="no model"):
        check_extraction(get_preset("r50_gldv2clean"))


@pytest.fixture(scope="module")
def tiny_model_path(tmp_path_factory):
    from beam_job.delg.export import export_tf2
    from beam_job.delg.keras_model import build_delg

    return export_tf2(build_delg("tiny", seed=0), str(tmp_path_factory.mktemp("precision") / "tiny_tf2"))


def test_bf16_extraction_in_its_own_process_is_close_to_fp32(tiny_model_path, tmp_path):
    # One process per precision (the rewrite is process-wide): fp32 and bf16 children, same image.
    script = textwrap.dedent(
        """
        import sys, numpy as np
        from beam_job.config import get_preset
        from beam_job.delg.extractor import DelgExtractor
        model, precision, out = sys.argv[1:4]
        rng = np.random.default_rng(0)
        image = np.clip(rng.normal(128, 60, (200, 264, 3)), 0, 255).astype(np.uint8)
        config = get_preset("tiny", model=model, precision=precision, max_feature_num=10**6)
        try:
            extractor = DelgExtractor(config)
        except ValueError as err:
            sys.exit(f"refused: {err}")
        f = extractor.extract(image)
        np.savez(out, g=f.global_descriptor, loc=f.locations, s=f.scales, d=f.descriptors, a=f.attention,
                 identity=np.array(extractor.identity))
        """
    )
    import numpy as np

    outs = {}
    for precision in ("fp32", "bf16"):
        out = str(tmp_path / f"{precision}.npz")
        env = dict(os.environ, PYTHONPATH=ROOT)
        done = subprocess.run([sys.executable, "-c", script, tiny_model_path, precision, out], env=env, cwd=ROOT,
                              timeout=300, capture_output=True, text=True)
        problem = precision_mod.check_precision(precision)
        if problem:  # a CPU without native bf16: refused at load, in one line
            assert done.returncode == 1 and f"refused: {problem}" in done.stderr.strip().splitlines()[-1]
            return
        assert done.returncode == 0, done.stderr[-2000:]
        outs[precision] = np.load(out)
    fp32, bf16 = outs["fp32"], outs["bf16"]
    assert str(bf16["identity"]).endswith("+bf16") and "+" not in str(fp32["identity"]).rsplit("@", 1)[1]
    # All cells, at every level (tiny: scales 1 and sqrt 2): the same keypoints and scales, to the bit.
    assert len(set(fp32["s"].tolist())) == 2
    o16, o32 = (np.lexsort((z["loc"][:, 1], z["loc"][:, 0], z["s"])) for z in (bf16, fp32))
    np.testing.assert_array_equal(bf16["s"][o16], fp32["s"][o32])
    np.testing.assert_array_equal(bf16["loc"][o16], fp32["loc"][o32])
    assert float(np.dot(bf16["g"], fp32["g"])) > 0.999
    cos = np.sum(bf16["d"][o16] * fp32["d"][o32], axis=1)
    assert cos.min() > 0.99
    assert np.max(np.abs(bf16["a"][o16] - fp32["a"][o32]) / fp32["a"][o32]) < 0.05
    assert not np.array_equal(bf16["d"], fp32["d"])  # bf16 really ran


def test_job_refuses_bf16_before_any_work_in_one_line(tmp_path, monkeypatch, capsys):
    from beam_job import cli

    image = tmp_path / "in" / "a.png"
    image.parent.mkdir()
    from PIL import Image

    Image.new("RGB", (40, 30), (90, 120, 200)).save(image)
    monkeypatch.setattr(precision_mod, "cpu_flags", lambda: {"avx2"})
    out = tmp_path / "out"
    argv = ["--input", str(image.parent / "*.png"), "--output", str(out), "--preset", "tiny", "--no_progress"]
    assert cli.main([*argv, "--precision", "bf16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs a CPU with native bfloat16" in err[0] and "--precision fp32" in err[0]
    assert not (out / "features").exists()
    assert cli.main([*argv, "--precision", "fp16"]) == 2
    assert "argument --precision: invalid choice: 'fp16'" in capsys.readouterr().err


def test_worker_without_bf16_fails_its_model_load_in_one_line(tiny_model_path, monkeypatch):
    """A worker whose CPU lacks bf16 (SIMULATED: precision.cpu_flags monkeypatched to report a worker CPU with
    neither avx512_bf16 nor amx_bf16) loading a bf16 model through the job's RunInference handler: the load
    fails with one ModelLoadError line naming the machine, the missing flags and what to do, and leaves the
    process's precision unset (no fallback to fp32)."""
    from beam_job.pipeline.handler import DelgModelHandler

    monkeypatch.setattr(precision_mod, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_vnni"})
    before = precision_mod._process_precision
    handler = DelgModelHandler(get_preset("tiny", model=tiny_model_path, precision="bf16"))
    with pytest.raises(ModelLoadError) as info:
        handler.load_model()
    message = str(info.value)
    assert "\n" not in message and message == precision_mod.check_precision("bf16")
    assert "lacks the CPU flags avx512_bf16 and amx_bf16" in message and message.endswith("or use --precision fp32")
    assert f"host {socket.gethostname()}, {precision_mod.cpu_model_name()})" in message
    assert precision_mod._process_precision == before
    # A remote launcher's check judges the name only; an unknown precision is still refused there.
    assert precision_mod.check_precision("bf16", here=False) is None
    assert "must be one of fp32, bf16" in precision_mod.check_precision("fp16", here=False)


def test_job_whose_worker_cannot_run_bf16_fails_with_that_line(tmp_path, monkeypatch, capsys):
    """The worker's refusal reaches the job's error output (SIMULATED worker CPU without bf16: precision.cpu_flags
    monkeypatched; the in-process runner's worker shares this process). --skip_model_check keeps the launcher
    from refusing first, as a remote launcher would not; the job fails (exit 1) with the worker's line and
    writes no feature row."""
    from PIL import Image

    from beam_job import cli

    image = tmp_path / "in" / "a.png"
    image.parent.mkdir()
    Image.new("RGB", (40, 30), (90, 120, 200)).save(image)
    monkeypatch.setattr(precision_mod, "cpu_flags", lambda: {"avx2"})
    out = tmp_path / "out"
    argv = ["--input", str(image.parent / "*.png"), "--output", str(out), "--preset", "tiny", "--no_progress",
            "--precision", "bf16", "--skip_model_check"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("delg-extract: job failed: "), err
    assert "needs a CPU with native bfloat16" in err[0], err
    assert "lacks the CPU flags avx512_bf16 and amx_bf16" in err[0] and "or use --precision fp32" in err[0], err
    assert not list(out.glob("features/*.parquet")) and not (out / "_SUCCESS").exists()


def test_exact_receptive_geometry_restores_the_fp32_boxes_and_scales_bit_for_bit():
    import numpy as np

    from beam_job.delg.architecture import FEATURE_STRIDE, RECEPTIVE_FIELD, RECEPTIVE_PADDING
    from beam_job.delg.loader import exact_receptive_geometry

    scales = np.array([0.25, 0.70710677, 1.0, 1.4142135, 2.0], np.float32)
    rng = np.random.default_rng(1)
    level = rng.integers(0, len(scales), 500)
    cells = rng.integers(0, 64, (500, 2)).astype(np.float32)
    bias = np.array([-RECEPTIVE_PADDING, -RECEPTIVE_PADDING, RECEPTIVE_FIELD - 1 - RECEPTIVE_PADDING,
                     RECEPTIVE_FIELD - 1 - RECEPTIVE_PADDING], np.float32)
    s = scales[level][:, None]
    boxes = (np.float32(FEATURE_STRIDE) * np.concatenate([cells, cells], 1) + bias) / s  # as the fp32 graph
    inv = np.float32(1) / scales[level]

    def bf16(x):  # round to bfloat16 (8 bits of mantissa), as the rewritten graph's arithmetic does
        bits = np.asarray(x, np.float32).view(np.uint32)
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).view(np.float32)

    assert not np.array_equal(bf16(boxes), boxes) and not np.array_equal(bf16(inv), inv)
    fixed_boxes, fixed_scales = exact_receptive_geometry(bf16(boxes), bf16(inv), scales)
    np.testing.assert_array_equal(fixed_boxes, boxes)
    np.testing.assert_array_equal(fixed_scales, inv)
    # A row off the DELG grid (another geometry) is left as the model gave it.
    odd = (np.float32(FEATURE_STRIDE) * np.array([[3, 4, 3, 4]], np.float32) + bias) / np.float32(2.0) + 11  # 0.7 cell
    kept, _ = exact_receptive_geometry(odd, np.array([0.5], np.float32), scales)
    np.testing.assert_array_equal(kept, odd)
