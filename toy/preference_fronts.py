"""Preference fronts on the toy: every method with a preference argument, run for the preference
grid of ``python -m mtl_tune.search --preferences N``, measured against the exact front.

For each method and start point the N end points (one per preference vector) form the method's
front. Per method the table gives:

* ``mean dist.`` / ``max dist.``: distance of the end points to the exact front in objective space
  (:func:`mtl_tune.benchmarks.toy.pareto_distance`);
* ``spread``: the part of the Pareto set x₁ ∈ [−7, 7] between the two extreme end points, as a
  fraction (each end point placed at the x₁ of its nearest front point): 1 = the preferences reach
  both ends of the front, 0 = every preference ends at the same point;
* ``distinct``: how many of the N end points are more than 0.05 apart in objective space;
* ``HV``: hypervolume of the end points over the reference point (nadir of the front + 10 % of its
  range), relative to the sampled front's own hypervolume (1 = the whole front).

The toy's losses are negative; methods without a ``min_losses`` argument see them shifted by the
loss floor (−2.1, −21) (docs/toy.md#toy-adaptations-every-method-is-run-or-listed-with-its-reason),
so an ideal point z = (0, 0) given to ``stch`` and ``pbi`` *is* that floor, just below the
single-task minima (−2.0, −20.0).

    python -m toy.preference_fronts --preferences 5 --inits 1,4 --iters 10000 --lr 3e-3 --workers 2
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from mtl_tune.benchmarks.toy import INITS, pareto_distance, pareto_front, pareto_set
from .common import EngineConfig, MethodSpec, protocol_hparams
from .parallel import run_all
from .report import trajectory_losses

#: the methods compared, with the fixed hyperparameters their preference sweep runs with on the toy
METHODS: dict[str, dict[str, Any]] = {
    "ls": {},
    "amtl": {},
    "stch": {"ideal": [0.0, 0.0]},          # the paper's raw-loss form, z = the loss floor
    "stch-log": {},                          # the official log/nadir form (warm-up: 5 toy epochs)
    "pbi": {"ideal": [0.0, 0.0]},
    "epo": {},
    "pmgda": {},
    "paretomtl": {},                         # u_k = the preference, 5 quarter-circle references (official)
    "paretomtl-long": {"init_steps": 10000},  # phase 1 until inside the subregion (the official 20 steps are too few here)
}
#: end points closer than this in objective space count as one (the gallery's "on the front" tolerance)
DISTINCT = 0.05


def specs_for(methods: Sequence[str], grid: Sequence[Sequence[float]], iters: int, scale: float) -> list[MethodSpec]:
    from mtl_tune.search.compare import preference_arg  # (imports the search layer: only when run)

    specs = []
    for label in methods:
        name = label.split("-")[0]
        arg = preference_arg(name)
        if arg is None:
            raise ValueError(f"{name} has no preference argument")
        for pref in grid:
            hp = {**protocol_hparams(name, scale), **METHODS[label], arg: list(pref)}
            specs.append(MethodSpec(f"{label}[{pref[0]:.3g},{pref[1]:.3g}]", name, hp, iters))
    return specs


def front_metrics(ends: np.ndarray, scale: float) -> dict[str, float]:
    """The per-method columns of the module docstring for end points (N, 2)."""
    from mtl_tune.analysis.hypervolume import hypervolume

    front, xs = pareto_front(scale, 2001), pareto_set(2001)[:, 0]
    ok = np.isfinite(ends).all(1)
    pts = ends[ok]
    dist = pareto_distance(pts, scale)
    nearest = np.sqrt(((pts[:, None, :] - front[None]) ** 2).sum(-1)).argmin(1)
    spread = (xs[nearest].max() - xs[nearest].min()) / (xs[-1] - xs[0]) if len(pts) else 0.0
    distinct = 0
    for i in range(len(pts)):
        if all(np.linalg.norm(pts[i] - pts[j]) > DISTINCT for j in range(i)):
            distinct += 1
    ref = front.max(0) + 0.1 * (front.max(0) - front.min(0))
    hv_front = hypervolume(front, ["min", "min"], ref)
    return {"mean dist.": float(dist.mean()) if len(pts) else np.nan, "max dist.": float(dist.max()) if len(pts) else np.nan,
            "spread": float(spread), "distinct": distinct, "HV": hypervolume(pts, ["min", "min"], ref) / hv_front,
            "failed": int((~ok).sum())}


def run_fronts(methods: Sequence[str], n_prefs: int, inits: Sequence[int], iters: int, cfg: EngineConfig,
               workers: int = 1) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(per-method rows, per-run rows)."""
    from mtl_tune.search.compare import simplex_grid

    grid = simplex_grid(2, n_prefs)
    specs = specs_for(methods, grid, iters, cfg.scale)
    results = run_all(specs, inits, cfg, workers)
    runs, ends = [], {}
    for res in results:
        label = res.label.split("[")[0]
        end = trajectory_losses(res.traj[-1:], cfg.scale)[0] if res.status == "ok" and len(res.traj) else \
            np.full(2, np.nan)
        ends.setdefault((label, res.init_index), []).append(end)
        runs.append({"run": res.label, "init": res.init_index, "status": res.status, "L1": end[0], "L2": end[1],
                     "dist.": float(pareto_distance(end, cfg.scale)) if np.isfinite(end).all() else np.nan,
                     "reason": res.reason})
    rows = [{"method": label, "init": init, **front_metrics(np.array(pts), cfg.scale)}
            for (label, init), pts in ends.items()]
    return rows, runs


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    cols = ["method", "init", "mean dist.", "max dist.", "spread", "distinct", "HV", "failed"]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        x0 = INITS[r["init"]]
        cells = [r["method"], f"{r['init']} ({x0[0]:g}, {x0[1]:g})"]
        cells += [f"{r[c]:.2g}" if isinstance(r[c], float) else str(r[c]) for c in cols[2:]]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m toy.preference_fronts", description=__doc__.split("\n")[0])
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {list(METHODS)}")
    p.add_argument("--preferences", type=int, default=5, help="about this many preference vectors (Das–Dennis)")
    p.add_argument("--inits", default="1,4", help="indices into the papers' five inits")
    p.add_argument("--iters", type=int, default=10000)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--runs", action="store_true", help="also print every run's end point")
    args = p.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        p.error(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    start = time.perf_counter()
    rows, runs = run_fronts(methods, args.preferences, [int(i) for i in args.inits.split(",")], args.iters,
                            EngineConfig(lr=args.lr), args.workers)
    print(markdown(rows))
    if args.runs:
        for r in runs:
            print(r)
    print(f"({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
