"""Compute precision of DELG models in this process: "fp32" (default) or "bf16" (bfloat16 compute, float32 outputs).

bf16 turns on TensorFlow's Grappler pass `auto_mixed_precision_onednn_bfloat16`: when a graph is optimised,
ops that oneDNN runs well in bfloat16 (convolutions, matmuls and the element-wise ops between them) are
rewritten to bfloat16 with casts at the edges; reductions, softplus, NMS, the GeM power and every output stay
float32. The pass also rewrites the keypoint box arithmetic; `LoadedDelgModel.run` restores the exact float32
boxes and scales afterwards (loader.exact_receptive_geometry). It works on any DELG SavedModel (TF2 signature
or TF1 graph, ours or the official ones) because it rewrites the loaded graph, not the model code. It is a
process-wide TensorFlow setting that applies to graphs optimised after it is set, so it is set here, at model
load, before the model's first call; a process therefore runs ONE precision and refuses a model of the other
(a job's output is one precision).

`check_precision(p)` says in one line why p cannot be used here (without changing anything);
`check_precision(p, here=False)` only whether p is a known precision (a launcher whose workers run elsewhere:
their CPUs are judged where the model loads); `use_precision(p)` checks and applies it, and is what a worker
runs at model load, so a worker whose CPU cannot run bf16 fails its model load with that one line rather than
running another precision than the output's. No Beam.
"""

from __future__ import annotations

import logging
import os
import socket
import threading

from beam_job.config import PRECISIONS

_LOGGER = logging.getLogger(__name__)
# CPU flags (Linux /proc/cpuinfo) of the native bfloat16 instructions oneDNN uses for bf16 convolutions.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
_GRAPPLER_PASS = "auto_mixed_precision_onednn_bfloat16"

_LOCK = threading.Lock()
_process_precision: str | None = None


def with_precision(identity: str, precision: str) -> str:
    """A model identity as recorded in outputs: unchanged in fp32, "<identity>+bf16" in bf16."""
    return identity if precision == "fp32" else f"{identity}+{precision}"


def cpu_flags() -> set:
    """The CPU's feature flags (Linux /proc/cpuinfo), empty where unreadable."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), "unknown CPU" where unreadable."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return "unknown CPU"


def _no_bf16_cpu() -> str | None:
    """None when this machine's CPU has a native bfloat16 flag, else the one-line refusal naming what it lacks."""
    flags = cpu_flags()
    if flags & set(BF16_CPU_FLAGS):
        return None
    lacks = ("lacks the CPU flags avx512_bf16 and amx_bf16" if flags else
             "has no readable CPU flags (/proc/cpuinfo), so neither avx512_bf16 nor amx_bf16 is known to be there")
    return (
        f"--precision bf16 needs a CPU with native bfloat16: this machine (host {socket.gethostname()}, "
        f"{cpu_model_name()}) {lacks}; run bf16 on CPUs with them (for speed amx_bf16: Intel Sapphire Rapids and "
        "later, e.g. Dataflow c3/c4/n4; check with benchmarks/bench_cpu_bf16.py) or use --precision fp32"
    )


def check_precision(precision: str, *, here: bool = True) -> str | None:
    """None when `precision` can run in this process, else a one-line reason (what to change).

    here=False: only whether `precision` is a known one. For a launcher whose workers run on other machines (a
    remote runner): this machine's CPU and environment say nothing about theirs, and each worker runs the full
    check when it loads the model (use_precision).
    """
    if precision not in PRECISIONS:
        return f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}"
    if precision == "fp32" or not here:
        return None
    if os.environ.get("TF_ENABLE_ONEDNN_OPTS", "").strip().lower() in ("0", "false"):
        return ("--precision bf16 needs TensorFlow's oneDNN CPU kernels: unset TF_ENABLE_ONEDNN_OPTS=0 or use "
                "--precision fp32")
    return _no_bf16_cpu()


def bf16_speed_note(precision: str) -> str | None:
    """A one-line caution when bf16 will run on avx512_bf16 kernels only (no AMX), else None.

    Without AMX, oneDNN's bf16 convolutions use `vdpbf16ps`, whose speed against fp32 depends on the core: on
    the Emerald Rapids VM this was measured on (AMX not exposed), it multiplies bf16 at 0.49x the fp32 rate and
    the R50 ran 1.3-2x slower in bf16; on a Xeon with AMX (amx_bf16) the R50 ran in 0.49x (ours) and 0.60x
    (official graph) of the fp32 time (docs/performance.md). Allowed, since other cores differ; said once.
    """
    if precision != "bf16" or "amx_bf16" in cpu_flags():
        return None
    return ("--precision bf16 on a CPU without AMX runs oneDNN's avx512_bf16 kernels, which are slower than fp32 "
            "on some cores (measured 1.3-2x slower on an Intel Xeon without AMX, 0.5-0.6x the fp32 time with AMX): "
            "check this machine type with benchmarks/bench_cpu_bf16.py")


def use_precision(precision: str) -> None:
    """Check `precision` and set it for this process before a model graph is built; ValueError (one line) if not.

    This is the check that counts on a worker: a CPU without native bfloat16 raises here, at model load, and
    the job fails with that line. There is deliberately no fallback to fp32: an output holds one precision
    (the model identity says "+bf16"), so a worker quietly computing fp32 rows would mix two in it.
    """
    global _process_precision
    problem = check_precision(precision)
    if problem:
        raise ValueError(problem)
    with _LOCK:
        if _process_precision is not None and _process_precision != precision:
            raise ValueError(
                f"this process already runs DELG models in {_process_precision}; a {precision} model needs a "
                "process of its own (the bfloat16 rewrite is process-wide)"
            )
        if precision == "bf16":
            import tensorflow as tf

            if tf.config.list_physical_devices("GPU"):
                raise ValueError(
                    "--precision bf16 is implemented for CPU workers (oneDNN); this process sees a GPU, "
                    "where the model runs in fp32: use --precision fp32"
                )
            tf.config.optimizer.set_experimental_options({_GRAPPLER_PASS: True})
            note = bf16_speed_note(precision)
            if _process_precision is None and note:
                _LOGGER.warning(note)
        _process_precision = precision
