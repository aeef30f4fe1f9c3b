"""Decode + resize throughput of beam_job.imaging on synthetic JPEGs (images/s, one thread).

Makes a few synthetic photo-like JPEGs per size in memory (smooth colour fields plus fine texture and
sensor-like noise, so that they compress like photographs rather than flat colour), then times, per size:

  reference   PIL Image.open(...).convert('RGB') + np.array: what the official loader does (baseline)
  decode      beam_job.imaging.decode_image (header check, decode, mode rules, EXIF orientation)
  resize      beam_job.imaging.prepare_image with the preset's resize rule (default r50_gldv2clean:
              longest side capped at 1024, so 1024x768 is a no-op and 4000x3000 goes to 1024x768)
  total       decode_image + prepare_image, what the job's prepare step does per image

and prints ms/image (mean, p50, p90), images/s and decoded megapixels/s. The four cases are timed
interleaved (one call of each per round) so that a busy machine skews them alike. Single-threaded: multiply by the
worker cores for a rough per-VM figure (Pillow's decoders release the GIL, so threads scale as well).

Example:
  python benchmarks/bench_imaging.py                         # 1024x768 and 4000x3000, ~2 s per case
  python benchmarks/bench_imaging.py --sizes 1024x768 --seconds 5 --quality 85 --json /tmp/imaging.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

# Run from a checkout without installing: the repository root holds beam_job/.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from beam_job.config import get_preset  # noqa: E402
from beam_job.imaging import decode_image, prepare_image  # noqa: E402


def synthetic_photo(height: int, width: int, seed: int) -> np.ndarray:
    """(height, width, 3) uint8: low-frequency colour fields + mid-frequency texture + pixel noise."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0, 255, size=(max(height // 128, 2), max(width // 128, 2), 3)).astype(np.float32)
    image = np.asarray(
        Image.fromarray(base.astype(np.uint8)).resize((width, height), Image.BICUBIC), np.float32
    )
    texture = rng.normal(0, 40, size=(max(height // 8, 2), max(width // 8, 2))).astype(np.float32)
    texture = np.asarray(Image.fromarray(texture, "F").resize((width, height), Image.BILINEAR), np.float32)
    noise = rng.normal(0, 6, size=(height, width, 1)).astype(np.float32)
    return np.clip(image + texture[:, :, None] + noise, 0, 255).astype(np.uint8)


def make_jpegs(height: int, width: int, count: int, quality: int) -> list[bytes]:
    out = []
    for seed in range(count):
        buf = io.BytesIO()
        Image.fromarray(synthetic_photo(height, width, seed)).save(buf, "JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def time_cases(
    cases: dict[str, Callable[[int], object]], n_items: int, min_seconds: float, min_runs: int
) -> dict[str, list[float]]:
    """Seconds per call of each case. Rounds call every case once, round-robin over the items, so that
    load from other processes on a shared machine hits all cases alike; stops after both limits."""
    for fn in cases.values():
        fn(0)  # warm-up (plugin imports, first-touch allocations)
    times: dict[str, list[float]] = {name: [] for name in cases}
    start = time.perf_counter()
    i = 0
    while i < min_runs or time.perf_counter() - start < min_seconds * len(cases):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn(i % n_items)
            times[name].append(time.perf_counter() - t0)
        i += 1
    return times


def summarise(times: Sequence[float], megapixels: float) -> dict[str, float]:
    ordered = sorted(times)
    mean = statistics.fmean(times)
    return {
        "runs": len(times),
        "ms_mean": 1e3 * mean,
        "ms_p50": 1e3 * ordered[len(ordered) // 2],
        "ms_p90": 1e3 * ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
        "images_per_s": 1.0 / mean,
        "megapixels_per_s": megapixels / mean,
    }


def parse_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 1024x768 (width x height), got {text!r}") from None
    if width <= 0 or height <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return width, height


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=[(1024, 768), (4000, 3000)],
                        help="image sizes as WIDTHxHEIGHT (default: 1024x768 4000x3000)")
    parser.add_argument("--images", type=int, default=3, help="distinct synthetic JPEGs per size (default 3)")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    parser.add_argument("--seconds", type=float, default=2.0,
                        help="minimum timing per case and size, on average (default 2)")
    parser.add_argument("--min_runs", type=int, default=5, help="minimum calls per case (default 5)")
    parser.add_argument("--preset", default="r50_gldv2clean", help="preset whose resize rule is used")
    parser.add_argument("--json", help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)

    config = get_preset(args.preset)
    print(f"bench_imaging: Python {platform.python_version()}, Pillow {Image.__version__}, numpy {np.__version__}, "
          f"{os.cpu_count()} CPUs visible, 1 thread; preset {config.name} (max_image_size {config.max_image_size})")
    results: dict[str, dict[str, dict[str, float]]] = {}
    for width, height in args.sizes:
        jpegs = make_jpegs(height, width, args.images, args.quality)
        decoded = [decode_image(d) for d in jpegs]
        prepared = prepare_image(decoded[0], config)
        megapixels = width * height / 1e6
        mean_kb = statistics.fmean(len(d) for d in jpegs) / 1024
        key = f"{width}x{height}"
        print(f"\n{key} ({megapixels:.1f} MP, JPEG q{args.quality}, {mean_kb:.0f} KiB avg) -> "
              f"{prepared.processed_hw[1]}x{prepared.processed_hw[0]} after the resize rule")

        cases = {
            "reference": lambda i, jpegs=jpegs: np.array(Image.open(io.BytesIO(jpegs[i])).convert("RGB")),
            "decode": lambda i, jpegs=jpegs: decode_image(jpegs[i]),
            "resize": lambda i, decoded=decoded: prepare_image(decoded[i], config),
            "total": lambda i, jpegs=jpegs: prepare_image(decode_image(jpegs[i]), config),
        }
        results[key] = {}
        print(f"  {'stage':<10} {'runs':>5} {'ms mean':>9} {'ms p50':>8} {'ms p90':>8} {'images/s':>9} {'MP/s':>7}")
        for name, times in time_cases(cases, len(jpegs), args.seconds, args.min_runs).items():
            row = summarise(times, megapixels)
            results[key][name] = row
            print(f"  {name:<10} {row['runs']:>5} {row['ms_mean']:>9.2f} {row['ms_p50']:>8.2f} "
                  f"{row['ms_p90']:>8.2f} {row['images_per_s']:>9.1f} {row['megapixels_per_s']:>7.1f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"preset": config.name, "quality": args.quality, "results": results}, handle, indent=2)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
