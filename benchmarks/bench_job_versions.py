"""Whole-job throughput of two (or more) checkouts of this project, side by side on the same images.

Each checkout runs `python -m beam_job` in its own process (PYTHONPATH = that checkout) on one folder of
generated images, alternating checkouts round by round so that load changes hit all of them alike. Prints
per-run wall time and images/s (from the run summary's own count) and the median ratio to the first.

    git worktree add /tmp/base <commit>
    python benchmarks/bench_job_versions.py --checkout base=/tmp/base --checkout new=. --images 3000 --rounds 3
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

import numpy as np
from PIL import Image


def make_images(directory: str, n: int, size: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    for i in range(n):
        arr = rng.integers(0, 256, (size, size + 8 * (i % 3), 3), dtype=np.uint8)
        Image.fromarray(arr).save(os.path.join(directory, f"im{i:05d}.jpg"), quality=90)


def run_once(checkout: str, images: str, output: str, extra) -> dict:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(checkout), NO_GCE_CHECK="true", TF_CPP_MIN_LOG_LEVEL="2")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "beam_job", "--input", os.path.join(images, "*.jpg"), "--output",
                           output, "--preset", "tiny", "--no_progress", *extra], cwd=os.path.abspath(checkout),
                          env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{checkout}: exit {proc.returncode}: {proc.stderr[-2000:]}")
    summary = json.load(open(glob.glob(os.path.join(output, "runs", "*", "summary.json"))[0]))
    return {"wall_s": wall, "processed": summary["counts"]["processed"], "images_per_s_job": summary["images_per_s"]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkout", action="append", required=True, metavar="LABEL=PATH")
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("job_args", nargs="*", help="extra delg-extract flags (after --)")
    args = parser.parse_args(argv)
    checkouts = [c.split("=", 1) for c in args.checkout]
    with tempfile.TemporaryDirectory(prefix="bench-job-") as tmp:
        images = os.path.join(tmp, "img")
        make_images(images, args.images, args.size)
        results = {label: [] for label, _ in checkouts}
        for r in range(args.rounds):
            order = checkouts if r % 2 == 0 else checkouts[::-1]
            for label, path in order:
                res = run_once(path, images, os.path.join(tmp, f"out-{label}-{r}"), args.job_args)
                results[label].append(res)
                print(f"round {r} {label:>8}: {res['wall_s']:7.1f} s wall, {res['processed'] / res['wall_s']:7.1f} "
                      f"img/s (process), {res['images_per_s_job']} img/s (summary)", flush=True)
    print(f"\n{args.images} images of ~{args.size} px, tiny preset, {args.rounds} rounds (median)")
    print(f"{'checkout':>10} {'wall s':>8} {'img/s':>8} {'ratio':>6}")
    base = None
    for label, _ in checkouts:
        ips = statistics.median(r["processed"] / r["wall_s"] for r in results[label])
        wall = statistics.median(r["wall_s"] for r in results[label])
        base = base or ips
        print(f"{label:>10} {wall:8.1f} {ips:8.1f} {ips / base:6.3f}")


if __name__ == "__main__":
    main()
