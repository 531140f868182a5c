"""Peak memory of a training step, per method, each method in a fresh process.

Every method runs in its own child process (same workload flags as ``step_time.py``): build
the model, batch, balancer and optimizer, then run ``--steps`` training steps
(``balancer.train_step``) and record

* **CUDA**: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` — the
  caching allocator's peak of live tensors (not the reserved pool, not the CUDA context).
* **CPU**: the process's peak resident set size, ``VmHWM`` of ``/proc/self/status``, reset
  to the current RSS right before the steps by writing ``5`` to ``/proc/self/clear_refs``
  (Linux ≥ 4.0); without it, ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (not resettable).
  ``tracemalloc`` is not used: it only sees Python's allocator, not torch's tensor memory.

Columns: memory before the steps (model, data, Python/torch), the peak during the steps,
the step's peak increment over "before" (activations, gradients, Adam's moments — created
at the first step — the K×P Jacobian, solver temporaries), that increment as a ratio to
``ls``'s, and what stays allocated after the steps. A fresh process per method keeps
allocator caches of one method from hiding the next one's peak.

Examples::

    python bench/peak_memory.py                       # MLP (width 1024) on CPU, every method
    python bench/peak_memory.py --benchmark nyuv2 --synthetic --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as c  # noqa: E402  (sets OMP_WAIT_POLICY before torch loads)
import torch  # noqa: E402

MB = 2.0 ** 20
#: STGU's steady state (affinity propagation every batch), as in step_time.py
BENCH_HPARAMS = {"stgu": {"prepos": 0}}


def _proc_status(key: str) -> float:
    """A ``/proc/self/status`` field in bytes (the file reports kB)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return float(line.split()[1]) * 1024
    raise KeyError(key)


def reset_cpu_peak() -> str:
    """Reset the peak-RSS counter; returns the name of the measure in use."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return "VmHWM"
    except OSError:
        return "ru_maxrss"


def cpu_peak(measure: str) -> float:
    if measure == "VmHWM":
        return _proc_status("VmHWM")
    import resource

    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports kB


def child(args: argparse.Namespace) -> dict[str, object]:
    """Measure one method in this (fresh) process; returns bytes."""
    import gc

    w = c.load_workload(args)
    runner = c.method_runner(w, args.child, BENCH_HPARAMS.get(args.child), args.jacobian_mode)
    gc.collect()
    cuda = w.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(w.device)
        torch.cuda.reset_peak_memory_stats(w.device)
        before, measure = float(torch.cuda.memory_allocated(w.device)), "max_memory_allocated"
    else:
        measure = reset_cpu_peak()
        before = _proc_status("VmRSS")
    for _ in range(args.steps):
        runner.step(runner)
    if cuda:
        torch.cuda.synchronize(w.device)
        peak, after = float(torch.cuda.max_memory_allocated(w.device)), float(torch.cuda.memory_allocated(w.device))
    else:
        peak, after = cpu_peak(measure), _proc_status("VmRSS")
    n_shared = sum(p.numel() for p in w.setup.shared_parameters)
    return {"method": args.child, "kind": runner.kind, "before": before, "peak": peak, "after": after,
            "measure": measure, "label": w.label, "jacobian_bytes": 4.0 * w.n_tasks * n_shared}


def run_child(argv: list[str], method: str, timeout: float) -> dict[str, object]:
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--child", method]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"method": method, "error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        return {"method": method, "error": (tail[-1] if tail else f"exit code {proc.returncode}")[:200]}
    return json.loads(lines[-1])


def rows_for(results: list[dict[str, object]]) -> list[list[str]]:
    ls = next((r for r in results if r["method"] == "ls" and "error" not in r), None)
    ls_inc = (float(ls["peak"]) - float(ls["before"])) if ls else float("nan")
    rows = []
    for r in results:
        if "error" in r:
            rows.append([str(r["method"]), "—", "—", "—", "—", "—", "—", f"FAILED: {r['error']}"])
            continue
        inc = float(r["peak"]) - float(r["before"])
        rows.append([str(r["method"]), str(r["kind"]), c.fmt(float(r["before"]) / MB, 1), c.fmt(float(r["peak"]) / MB, 1),
                     c.fmt(inc / MB, 1), c.fmt(inc / ls_inc if ls_inc > 0 else float("nan")),
                     c.fmt((float(r["after"]) - float(r["before"])) / MB, 1), ""])
    return rows


HEADER = ["method", "kind", "before MiB", "peak MiB", "step increment MiB", "× ls increment",
          "kept after MiB", "notes"]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_workload_args(p, width=1024)
    p.add_argument("--methods", default="all", help="comma-separated registry names (default: all)")
    p.add_argument("--steps", type=int, default=3, help="training steps measured per method")
    p.add_argument("--jacobian-mode", default="auto", choices=("auto", "batched", "loop"))
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per method")
    p.add_argument("--out", help="also write the Markdown to this file")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    if args.threads:  # only for the caption: the children set their own
        torch.set_num_threads(args.threads)
    load0 = c.load_average()
    names = c.method_names(args.methods)
    names = ["ls"] + [n for n in names if n != "ls"]
    results = [run_child(argv, n, args.timeout) for n in names]
    ok = [r for r in results if "error" not in r]
    measure = str(ok[0]["measure"]) if ok else "?"
    what = {"max_memory_allocated": "torch.cuda.max_memory_allocated (live tensors)",
            "VmHWM": "peak RSS (/proc/self/status VmHWM, reset before the steps)",
            "ru_maxrss": "peak RSS (resource ru_maxrss, not resettable: includes the build)"}.get(measure, measure)
    jac = f"; K×P Jacobian = {float(ok[0]['jacobian_bytes']) / MB:.1f} MiB in float32" if ok else ""
    device = c.resolve_device(args.device)
    caption = c.context_lines(device, load0, f"workload: {ok[0]['label'] if ok else args.benchmark}; "
                                             f"{args.steps} steps per method, one process per method; measure: {what}{jac}")
    c.emit("\n".join(f"- {line}" for line in caption) + "\n\n" + c.markdown_table(HEADER, rows_for(results)), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
