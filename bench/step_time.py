"""Time one training step of every registered method, side by side, as ratios to ``ls``.

One step = what the trainer does per batch: ``balancer.train_step`` (zero_grad, forward,
balancer backward, optimizer step, and FAMO's post-step forward / STGU's group steps).
All methods run on the same model object and the same batch (moved to the device once),
each with its own balancer, optimizer and copy of the model state (swapped in and out
outside the timed region), interleaved: after ``--warmup`` untimed repetitions, each of
``--reps`` repetitions runs every entry once in a freshly shuffled order. Reported: the
median step time, its interquartile range, and ratios as the median of the *paired*
per-repetition ratios (robust to load drifting during the run).

Floors, measured in the same run (what a method cannot avoid):

* ``floor:jac`` — forward + the K per-task gradients of the shared parameters (the
  Jacobian engine, as the methods use it). Gradient methods: step / floor target ≤ 1.10.
* ``floor:jac-loop`` — the same with the loop engine (is the batched engine the right
  choice on this device?).
* ``floor:null-grad`` — a complete gradient-method step whose "solver" is the plain sum
  of the rows: forward, Jacobian, write ``.grad``, heads backward, optimizer step. Its
  ratio isolates the solver + bookkeeping cost of a gradient method.
* ``floor:ls+fwd`` — an ``ls`` step plus one no-grad forward: FAMO's design cost.
* ``floor:rep`` — forward, K gradients w.r.t. the representation z, heads backward, one
  trunk backward of z, optimizer step: MGDA-UB / Aligned-MTL-UB's design cost.

Loss methods: step / ls target ≤ 1.05 (FAMO: step / floor:ls+fwd). Solver time: the
solver entry point of each method (``solve`` of Nash-MTL, ``fair_weights`` of the FairGrad
family, else ``combine``/``combine_representation``) is wrapped to time it; on CUDA the
wrapper synchronises before and after (the CPU solvers copy the Gram matrix to the host,
which synchronises anyway). Nash-MTL target: solve < 5 % of its step.

Examples::

    python bench/step_time.py                                  # MLP on CPU, every method
    python bench/step_time.py --benchmark multi_mnist --synthetic
    python bench/step_time.py --benchmark nyuv2 --synthetic --device cuda --reps 30
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as c  # noqa: E402  (sets OMP_WAIT_POLICY before torch loads)
import torch  # noqa: E402

from mtl_tune.balancers.base import accumulate_grad  # noqa: E402
from mtl_tune.jacobian import JacobianEngine  # noqa: E402

#: solver entry points, first match wins (see the module docstring)
SOLVER_HOOKS = ("solve", "fair_weights", "combine_representation", "combine")
LOSS_TARGET, GRAD_TARGET, NASH_SHARE_TARGET = 1.05, 1.10, 0.05
#: timing defaults that differ from the methods' own: STGU's steady state (after warm-up
#: batches it runs affinity propagation every batch; its first ``prepos`` + 1 batches do not)
BENCH_HPARAMS: dict[str, dict[str, Any]] = {"stgu": {"prepos": 0}}


def _heads(w: c.Workload) -> list[torch.Tensor]:
    return [p for group in w.setup.task_parameters for p in group if p.requires_grad]


def _shared(w: c.Workload) -> list[torch.Tensor]:
    return [p for p in w.setup.shared_parameters if p.requires_grad]


def floor_runners(w: c.Workload, jacobian_mode: str) -> list[c.Runner]:
    """The reference steps listed in the module docstring."""
    engine, loop = JacobianEngine(jacobian_mode), JacobianEngine("loop")
    shared, heads, model = _shared(w), _heads(w), w.setup.model

    def jac(r: c.Runner, eng: JacobianEngine = engine) -> None:
        model.zero_grad(set_to_none=True)
        eng.jacobian(w.forward().losses, shared)

    def null_grad(r: c.Runner) -> None:
        r.optimizer.zero_grad(set_to_none=True)
        out = w.forward()
        accumulate_grad(shared, engine.jacobian(out.losses, shared, retain_graph=bool(heads)).sum(0))
        if heads:
            out.losses.sum().backward(inputs=heads)
        r.optimizer.step()

    def ls_fwd(r: c.Runner) -> None:
        r.optimizer.zero_grad(set_to_none=True)
        w.forward().losses.sum().backward()
        r.optimizer.step()
        with torch.no_grad():
            w.forward()

    def rep(r: c.Runner) -> None:
        r.optimizer.zero_grad(set_to_none=True)
        out = w.forward()
        z = out.representation
        if not isinstance(z, torch.Tensor):
            raise TypeError("the model's representation is not one tensor shared by every head")
        d_z = engine.jacobian(out.losses, [z], retain_graph=True).sum(0)
        if heads:
            torch.autograd.backward(out.losses.sum(), inputs=heads, retain_graph=True)
        torch.autograd.backward(z, grad_tensors=d_z.view_as(z), inputs=shared)
        r.optimizer.step()

    def runner(name: str, step, stateful: bool) -> c.Runner:
        return c.Runner(name, w, step, optimizer=c.make_optimizer(w) if stateful else None,
                        state=c.state_copy(model) if stateful else {})

    return [runner("floor:jac", jac, False), runner("floor:jac-loop", lambda r: jac(r, loop), False),
            runner("floor:null-grad", null_grad, True), runner("floor:ls+fwd", ls_fwd, True),
            runner("floor:rep", rep, True)]


def add_solver_clock(r: c.Runner, clock: str = "wall") -> str | None:
    """Wrap the method's solver entry point; per-step solver seconds go to ``r.solver_times``."""
    r.solver_times = []  # type: ignore[attr-defined]
    hook = next((h for h in SOLVER_HOOKS if r.balancer is not None and hasattr(r.balancer, h)), None)
    if hook is None:
        return None
    original, device, acc, now = getattr(r.balancer, hook), r.workload.device, [0.0], c.CLOCKS[clock]

    def timed(*args: Any, **kwargs: Any) -> Any:
        c.sync(device)
        start = now()
        try:
            return original(*args, **kwargs)
        finally:
            c.sync(device)
            acc[0] += now() - start

    setattr(r.balancer, hook, timed)  # instance attribute shadows the class method
    inner = r.step

    def step(run: c.Runner) -> Any:
        acc[0] = 0.0
        out = inner(run)
        run.solver_times.append(acc[0])  # type: ignore[attr-defined]
        return out

    r.step = step
    return hook


def parse_hparams(items: list[str] | None) -> dict[str, dict[str, Any]]:
    """``--set cagrad.c=0.5`` → ``{"cagrad": {"c": 0.5}}`` on top of :data:`BENCH_HPARAMS`."""
    out = {m: dict(v) for m, v in BENCH_HPARAMS.items()}
    for key, value in c.parse_kv(items).items():
        method, _, name = key.partition(".")
        if not name:
            raise SystemExit(f"--set expects method.param=value, got {key!r}")
        out.setdefault(method, {})[name] = value
    return out


def target_for(r: c.Runner) -> tuple[str | None, float | None, str]:
    """(floor entry, target ratio, note) for a method runner."""
    name, kind = r.name, r.kind
    if name == "ls":
        return None, None, "reference"
    if kind == "loss":
        if r.balancer.needs_post_step_losses:
            return "floor:ls+fwd", LOSS_TARGET, "one extra no-grad forward by design"
        if r.balancer.needs_meta_batch:
            return "ls", None, "meta step: 2 more backward passes, 2 forwards with graph + 2 without, by design"
        return "ls", LOSS_TARGET, ""
    if kind == "gradient":
        note = "+K create-graph and 2K head gradients by design" if name == "consmtl" else ""
        return "floor:jac", GRAD_TARGET, note
    if kind == "representation":
        return "floor:rep", GRAD_TARGET, ""
    if kind == "training-loop":
        return "ls", None, "M grouped optimizer steps (+1 forward) per batch by design"
    return "ls", None, "K last-layer gradients + 1 backward by design"


def verdict(ratio: float, target: float | None) -> str:
    if target is None or ratio != ratio:
        return "—"
    return f"≤ {target:.2f} {'✓' if ratio <= target else '✗ missed'}"


def build_rows(methods: list[c.Runner], floors: list[c.Runner], t: c.Timings, warmup: int,
               hparams: dict[str, dict[str, Any]] | None = None) -> list[list[str]]:
    rows = []
    for r in floors:
        err = t.errors.get(r.name, "")
        rows.append([r.name, "floor", c.fmt(t.median(r.name) * 1e3), c.fmt(t.iqr(r.name) * 1e3),
                     c.fmt(t.ratio(r.name, "ls")), "", "", "", "", "", "", err])
    for r in methods:
        floor, target, note = target_for(r)
        notes = [note] if note else []
        if (hparams or {}).get(r.name):
            notes.append("with " + ", ".join(f"{k}={v}" for k, v in hparams[r.name].items()))
        if r.name in t.errors:
            rows.append([r.name, r.kind] + ["—"] * 9 + [f"FAILED: {t.errors[r.name]}"])
            continue
        failures = getattr(getattr(r.balancer, "failures", None), "total", 0)
        if failures:
            notes.append(f"{failures} solver failures")
        if getattr(r.balancer, "gradient_path", None) == "auto" and hasattr(r.balancer, "path_for"):
            w = r.workload  # which path "auto" took on this model and device (the note says it per entry)
            shared = [q for q in w.setup.shared_parameters if q.requires_grad]
            notes.append(f"auto: {r.balancer.path_for(torch.zeros(w.n_tasks, device=w.device), shared)} path")
        engine = getattr(r.balancer, "engine", None)
        if engine is not None and r.balancer.needs_jacobian and engine.fell_back:
            notes.append("Jacobian engine fell back to the loop")
        if t.warnings.get(r.name):
            notes.append(f"{len(t.warnings[r.name])} warnings, e.g. {t.warnings[r.name][0]!r}")
        ratio = t.ratio(r.name, floor) if floor else float("nan")
        null = t.ratio(r.name, "floor:null-grad") if r.kind == "gradient" else float("nan")
        solver = getattr(r, "solver_times", [])[warmup:]
        solver_ms = c.fmt(1e3 * sorted(solver)[len(solver) // 2], 3) if solver else "—"
        share = "—"
        if solver:
            steps = [t.times[r.name][i] for i in range(len(solver)) if i in t.times[r.name]]
            shares = sorted(s / st for s, st in zip(solver, steps) if st > 0)
            share_v = shares[len(shares) // 2] if shares else float("nan")
            share = f"{100 * share_v:.1f} %"
            if r.name == "nashmtl":
                share += f" (< {100 * NASH_SHARE_TARGET:.0f} % {'✓' if share_v < NASH_SHARE_TARGET else '✗ missed'})"
        rows.append([r.name, r.kind, c.fmt(t.median(r.name) * 1e3), c.fmt(t.iqr(r.name) * 1e3),
                     c.fmt(t.ratio(r.name, "ls")), floor or "—", c.fmt(ratio), verdict(ratio, target), c.fmt(null),
                     solver_ms, share, "; ".join(notes)])
    return rows


HEADER = ["entry", "kind", "ms/step (median)", "IQR ms", "× ls", "floor", "× floor", "target", "× null-grad",
          "solver ms", "solver share", "notes"]
ORDER = {"loss": 0, "gradient": 1, "representation": 2, "last-layer grads": 3, "training-loop": 4}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_workload_args(p)
    p.add_argument("--methods", default="all", help="comma-separated registry names (default: all)")
    p.add_argument("--reps", type=int, default=30, help="timed repetitions (median over them)")
    p.add_argument("--warmup", type=int, default=5, help="untimed repetitions first")
    p.add_argument("--jacobian-mode", default="auto", choices=("auto", "batched", "loop"))
    p.add_argument("--set", action="append", metavar="METHOD.PARAM=V", help="method hyperparameter override")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall time, or process CPU time (shared CPU machines, with --threads 1)")
    p.add_argument("--no-solver-clock", action="store_true", help="do not wrap the solvers (no solver columns)")
    p.add_argument("--out", help="also write the Markdown to this file")
    args = p.parse_args(argv)
    load0 = c.load_average()
    w = c.load_workload(args)
    names = c.method_names(args.methods)
    names = ["ls"] + [n for n in names if n != "ls"]  # the reference always runs
    hparams = parse_hparams(args.set)
    methods, build_errors = [], {}
    for name in names:
        try:
            methods.append(c.method_runner(w, name, hparams.get(name), args.jacobian_mode))
        except Exception as err:  # noqa: BLE001 — reported as a row, never dropped
            build_errors[name] = f"{type(err).__name__}: {err}"
    if not args.no_solver_clock:
        for r in methods:
            add_solver_clock(r, args.clock)
    floors = floor_runners(w, args.jacobian_mode)
    timings = c.interleaved(floors + methods, args.reps, args.warmup, args.seed, after_warmup=c.prime_epoch_hooks,
                            clock=args.clock)
    methods.sort(key=lambda r: (r.name != "ls", ORDER.get(r.kind, 9), r.name))
    rows = build_rows(methods, floors, timings, args.warmup, hparams)
    rows += [[n, "—"] + ["—"] * 9 + [f"FAILED to build: {e}"] for n, e in build_errors.items()]
    caption = c.context_lines(w.device, load0, f"workload: {w.label}; {args.reps} reps after {args.warmup} warm-up, "
                                               f"interleaved; {args.clock} clock; ratios = median of paired per-rep ratios")
    c.emit("\n".join(f"- {line}" for line in caption) + "\n\n" + c.markdown_table(HEADER, rows), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
