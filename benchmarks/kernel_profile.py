"""Where a benchmark case's device time goes: one call traced with `jax.profiler`, its GPU kernels
summed by kind (convolutions, matmuls, attention, reductions, other fusions) and by name.

    python benchmarks/bench.py --cases=sample_b16 --profile=/tmp/prof   # the summary joins the JSON row

`busy_ms` is the time at least one kernel runs, `window_ms` the span from the first kernel's start to
the last one's end: a busy share well below 1 means the device waits for the host (launches).
`small` counts the kernels shorter than `SMALL_US`: each also costs a launch gap of about 2 µs inside
a command buffer (the txt2img sampling loop: 264 of 751 kernels per step, session 14).
"""
import collections
import glob
import gzip
import json
import os

KINDS = (  # first match wins; names of cuDNN, cuBLAS and XLA's fusions on Hopper
    ("attention", ("sdpa", "flash", "fmha")),
    ("convolution", ("xmma_fprop", "xmma_dgrad", "xmma_wgrad", "implicit_gemm", "convolution")),
    ("matmul", ("nvjet", "gemm", "cutlass", "cublas")),
    ("reduction", ("reduce",)),
    ("memory", ("memset", "memcpy")),
)
SMALL_US = 4.0


def kind(name):
    low = name.lower()
    for label, keys in KINDS:
        if any(k in low for k in keys):
            return label
    return "elementwise/other"


def summarize(trace_path, top=12):
    """Kernel times (ms) of a `*.trace.json.gz` by kind and the `top` kernels by total time."""
    with gzip.open(trace_path, "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    devices = {pid for pid, name in names.items() if "/device:" in name}
    total, count, spans, small = collections.Counter(), collections.Counter(), [], []
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in devices and "dur" in e:
            total[e["name"]] += e["dur"]
            count[e["name"]] += 1
            spans.append((e["ts"], e["ts"] + e["dur"]))
            if e["dur"] < SMALL_US:
                small.append(e["dur"])
    busy, end = 0.0, float("-inf")
    for start, stop in sorted(spans):
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    by_kind = collections.Counter()
    for name, us in total.items():
        by_kind[kind(name)] += us
    ms = lambda us: round(us / 1e3, 3)  # noqa: E731
    return dict(kernels=sum(count.values()), kernel_ms=ms(sum(total.values())), busy_ms=ms(busy),
                window_ms=ms(max(s for _, s in spans) - min(s for s, _ in spans)) if spans else 0.0,
                small=dict(kernels=len(small), ms=ms(sum(small))),
                by_kind={k: ms(v) for k, v in by_kind.most_common()},
                top=[dict(name=n[:120], ms=ms(us), calls=count[n]) for n, us in total.most_common(top)])


def profile(fn, log_dir):
    """Run fn() once under the profiler (fn must block until its work is done); its summary."""
    import jax

    with jax.profiler.trace(log_dir):
        fn()
    paths = sorted(glob.glob(os.path.join(log_dir, "**", "*.trace.json.gz"), recursive=True), key=os.path.getmtime)
    if not paths:
        raise RuntimeError(f"the profiler wrote no trace under {log_dir}")
    return summarize(paths[-1])
