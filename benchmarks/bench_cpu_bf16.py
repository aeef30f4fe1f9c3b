"""Can bfloat16 pay on this CPU? Peak multiply-add rates of the instructions, then TensorFlow's kernels, fp32 vs bf16.

`--precision bf16` only saves time where the CPU multiplies bf16 faster than fp32. This prints, side by side:

  instructions   multiply-adds per second of AVX-512 `vfmadd231ps` (fp32, 16 per instruction) and
                 `vdpbf16ps` (bf16 pairs into fp32, 32 per instruction), in 28 independent chains so that
                 latency does not hide throughput (a 30-line C loop compiled with gcc; skipped without gcc
                 or without avx512_bf16)
  TensorFlow     a 4096x4096 matmul and a 3x3 256->256 convolution on a 192x256 map, fp32 and bf16 inputs,
                 best of 5 after one warm-up (oneDNN picks its kernel: see ONEDNN_VERBOSE=1)

and the CPU's name and bf16-related flags (avx512_bf16, amx_bf16, amx_tile). oneDNN's fast bf16 path on
Intel is AMX; with avx512_bf16 alone the answer depends on the core, which is what this measures.

  python benchmarks/bench_cpu_bf16.py
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time

_CHAINS = 28  # independent accumulators: zmm2..zmm29
_C_TEMPLATE = r"""
#include <stdio.h>
#include <time.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }
#define LOOPS 30000000L
int main(void) {
  double best_f = 1e9, best_b = 1e9;
  for (int rep = 0; rep < 3; rep++) {
    double t0 = now();
    for (long i = 0; i < LOOPS; i++) { __asm__ volatile(FMA_BODY ::: CLOBBERS); }
    double t1 = now();
    for (long i = 0; i < LOOPS; i++) { __asm__ volatile(BF16_BODY ::: CLOBBERS); }
    double t2 = now();
    if (t1 - t0 < best_f) best_f = t1 - t0;
    if (t2 - t1 < best_b) best_b = t2 - t1;
  }
  printf("%.6e %.6e\n", (double)LOOPS * CHAINS * 16 / best_f, (double)LOOPS * CHAINS * 32 / best_b);
  return 0;
}
"""


def cpu_description() -> dict:
    """Model name, family and model numbers, and the bf16-related flags (beam_job.delg.precision.cpu_flags)."""
    from beam_job.delg.precision import cpu_flags

    info = {"model": "unknown", "family_model": ""}
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and info["model"] == "unknown":
                    info["model"] = value.strip()
                if key.strip() in ("cpu family", "model") and len(info["family_model"].split()) < 4:
                    info["family_model"] += f" {key.strip()} {value.strip()}"
                if key.strip() == "flags":
                    break
    except OSError:
        pass
    info["flags"] = sorted(cpu_flags() & {"avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile"})
    return info


def instruction_peaks() -> dict:
    """Multiply-adds/s of vfmadd231ps and vdpbf16ps on one core, or {"skipped": why}."""
    if shutil.which("gcc") is None:
        return {"skipped": "no gcc"}
    if "avx512_bf16" not in cpu_description()["flags"]:
        return {"skipped": "no avx512_bf16"}
    regs = range(2, 2 + _CHAINS)

    def body(instruction: str) -> str:
        return '"' + "\\n".join(f"{instruction} %%zmm0, %%zmm1, %%zmm{r}" for r in regs) + '"'

    source = (f"#define CHAINS {_CHAINS}\n#define FMA_BODY {body('vfmadd231ps')}\n"
              f"#define BF16_BODY {body('vdpbf16ps')}\n#define CLOBBERS " + ", ".join(f'"xmm{r}"' for r in regs)
              + "\n" + _C_TEMPLATE)
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = os.path.join(tmp, "peak.c"), os.path.join(tmp, "peak")
        with open(src, "w") as handle:
            handle.write(source)
        build = subprocess.run(["gcc", "-O1", "-mavx512f", "-mavx512bf16", src, "-o", exe], capture_output=True,
                               text=True)
        if build.returncode != 0:
            return {"skipped": "gcc failed: " + build.stderr.strip().splitlines()[-1]}
        fp32, bf16 = map(float, subprocess.run([exe], capture_output=True, text=True, check=True).stdout.split())
    return {"fp32_mac_per_s": fp32, "bf16_mac_per_s": bf16, "ratio": bf16 / fp32}


def tensorflow_rates() -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    def best(fn, *args, n=5):
        fn(*args).numpy()
        times = []
        for _ in range(n):
            t = time.perf_counter()
            fn(*args).numpy()
            times.append(time.perf_counter() - t)
        return min(times)

    matmul = tf.function(lambda a, b: tf.matmul(a, b))
    conv = tf.function(lambda x, w: tf.nn.relu(tf.nn.conv2d(x, w, 1, "SAME")))
    a = tf.random.normal((4096, 4096), seed=1)
    x, w = tf.random.normal((1, 192, 256, 256), seed=2), tf.random.normal((3, 3, 256, 256), seed=3)
    out = {}
    for name, fn, args, flops in (("matmul 4096", matmul, (a, a), 2 * 4096**3),
                                  ("conv3x3 256", conv, (x, w), 2 * 192 * 256 * 256 * 256 * 9)):
        t32 = best(fn, *args)
        t16 = best(fn, *[tf.cast(v, tf.bfloat16) for v in args])
        out[name] = {"fp32_s": t32, "bf16_s": t16, "fp32_gflops": flops / t32 / 1e9, "bf16_gflops": flops / t16 / 1e9,
                     "bf16_time_ratio": t16 / t32}
    return out


def main() -> int:
    cpu = cpu_description()
    flags = ", ".join(cpu["flags"]) or "none of interest"
    print(f"CPU: {cpu['model']} ({cpu['family_model'].strip()}); {os.cpu_count()} CPUs; flags: {flags}; "
          f"1-min load {os.getloadavg()[0]:.1f}")
    peaks = instruction_peaks()
    if "skipped" in peaks:
        print(f"instruction peaks: skipped ({peaks['skipped']})")
    else:
        print(f"instruction peaks, one core: fp32 FMA {peaks['fp32_mac_per_s'] / 1e9:.1f} G multiply-adds/s, "
              f"bf16 dot {peaks['bf16_mac_per_s'] / 1e9:.1f} G/s: bf16 / fp32 = {peaks['ratio']:.2f}x")
    rates = tensorflow_rates()
    for name, r in rates.items():
        print(f"TensorFlow {name}: fp32 {r['fp32_s'] * 1e3:.0f} ms ({r['fp32_gflops']:.0f} GFLOP/s), bf16 "
              f"{r['bf16_s'] * 1e3:.0f} ms ({r['bf16_gflops']:.0f} GFLOP/s): bf16 takes {r['bf16_time_ratio']:.2f}x "
              "the fp32 time")
    # The verdict follows TensorFlow's convolution, where DELG spends its time: the AVX-512 instruction peaks
    # above miss AMX, whose tile kernels oneDNN uses for bf16 where the CPU exposes amx_bf16.
    conv = rates["conv3x3 256"]["bf16_time_ratio"]
    amx = "amx_bf16" in cpu["flags"]
    if conv <= 0.7:
        verdict = f"bf16 pays here: a 3x3 convolution takes {conv:.2f}x the fp32 time" + (" (AMX)" if amx else "")
    else:
        verdict = (f"bf16 cannot pay here: a 3x3 convolution takes {conv:.2f}x the fp32 time"
                   + ("" if amx else " (no AMX: oneDNN's avx512_bf16 kernels)"))
    print(f"verdict: {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
