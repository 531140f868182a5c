"""Gradient methods against the official step structure: CPU time and peak memory, paired.

The baseline (``official``) is written here with the structure of the methods' public code
(Nash-MTL / FAMO / LibMTL trainers): zero_grad, forward, **K separate backward passes** over all
parameters (``retain_graph=True``), after each one the shared gradients copied into a freshly
allocated **P×K matrix** (``grad2vec``) and zeroed, the K×K Gram matrix ``GᵀG`` in float32, the
method's weights, the combination ``G w`` written back into ``.grad`` (``overwrite_grad``), and
Adam's step. The heads accumulate Σ ℓᵢ over the K passes, as there. Its weights come from MGDA's
solver (``official``) or, for GradDrop, from GradDrop's element-wise masking on the K×P matrix
(``official:graddrop``): what separates the methods' official steps is this P-sized work, not their
K-dimensional solvers (≈ 1 ms).

Every other entry is this project's ``balancer.train_step`` (the trainer's step) with
``gradient_path`` as chosen automatically (``--path`` forces one); ``ls`` is the floor.

Per entry and repetition, in one process, interleaved in a new random order each repetition:
the process CPU time of the step (``--threads 1``: robust to other jobs on the machine) and the
peak RSS increment of the step: RSS high-water mark (``VmHWM``, reset by writing 5 to
``/proc/self/clear_refs``) minus the RSS right before the step, after ``malloc_trim(0)`` handed
freed heap pages back. Ratios are medians of per-repetition paired ratios.
"""

from __future__ import annotations

import argparse
import ctypes
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402
import torch  # noqa: E402
from peak_memory import _proc_status  # noqa: E402

from mtl_tune.balancers.graddrop import graddrop_multipliers  # noqa: E402

try:
    from mtl_tune.balancers.base import choose_gradient_path  # noqa: E402
except ImportError:  # a checkout without gradient paths
    choose_gradient_path = None
from mtl_tune.balancers.mgda import mgda_weights  # noqa: E402
from mtl_tune.registry import balancer_class  # noqa: E402

GRADIENT_METHODS = "mgda,cagrad,imtl,nashmtl,fairgrad,pivrg,pcgrad,gradvac,amtl,graddrop"
MiB = 2**20

try:
    _LIBC = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc: no trimming, RSS increments then under-count reused memory
    _LIBC = None


def official_runner(w: c.Workload, combination: str) -> c.Runner:
    """The official step structure (module docstring); ``combination`` is "mgda" or "graddrop"."""
    setup = w.setup
    shared = [p for p in setup.shared_parameters if p.requires_grad]
    k = w.n_tasks
    gen = torch.Generator().manual_seed(0)

    def step(r: c.Runner) -> torch.Tensor:
        r.optimizer.zero_grad(set_to_none=True)
        losses = w.forward().losses
        grads = torch.empty(sum(p.numel() for p in shared), k)  # per step, as grad2vec's caller does
        for i in range(k):
            losses[i].backward(retain_graph=i < k - 1)
            offset = 0
            for p in shared:
                n = p.numel()
                if p.grad is not None:
                    grads[offset:offset + n, i].copy_(p.grad.reshape(-1))
                    p.grad.zero_()
                else:
                    grads[offset:offset + n, i].zero_()
                offset += n
        if combination == "graddrop":
            jac = grads.T
            mult = graddrop_multipliers(jac, torch.rand(jac.shape[1], generator=gen), 0.0)
            g = (mult * jac).sum(0)
        else:
            gtg = grads.T @ grads
            weights = mgda_weights(gtg.double()).to(grads.dtype) * k
            g = grads @ weights
        offset = 0
        for p in shared:  # overwrite_grad
            n = p.numel()
            p.grad = g[offset:offset + n].view_as(p).clone()
            offset += n
        r.optimizer.step()
        return losses.detach()

    return c.Runner("official" if combination == "mgda" else "official:graddrop", w, step, None,
                    c.make_optimizer(w), "baseline", c.state_copy(setup.model))


def measure(runners: list[c.Runner], reps: int, warmup: int, seed: int = 0
            ) -> tuple[dict[str, dict[int, float]], dict[str, dict[int, float]], dict[str, str]]:
    """CPU seconds and peak-RSS increments (bytes) per entry and repetition (module docstring)."""
    rng = random.Random(seed)
    times: dict[str, dict[int, float]] = {r.name: {} for r in runners}
    peaks: dict[str, dict[int, float]] = {r.name: {} for r in runners}
    errors: dict[str, str] = {}
    live = list(runners)
    for rep in range(warmup + reps):
        if rep == warmup:
            for r in live:
                c.prime_epoch_hooks(r)
        order = live[:]
        rng.shuffle(order)
        for r in order:
            r.swap_in()
            if _LIBC is not None:
                _LIBC.malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            before = _proc_status("VmRSS")
            start = time.process_time()
            try:
                r.step(r)
            except Exception as err:  # noqa: BLE001 — reported in the table, never dropped silently
                errors[r.name] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
                live.remove(r)
                continue
            elapsed = time.process_time() - start
            peak = _proc_status("VmHWM") - before
            r.swap_out()
            if rep >= warmup:
                times[r.name][rep - warmup], peaks[r.name][rep - warmup] = elapsed, peak
    return times, peaks, errors


def paired(a: dict[int, float], b: dict[int, float]) -> float:
    pairs = [a[i] / b[i] for i in a if i in b and b[i] > 0]
    return statistics.median(pairs) if pairs else float("nan")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    c.add_workload_args(p)
    p.add_argument("--methods", default=GRADIENT_METHODS,
                   help="comma list; name@path forces a gradient path (jacobian/gram), name@path:engine also "
                        "the Jacobian engine (auto/batched/loop), e.g. mgda@jacobian:loop")
    p.add_argument("--path", choices=("auto", "jacobian", "gram"), default="auto",
                   help="force every method's gradient path (graddrop always takes the Jacobian)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-baseline", action="store_true", help="skip the official entries (memory-only runs)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    for entry in args.methods.split(","):  # before any work: one usage line and exit 2
        spec, _, engine = entry.strip().partition(":")
        forced = spec.partition("@")[2]
        if forced not in ("", "auto", "jacobian", "gram") or engine not in ("", "auto", "batched", "loop"):
            p.error(f"--methods entry {entry.strip()!r}: name[@auto|jacobian|gram][:auto|batched|loop]")
    load0 = c.load_average()
    w = c.load_workload(args)
    names = c.method_names(",".join(e.partition("@")[0].partition(":")[0] for e in args.methods.split(",")))
    runners = [c.method_runner(w, "ls")]
    if not args.no_baseline:
        runners.append(official_runner(w, "mgda"))
        if "graddrop" in names:
            runners.append(official_runner(w, "graddrop"))
    for entry in args.methods.split(","):
        # "mgda@gram": this method on a forced path; "mgda@jacobian:loop" also on a forced Jacobian engine
        spec, _, engine = entry.strip().partition(":")
        name, _, forced = spec.partition("@")
        path = forced or args.path
        supports = getattr(balancer_class(name), "supports_gram", False) or name == "nashmtl"
        hp = {"gradient_path": path} if path != "auto" and supports else {}
        try:
            runner = c.method_runner(w, name, hp, jacobian_mode=engine or "auto")
        except TypeError:  # a checkout without gradient paths (the "today" column of docs/performance.md)
            runner = c.method_runner(w, name)
        runner.name = entry.strip()
        runners.append(runner)
    times, peaks, errors = measure(runners, args.reps, args.warmup, args.seed)
    jac_mib = w.n_tasks * sum(q.numel() for q in w.setup.shared_parameters) * 4 / MiB
    ls_peak = statistics.median(peaks["ls"].values()) if peaks["ls"] else float("nan")
    rows = []
    for r in runners:
        if r.name in errors:
            rows.append([r.name, r.kind, "—", "—", "—", "—", "—", "—", errors[r.name]])
            continue
        base = "official:graddrop" if r.name.startswith("graddrop") and "official:graddrop" in times else "official"
        path = getattr(r.balancer, "gradient_path", "—") if r.balancer is not None else "—"
        if path == "auto":
            sh = [q for q in w.setup.shared_parameters if q.requires_grad]
            path = "auto→" + (r.balancer.path_for(torch.zeros(w.n_tasks, device=w.device), sh) if hasattr(r.balancer, "path_for")
                              else choose_gradient_path(w.n_tasks, sum(q.numel() * q.element_size() for q in sh),
                                                        r.balancer.engine.can_stream_gram(w.device)))
        # memory the method keeps between steps (the engine's reusable Jacobian buffer) is resident
        # before the step, so it is added here: the figure is step increment + kept buffer
        buf = getattr(getattr(r.balancer, "engine", None), "_buffer", None)
        kept = 0 if buf is None else buf.numel() * buf.element_size()
        peak = statistics.median(peaks[r.name].values()) + kept
        rows.append([r.name, path, c.fmt(statistics.median(times[r.name].values()) * 1e3, 0),
                     c.fmt(paired(times[r.name], times["ls"])),
                     c.fmt(paired(times[r.name], times[base])) if base in times else "—",
                     c.fmt(peak / MiB, 0), c.fmt((peak - ls_peak) / MiB, 0),
                     c.fmt(peak / statistics.median(peaks[base].values())) if base in peaks else "—",
                     f"incl. {kept / MiB:.0f} MiB kept Jacobian buffer" if kept else ""])
    header = ["entry", "gradient path", "CPU ms/step (median)", "× ls", "× official", "step memory MiB",
              "extra over ls MiB", "memory × official", "notes"]
    extra = (f"workload: {w.label}; K×P Jacobian = {jac_mib:.0f} MiB float32; {args.reps} reps after "
             f"{args.warmup} warm-up, interleaved; CPU clock; ratios = medians of paired per-rep ratios")
    text = "\n".join(f"- {line}" for line in c.context_lines(w.device, load0, extra))
    c.emit(text + "\n\n" + c.markdown_table(header, rows), args.out)


if __name__ == "__main__":
    main()
