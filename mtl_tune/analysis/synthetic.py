"""Write small synthetic sweeps in the exact ``trials.csv`` + ``sweep.json`` format (tests, demos).

Nothing here trains a model: values are drawn so that the analysis has something known
to find. :func:`write_toy_sweep` puts trials on or above the toy problem's true front
(so the Pareto front and the hypervolume are bounded by the known answer);
:func:`write_baseline_sweep` writes a two-task benchmark with STL baselines so that
Δm%, mean rank and the variance–performance analysis apply. Both include ERROR,
STOPPED_EARLY and DIVERGED trials, which :func:`~mtl_tune.analysis.completed_trials`
must drop. Every row has ``synthetic = True``.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from mtl_tune.metrics import MetricSpec, delta_m

METHOD_HPS = {"ls": {}, "famo": {"gamma": (1e-5, 1e-1), "w_lr": (5e-3, 1e-1)}, "cagrad": {"c": (0.0, 1.0)}}

CITY_LIKE = (
    MetricSpec("seg/miou", "seg", True, 74.01, True), MetricSpec("seg/pixacc", "seg", True, 93.16),
    MetricSpec("depth/abs_err", "depth", False, 0.0125, True), MetricSpec("depth/rel_err", "depth", False, 27.77),
)


def _hps(method: str, rng: np.random.Generator) -> dict[str, float | str]:
    """One random configuration; ls gets a 2-task ``task_weights`` simplex as JSON text, like the search writes it."""
    out: dict[str, float | str] = {}
    if method == "ls":
        w = float(rng.uniform(0.0, 2.0))
        out["task_weights"] = json.dumps([w, 2.0 - w])
    for name, (lo, hi) in METHOD_HPS[method].items():
        out[name] = float(np.exp(rng.uniform(np.log(lo), np.log(hi)))) if lo > 0 else float(rng.uniform(lo, hi))
    return out


def _statuses(n: int, rng: np.random.Generator) -> list[str]:
    """Mostly TERMINATED; a fixed handful of failure kinds so every code path is exercised."""
    st = ["TERMINATED"] * n
    for i, s in zip(rng.choice(n, size=min(3, n), replace=False), ("ERROR", "STOPPED_EARLY", "DIVERGED")):
        st[int(i)] = s
    return st


def _base_row(sweep: str, bench: str, method: str, i: int, status: str, seed: int, epochs: int) -> dict:
    done = epochs if status in ("TERMINATED", "DIVERGED") else max(1, epochs // 2)
    return {"sweep": sweep, "benchmark": bench, "method": method, "trial_id": f"{method}_{i:04d}", "status": status,
            "error": {"ERROR": "RuntimeError: synthetic failure", "DIVERGED": "DivergedError: non-finite loss"}.get(status, ""),
            "seed": seed, "epochs": epochs, "training_iteration": done}


def _write(path: Path, rows: list[dict], meta: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(path / "trials.csv", index=False)
    (path / "sweep.json").write_text(json.dumps(meta, indent=2))
    return path


def write_toy_sweep(path: str | Path, n_per_method: int = 12, seed: int = 0, name: str = "toy-demo") -> Path:
    """A toy sweep: ``val/loss1``, ``val/loss2`` on or above the true front, objective both (min, min)."""
    from mtl_tune.benchmarks.toy import pareto_distance, pareto_front

    rng = np.random.default_rng(seed)
    front = pareto_front(n=401)
    rows = []
    for m, method in enumerate(METHOD_HPS):
        statuses = _statuses(n_per_method, rng)
        for j in range(n_per_method):
            i = m * n_per_method + j
            p = front[rng.integers(len(front))]
            # above/right of the front (dominated region), exactly on it for one trial in four
            gap = 0.0 if j % 4 == 0 else rng.exponential([0.15, 1.5])
            losses = p + gap
            if j % 3 == 0:  # one configuration, three seeds
                hps = _hps(method, rng)
            row = _base_row(name, "toy", method, i, statuses[j], seed=j % 3, epochs=5)
            row.update({f"hp/{k}": v for k, v in hps.items()})
            row.update({"val/loss1": losses[0], "val/loss2": losses[1],
                        "val/pareto_distance": float(pareto_distance(losses)),
                        "train/loss/task1": losses[0], "train/loss/task2": losses[1],
                        "weights/task1": 1.0, "weights/task2": 1.0, "solver_failures": 0,
                        "diverged": int(statuses[j] == "DIVERGED"), "synthetic": True,
                        "time_total_s": float(rng.uniform(1, 5)), "logdir": ""})
            if statuses[j] == "DIVERGED":
                row.update({"val/loss1": 1e6, "val/loss2": 1e6, "val/pareto_distance": 1e6})
            rows.append(row)
    meta = {"name": name, "benchmark": "toy", "methods": list(METHOD_HPS),
            "objective": {"metrics": ["val/loss1", "val/loss2"], "modes": ["min", "min"]},
            "metric_specs": [{"name": "loss1", "task": "task1", "higher_is_better": False, "baseline": None, "primary": True},
                             {"name": "loss2", "task": "task2", "higher_is_better": False, "baseline": None, "primary": True},
                             {"name": "pareto_distance", "task": "all", "higher_is_better": False, "baseline": None,
                              "primary": False}],
            "tasks": ["task1", "task2"], "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "args": {"synthetic": True, "seed": seed}}
    return _write(Path(path), rows, meta)


def write_baseline_sweep(path: str | Path, n_per_method: int = 8, seed: int = 1, name: str = "city-demo") -> Path:
    """A two-task sweep with STL baselines (Cityscapes-like metrics), objective ``val/delta_m`` (min)."""
    rng = np.random.default_rng(seed)
    quality = {"ls": 1.0, "famo": 0.5, "cagrad": 0.7}  # larger = worse on depth, on average
    rows = []
    for m, method in enumerate(METHOD_HPS):
        statuses = _statuses(n_per_method, rng)
        for j in range(n_per_method):
            i = m * n_per_method + j
            depth = quality[method] * rng.uniform(0.05, 0.5)
            seg = rng.normal(0.0, 0.02)
            vals = {"seg/miou": 74.01 * (1 - seg), "seg/pixacc": 93.16 * (1 - seg / 3),
                    "depth/abs_err": 0.0125 * (1 + depth), "depth/rel_err": 27.77 * (1 + 1.5 * depth)}
            if j % 2 == 0:  # one configuration, two seeds
                hps = _hps(method, rng)
            row = _base_row(name, "city_like", method, i, statuses[j], seed=j % 2, epochs=4)
            row.update({f"hp/{k}": v for k, v in hps.items()})
            for split, jitter in (("val", 0.01), ("test_last10", 0.0)):
                v = {k: x * (1 + rng.normal(0, jitter)) for k, x in vals.items()}
                row.update({f"{split}/{k}": x for k, x in v.items()})
                row[f"{split}/delta_m"] = delta_m(v, CITY_LIKE)
            row.update({"train/loss/seg": 0.5, "train/loss/depth": 0.02, "weights/seg": 1.0, "weights/depth": 1.0,
                        "solver_failures": int(method == "cagrad" and j == 1), "diverged": int(statuses[j] == "DIVERGED"),
                        "synthetic": True, "time_total_s": float(rng.uniform(10, 50)), "logdir": ""})
            rows.append(row)
    meta = {"name": name, "benchmark": "city_like", "methods": list(METHOD_HPS),
            "objective": {"metrics": ["val/delta_m"], "modes": ["min"]},
            "metric_specs": [{"name": s.name, "task": s.task, "higher_is_better": s.higher_is_better,
                              "baseline": s.baseline, "primary": s.primary} for s in CITY_LIKE],
            "tasks": ["seg", "depth"], "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "args": {"synthetic": True, "seed": seed}}
    return _write(Path(path), rows, meta)
