"""Side-by-side speed, memory, quality: bare extractor vs whole job, our graph vs the official one, fp32 vs bf16.

Every variant runs in a process of its own, and the variants alternate within each round, so that a change in
the machine's load hits them all alike. Per variant the parent measures the process's wall time (start-up
included) and its peak RSS (`os.wait4`'s ru_maxrss); the child reports seconds per image.

  bare            a Python loop over DelgExtractor (README's API): load, then decode + extract each job photo
  job             `python -m beam_job` (delg-extract) over the same photos, whole process
  official-fp32   DelgExtractor on the official computation: our weights exported with global_at_all_scales=True
                  and fold_batchnorm=False (the block4 head at every scale, layer by layer, as the official graph)
  ours-fp32       DelgExtractor on our default export (embedded:<arch>): block4 only at the global scales,
                  BatchNorm folded into the convolutions
  ours-bf16 / official-bf16   the same two models with --precision bf16
  bare-official / job-official   (only when asked for) bare and job on the official-computation export: the
                  job's per-image cost on an official-format model (summary p50 vs the loop's median, which
                  also counts the decode, about 1%)

Model variants time every --model_photos photo after one untimed warm-up call, then, in the first round, extract
all cells (untimed; threshold 0, max_feature_num 10**6) for the quality comparison: ours vs official in fp32
(global max |diff|, same keypoints, descriptors at the same keypoints), bf16 vs fp32 of the same model (global
cosine, descriptor cosine at the same cells, attention relative error, top-1000 overlap).

  python benchmarks/bench_side_by_side.py /path/to/photos                 # R50, 12 + 4 photos, 2 rounds
  python benchmarks/bench_side_by_side.py /path/to/photos --quick         # tiny model, 4 + 2 photos, 1 round
  python benchmarks/bench_side_by_side.py /path/to/photos --variants ours-fp32,official-fp32 --rounds 3

Photos are read in place (the job gets a temporary folder of symbolic links to them).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

VARIANTS = ("bare", "job", "official-fp32", "ours-fp32", "ours-bf16", "official-bf16")
# Not run by default: bare loop and job on the official-computation export (the job's per-image cost there).
EXTRA_VARIANTS = ("bare-official", "job-official")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
ALL_CELLS = 10**6


# ------------------------------------------------------------------------------------------------------------
# Children
# ------------------------------------------------------------------------------------------------------------


def _config(spec: dict[str, Any], model: str | None = None, precision: str = "fp32", **overrides):
    from beam_job.config import get_preset

    kwargs = {"precision": precision, **overrides}
    if model:
        kwargs["model"] = model
    return get_preset(spec["preset"], **kwargs)


def child_bare(spec: dict[str, Any], official: bool = False) -> dict[str, Any]:
    """README's API in a loop: the cost the job should match."""
    from beam_job.delg.extractor import DelgExtractor
    from beam_job.imaging import decode_image

    t0 = time.perf_counter()
    extractor = DelgExtractor(_config(spec, model=spec["official_model"] if official else None))
    load_s = time.perf_counter() - t0
    times = []
    for path in spec["job_photos"]:
        t = time.perf_counter()
        with open(path, "rb") as handle:
            extractor.extract(decode_image(handle.read()))
        times.append(time.perf_counter() - t)
    return {"load_s": load_s, "times": times}


def child_model(spec: dict[str, Any], which: str, precision: str) -> dict[str, Any]:
    import numpy as np

    from beam_job.delg.extractor import DelgExtractor
    from beam_job.imaging import decode_image, prepare_image

    model = spec["official_model"] if which == "official" else None
    config = _config(spec, model=model, precision=precision)
    t0 = time.perf_counter()
    extractor = DelgExtractor(config)
    load_s = time.perf_counter() - t0
    prepared = []
    for path in spec["model_photos"]:
        with open(path, "rb") as handle:
            prepared.append(prepare_image(decode_image(handle.read()), config))
    extractor.extract_prepared(prepared[0])  # warm-up: tracing and graph optimisation
    times, outputs = [], {}
    for k, image in enumerate(prepared):
        t = time.perf_counter()
        features = extractor.extract_prepared(image)
        times.append(time.perf_counter() - t)
        outputs[f"top_{k}_loc"] = features.locations
        outputs[f"top_{k}_desc"] = features.descriptors
        outputs[f"top_{k}_att"] = features.attention
        outputs[f"top_{k}_scale"] = features.scales
        outputs[f"top_{k}_glob"] = features.global_descriptor
    all_cells = DelgExtractor(config.replace(score_threshold=0.0, max_feature_num=ALL_CELLS), extractor.model)
    for k, image in enumerate(prepared if spec["quality"] else []):
        features = all_cells.extract_prepared(image)
        outputs[f"all_{k}_loc"] = features.locations
        outputs[f"all_{k}_desc"] = features.descriptors
        outputs[f"all_{k}_att"] = features.attention
        outputs[f"all_{k}_scale"] = features.scales
    np.savez(spec["out_npz"], **outputs)
    return {"load_s": load_s, "times": times}


def run_child(variant: str, spec: dict[str, Any]) -> None:
    if variant in ("bare", "bare-official"):
        result = child_bare(spec, official=variant == "bare-official")
    else:
        which, precision = variant.split("-")
        result = child_model(spec, which, precision)
    print("RESULT " + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------------------------
# Parent
# ------------------------------------------------------------------------------------------------------------


def _spawn(cmd: list[str], env: dict[str, str], log_path: str) -> dict[str, Any]:
    """Run cmd; wall seconds, peak RSS (MB) of that process and its RESULT line (if any)."""
    with open(log_path, "wb") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=_ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    with open(log_path, encoding="utf-8", errors="replace") as log:
        text = log.read()
    if proc.returncode != 0:
        tail = "\n".join(text.strip().splitlines()[-5:])
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    result: dict[str, Any] = {}
    for line in text.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
    return {"wall_s": wall, "rss_mb": usage.ru_maxrss / 1024.0, **result}


def _prepare_models(spec: dict[str, Any], env: dict[str, str], work: str) -> None:
    """Export the official-computation model and our embedded model once, outside any timing."""
    code = (
        "import os, sys\n"
        "from beam_job.delg.embedded import embedded_model_path, _code_version\n"
        "from beam_job.delg.cache import build_once\n"
        f"arch, target = {spec['arch']!r}, {spec['official_model']!r}\n"
        "embedded_model_path(arch)\n"
        "def build(tmp):\n"
        "    from beam_job.delg.export import export_tf2\n"
        "    from beam_job.delg.keras_model import build_delg\n"
        "    export_tf2(build_delg(arch, seed=0), os.path.join(tmp, 'm'), global_at_all_scales=True,\n"
        "               fold_batchnorm=False)\n"
        "build_once(target, build)\n"
    )
    _spawn([sys.executable, "-c", code], env, os.path.join(work, "prepare.log"))
    spec["official_model"] = os.path.join(spec["official_model"], "m")


def _cos(a, b) -> float:
    import numpy as np

    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def _by_cell(loc, scale, *arrays):
    """{(y, x, scale): values}: a cell is a location at one pyramid level. Levels map onto the same original
    coordinates at about a fifth of the cells, so the location alone would pair cells of different levels."""
    return {(float(p[0]), float(p[1]), float(level)): tuple(a[i] for a in arrays)
            for i, (p, level) in enumerate(zip(loc, scale, strict=True))}


def compare(test_npz: str, ref_npz: str, n: int) -> dict[str, Any]:
    """Quality of `test` against `ref`, on the preset outputs (top) and on all cells."""
    import numpy as np

    test, ref = np.load(test_npz), np.load(ref_npz)
    out: dict[str, Any] = {"global_cos_min": 1.0, "global_maxdiff": 0.0, "top_same_keypoints": True,
                           "top_overlap_min": 1.0, "top_desc_maxdiff": 0.0, "top_att_maxdiff": 0.0,
                           "all_cells_matched": True, "all_cells_unique": True}
    cosines, relerrs = [], []
    for k in range(n):
        g_t, g_r = test[f"top_{k}_glob"], ref[f"top_{k}_glob"]
        out["global_cos_min"] = min(out["global_cos_min"], _cos(g_t, g_r))
        out["global_maxdiff"] = max(out["global_maxdiff"], float(np.abs(g_t - g_r).max()))
        t = _by_cell(test[f"top_{k}_loc"], test[f"top_{k}_scale"], test[f"top_{k}_desc"], test[f"top_{k}_att"])
        r = _by_cell(ref[f"top_{k}_loc"], ref[f"top_{k}_scale"], ref[f"top_{k}_desc"], ref[f"top_{k}_att"])
        common = set(t) & set(r)
        out["top_same_keypoints"] &= set(t) == set(r)
        out["top_overlap_min"] = min(out["top_overlap_min"], len(common) / max(1, len(r)))
        for key in common:
            out["top_desc_maxdiff"] = max(out["top_desc_maxdiff"], float(np.abs(t[key][0] - r[key][0]).max()))
            out["top_att_maxdiff"] = max(out["top_att_maxdiff"], float(abs(t[key][1] - r[key][1])))
        ta = _by_cell(test[f"all_{k}_loc"], test[f"all_{k}_scale"], test[f"all_{k}_desc"], test[f"all_{k}_att"])
        ra = _by_cell(ref[f"all_{k}_loc"], ref[f"all_{k}_scale"], ref[f"all_{k}_desc"], ref[f"all_{k}_att"])
        out["all_cells_unique"] &= len(ta) == len(test[f"all_{k}_loc"]) and len(ra) == len(ref[f"all_{k}_loc"])
        out["all_cells_matched"] &= set(ta) == set(ra)
        keys = sorted(set(ta) & set(ra))
        d_t = np.stack([ta[key][0] for key in keys])
        d_r = np.stack([ra[key][0] for key in keys])
        cos = np.sum(d_t * d_r, axis=1) / (np.linalg.norm(d_t, axis=1) * np.linalg.norm(d_r, axis=1))
        a_t = np.array([ta[key][1] for key in keys])
        a_r = np.array([ra[key][1] for key in keys])
        cosines.append(cos)
        relerrs.append(np.abs(a_t - a_r) / np.abs(a_r))
    cos, rel = np.concatenate(cosines), np.concatenate(relerrs)
    out.update({"all_cells": int(cos.size), "all_desc_cos_min": float(cos.min()),
                "all_desc_cos_p1": float(np.percentile(cos, 1)), "all_desc_cos_mean": float(cos.mean()),
                "all_desc_cos_below_0999": float(np.mean(cos < 0.999)), "all_att_relerr_max": float(rel.max()),
                "all_att_relerr_p99": float(np.percentile(rel, 99)), "all_att_relerr_mean": float(rel.mean())})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("photos", nargs="?", help="folder of photos (.jpg/.jpeg/.png), read in place")
    parser.add_argument("--quick", action="store_true", help="tiny model: 4 job photos, 2 model photos, 1 round")
    parser.add_argument("--job_photos", type=int, help="photos for bare vs job (default 12, quick 4)")
    parser.add_argument("--model_photos", type=int, help="photos for the model variants (default 4, quick 2)")
    parser.add_argument("--rounds", type=int, help="rounds of all variants, alternating (default 2, quick 1)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated subset of {','.join(VARIANTS)} (default: all of these), "
                        f"or also {','.join(EXTRA_VARIANTS)}")
    parser.add_argument("--tf_threads", type=int, help="TF_NUM_INTRAOP_THREADS for every variant (default: TF's)")
    parser.add_argument("--json", help="also write every measurement to this JSON file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        run_child(args.child, json.loads(args.spec))
        return 0
    if not args.photos or not os.path.isdir(args.photos):
        parser.error("give a folder of photos")
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS) - set(EXTRA_VARIANTS))
    if unknown:
        parser.error(f"unknown variant(s) {unknown}: choose from {', '.join(VARIANTS + EXTRA_VARIANTS)}")
    preset, arch = ("tiny", "tiny") if args.quick else ("embedded", "r50")
    n_job = args.job_photos or (4 if args.quick else 12)
    n_model = args.model_photos or (2 if args.quick else 4)
    rounds = args.rounds or (1 if args.quick else 2)
    photos = sorted(p for p in glob.glob(os.path.join(args.photos, "*")) if p.lower().endswith(IMAGE_EXTENSIONS))
    if len(photos) < max(n_job, n_model):
        parser.error(f"{args.photos} has {len(photos)} photos; need {max(n_job, n_model)}")

    env = dict(os.environ, PYTHONPATH=_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
    if args.tf_threads:
        env["TF_NUM_INTRAOP_THREADS"] = str(args.tf_threads)
    from beam_job.delg.cache import default_cache_dir
    from beam_job.delg.embedded import _code_version

    work = tempfile.mkdtemp(prefix="delg-bench-")
    job_dir = os.path.join(work, "photos")
    os.makedirs(job_dir)
    for path in photos[:n_job]:
        os.symlink(os.path.abspath(path), os.path.join(job_dir, os.path.basename(path)))
    spec: dict[str, Any] = {
        "preset": preset, "arch": arch,
        "job_photos": [os.path.join(job_dir, os.path.basename(p)) for p in photos[:n_job]],
        "model_photos": [os.path.abspath(p) for p in photos[:n_model]],
        "official_model": os.path.join(default_cache_dir(), "bench", f"official-{arch}-{_code_version()}"),
    }
    _prepare_models(spec, env, work)
    load = [os.getloadavg()[0]]
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for r in range(rounds):
        for variant in variants:
            log = os.path.join(work, f"{variant}-{r}.log")
            if variant in ("job", "job-official"):
                out = os.path.join(work, f"{variant}-out-{r}")
                cmd = [sys.executable, "-m", "beam_job", "--input", os.path.join(job_dir, "*"), "--output", out,
                       "--preset", preset, "--no_progress"]
                if variant == "job-official":
                    cmd += ["--model", spec["official_model"]]
                run = _spawn(cmd, env, log)
                with open(glob.glob(os.path.join(out, "runs", "*", "summary.json"))[0]) as handle:
                    summary = json.load(handle)
                run["inference_ms"] = summary.get("timings_ms", {}).get("inference", {})
            else:
                # Quality outputs (all cells) once, in the first round.
                child_spec = dict(spec, out_npz=os.path.join(work, f"{variant}-{r}.npz"), quality=r == 0)
                cmd = [sys.executable, os.path.abspath(__file__), "--child", variant, "--spec", json.dumps(child_spec)]
                run = _spawn(cmd, env, log)
                run["npz"] = child_spec["out_npz"]
            runs[variant].append(run)
            load.append(os.getloadavg()[0])
            print(f"round {r + 1}/{rounds} {variant}: wall {run['wall_s']:.1f} s, peak RSS {run['rss_mb']:.0f} MB"
                  + (f", median {statistics.median(run['times']):.3f} s/image" if run.get("times") else ""),
                  flush=True)

    report = _report(runs, spec, n_model, load)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"runs": runs, "report": report, "spec": spec}, handle, indent=1)
    return 0


def _report(runs: dict[str, list[dict[str, Any]]], spec: dict[str, Any], n_model: int,
            load: list[float]) -> dict[str, Any]:
    def med(variant: str, key: str) -> float | None:
        values = [r[key] for r in runs.get(variant, []) if key in r]
        return statistics.median(values) if values else None

    def per_image(variant: str) -> float | None:
        values = [statistics.median(r["times"]) for r in runs.get(variant, []) if r.get("times")]
        return statistics.median(values) if values else None

    print(f"\nmachine: {os.cpu_count()} CPUs; 1-min load average during the run {min(load):.1f}-{max(load):.1f}")
    print(f"{'variant':<15} {'s/image (median)':>17} {'process wall s':>15} {'peak RSS MB':>12}   per round")
    for variant, items in runs.items():
        rounds = ", ".join(
            f"{statistics.median(r['times']):.2f}" if r.get("times") else f"{r['wall_s']:.1f}s" for r in items
        )
        pi = per_image(variant)
        print(f"{variant:<15} {pi if pi is not None else float('nan'):>17.3f} {med(variant, 'wall_s'):>15.1f} "
              f"{med(variant, 'rss_mb'):>12.0f}   {rounds}")
    report: dict[str, Any] = {"load": [min(load), max(load)]}
    print()
    if "job" in runs and "bare" in runs:
        report["job_vs_bare_wall"] = med("job", "wall_s") / med("bare", "wall_s")
        report["job_vs_bare_rss"] = med("job", "rss_mb") / med("bare", "rss_mb")
        print(f"job / bare loop, whole-process wall: {report['job_vs_bare_wall']:.3f}x (target <= 1.05); "
              f"peak RSS: {report['job_vs_bare_rss']:.3f}x (target <= 1.0)")
        inference = [r["inference_ms"].get("p50_ms") for r in runs["job"] if r.get("inference_ms")]
        if inference:
            print(f"job summary inference p50: {', '.join(f'{v:.0f} ms' for v in inference)}; bare loop median: "
                  f"{per_image('bare') * 1000:.0f} ms (includes decode)")
    if "job-official" in runs and "bare-official" in runs:
        report["job_vs_bare_official_wall"] = med("job-official", "wall_s") / med("bare-official", "wall_s")
        inference = [r["inference_ms"]["p50_ms"] for r in runs["job-official"] if r.get("inference_ms")]
        bare = per_image("bare-official")
        print(f"official-computation export: job / bare loop wall {report['job_vs_bare_official_wall']:.3f}x; "
              f"job summary inference p50 {', '.join(f'{v:.0f} ms' for v in inference)} vs bare loop median "
              f"{bare * 1000:.0f} ms (with decode): {statistics.median(inference) / (bare * 1000):.3f}x")
    pairs = [("ours-fp32", "official-fp32", "our graph / official computation, fp32", 0.9),
             ("ours-bf16", "ours-fp32", "ours bf16 / ours fp32", 0.55),
             ("official-bf16", "official-fp32", "official bf16 / official fp32", 0.55)]
    for test, ref, title, target in pairs:
        if test in runs and ref in runs:
            ratio = per_image(test) / per_image(ref)
            quality = compare(runs[test][0]["npz"], runs[ref][0]["npz"], n_model)
            report[f"{test}/{ref}"] = {"time_ratio": ratio, **quality}
            print(f"{title}: {ratio:.3f}x the time (target <= {target}); per-round ratios "
                  + ", ".join(f"{statistics.median(a['times']) / statistics.median(b['times']):.3f}"
                              for a, b in zip(runs[test], runs[ref], strict=True)))
            print(f"  global: cosine min {quality['global_cos_min']:.6f}, max |diff| {quality['global_maxdiff']:.2e}; "
                  f"top keypoints: same set {quality['top_same_keypoints']}, overlap min "
                  f"{quality['top_overlap_min']:.3f}, descriptors max |diff| {quality['top_desc_maxdiff']:.2e}, "
                  f"attention max |diff| {quality['top_att_maxdiff']:.2e}")
            print(f"  all {quality['all_cells']} cells: same cells {quality['all_cells_matched']}; descriptor cosine "
                  f"min {quality['all_desc_cos_min']:.6f}, 1st percentile {quality['all_desc_cos_p1']:.6f}, mean "
                  f"{quality['all_desc_cos_mean']:.6f}, below 0.999 at {quality['all_desc_cos_below_0999']:.2%} of "
                  f"cells; attention relative error max {quality['all_att_relerr_max']:.3%}, 99th percentile "
                  f"{quality['all_att_relerr_p99']:.3%}, mean {quality['all_att_relerr_mean']:.3%}")
    return report


if __name__ == "__main__":
    sys.exit(main())
