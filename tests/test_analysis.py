"""mtl_tune.analysis: loading sweeps, completed-trial filter, Pareto dominance, hypervolume."""

import itertools
import json
import time

import numpy as np
import pandas as pd
import pytest

from mtl_tune.analysis import (
    SweepNotFoundError,
    completed_trials,
    decode_hp,
    expand_list_hps,
    hypervolume,
    hypervolume_mc,
    hypervolume_table,
    load_sweep,
    nondominated_ranks,
    pareto_front,
    pareto_mask,
    reference_point,
)
from mtl_tune.analysis.pareto import staircase
from mtl_tune.analysis.synthetic import write_baseline_sweep, write_toy_sweep
from mtl_tune.metrics import MetricSpec


def brute_force_mask(y: np.ndarray) -> np.ndarray:
    """O(n²) reference: row i is kept iff no row j dominates it (minimisation)."""
    n = len(y)
    keep = np.isfinite(y).all(axis=1)
    for i in range(n):
        if not keep[i]:
            continue
        for j in range(n):
            if j != i and np.isfinite(y[j]).all() and (y[j] <= y[i]).all() and (y[j] < y[i]).any():
                keep[i] = False
                break
    return keep


# --------------------------------------------------------------------------- Pareto
def test_pareto_mask_hand_case_with_duplicates_nan_and_directions():
    pts = np.array([
        [1.0, 5.0],   # 0 front
        [2.0, 3.0],   # 1 front
        [3.0, 1.0],   # 2 front
        [2.0, 4.0],   # 3 dominated by 1
        [2.0, 3.0],   # 4 duplicate of 1: kept
        [np.nan, 0.0],  # 5 non-finite: excluded and dominates nothing
        [3.0, 3.0],   # 6 dominated by 1
        [1.0, 5.0],   # 7 duplicate of 0: kept
    ])
    expected = [True, True, True, False, True, False, False, True]
    assert pareto_mask(pts, ["min", "min"]).tolist() == expected
    # the same set with the second objective to be maximised: negate it and ask for "max"
    flipped = pts * [1, -1]
    assert pareto_mask(flipped, ["min", "max"]).tolist() == expected
    # (max, max) on negated points is the same problem
    assert pareto_mask(-pts, ["max", "max"]).tolist() == expected


def test_pareto_mask_accepts_dataframes_and_checks_modes():
    df = pd.DataFrame({"a": [1.0, 2.0, 0.5, 0.4], "b": [1.0, 0.5, 2.0, 0.4]})
    assert pareto_mask(df, ["min", "min"]).tolist() == [False, False, False, True]
    assert pareto_mask(df, ["max", "max"]).tolist() == [True, True, True, False]
    assert pareto_mask(df, ["max", "min"]).tolist() == [False, True, False, True]
    with pytest.raises(ValueError, match="modes"):
        pareto_mask(df, ["min"])
    with pytest.raises(ValueError, match="'min' or 'max'"):
        pareto_mask(df, ["min", "up"])
    assert pareto_mask(np.zeros((0, 3)), ["min"] * 3).tolist() == []


@pytest.mark.parametrize("d", [2, 3, 5, 12, 40])
def test_pareto_mask_matches_brute_force_and_is_order_invariant(d):
    rng = np.random.default_rng(d)
    # small integer grid → many ties and exact duplicates
    y = rng.integers(0, 4, size=(120, d)).astype(float)
    y[rng.integers(0, 120, 5), rng.integers(0, d, 5)] = np.nan
    mask = pareto_mask(y, ["min"] * d)
    np.testing.assert_array_equal(mask, brute_force_mask(y))
    perm = rng.permutation(len(y))
    np.testing.assert_array_equal(pareto_mask(y[perm], ["min"] * d), mask[perm])


def test_pareto_mask_is_fast_for_thousands_of_rows_and_many_objectives():
    rng = np.random.default_rng(0)
    y = rng.normal(size=(2000, 40))  # in 40-D almost every point is non-dominated (worst case)
    start = time.perf_counter()
    mask = pareto_mask(y, ["min"] * 40)
    assert time.perf_counter() - start < 5.0
    assert mask.sum() > 1900
    y2 = rng.normal(size=(20000, 2))
    start = time.perf_counter()
    m2 = pareto_mask(y2, ["min", "min"])
    assert time.perf_counter() - start < 2.0
    # the 2-D front of a sample is its lower-left staircase: sorted by x, y strictly decreases
    f = y2[m2][np.argsort(y2[m2][:, 0])]
    assert (np.diff(f[:, 1]) < 0).all()


def test_nondominated_ranks_peels_fronts():
    pts = np.array([[1, 1], [2, 2], [3, 3], [1, 3], [3, 1], [np.inf, 0]], dtype=float)
    assert nondominated_ranks(pts, ["min", "min"]).tolist() == [0, 1, 2, 1, 1, -1]


def test_staircase_vertices():
    st = staircase(np.array([[3.0, 1.0], [1.0, 3.0], [2.0, 2.0]]))
    np.testing.assert_array_equal(st, [[1, 3], [2, 3], [2, 2], [3, 2], [3, 1]])


# --------------------------------------------------------------------------- hypervolume
def test_hypervolume_2d_hand_computed():
    pts = np.array([[1.0, 3.0], [2.0, 2.0], [3.0, 1.0]])
    # staircase columns: x∈[1,2] height 1, [2,3] height 2, [3,4] height 3
    assert hypervolume(pts, ["min", "min"], [4.0, 4.0]) == pytest.approx(6.0)
    # dominated points, duplicates and points beyond the reference change nothing
    more = np.vstack([pts, [[2.5, 2.5], [2.0, 2.0], [5.0, 0.0], [np.nan, 1.0]]])
    assert hypervolume(more, ["min", "min"], [4.0, 4.0]) == pytest.approx(6.0)
    assert hypervolume(np.array([[5.0, 5.0]]), ["min", "min"], [4.0, 4.0]) == 0.0
    # one point = its box
    assert hypervolume(np.array([[1.0, 2.0]]), ["min", "min"], [3.0, 5.0]) == pytest.approx(6.0)


def test_hypervolume_3d_inclusion_exclusion():
    pts = np.array([[1.0, 2.0, 3.0], [2.0, 3.0, 1.0], [3.0, 1.0, 2.0]])
    # boxes 6 + 6 + 6, pairwise overlaps 2 + 2 + 2, triple overlap 1 → 18 − 6 + 1
    assert hypervolume(pts, ["min"] * 3, [4.0, 4.0, 4.0]) == pytest.approx(13.0)
    # 4-D: unit-gap corner points of the hypercube [0, 2]^4 missing one coordinate each
    pts4 = 2.0 - np.eye(4)  # point i = 1 in objective i, 2 elsewhere; ref 2 → boxes are slabs of width 0
    assert hypervolume(pts4, ["min"] * 4, [2.0] * 4) == 0.0
    pts4 = np.ones((1, 4)) * 0.5
    assert hypervolume(pts4, ["min"] * 4, [1.0] * 4) == pytest.approx(0.5 ** 4)


def test_hypervolume_sign_normalisation():
    rng = np.random.default_rng(1)
    pts = rng.random((30, 3))
    ref = np.array([1.2, -0.1, 1.1])
    mixed = pts * [1, -1, 1]  # second objective maximised, in raw units
    assert hypervolume(mixed, ["min", "max", "min"], ref) == pytest.approx(
        hypervolume(pts, ["min"] * 3, ref * [1, -1, 1]))


@pytest.mark.parametrize("d,n", [(2, 200), (3, 80), (4, 40), (5, 25)])
def test_hypervolume_matches_optuna_wfg(d, n):
    hv_mod = pytest.importorskip("optuna._hypervolume")
    rng = np.random.default_rng(d * 100 + n)
    pts = rng.random((n, d))
    ref = np.full(d, 1.1)
    assert hypervolume(pts, ["min"] * d, ref) == pytest.approx(hv_mod.compute_hypervolume(pts, ref), rel=1e-12)


def test_hypervolume_monte_carlo_agrees_within_its_error():
    rng = np.random.default_rng(5)
    pts = rng.random((20, 4))
    exact = hypervolume(pts, ["min"] * 4, [1.0] * 4)
    est, se = hypervolume_mc(pts, ["min"] * 4, [1.0] * 4, n_samples=100_000, seed=3)
    assert abs(est - exact) < 4 * se
    assert hypervolume_mc(pts, ["min"] * 4, [1.0] * 4, n_samples=10_000, seed=3) == \
        hypervolume_mc(pts, ["min"] * 4, [1.0] * 4, n_samples=10_000, seed=3)


def test_toy_front_bounds_the_hypervolume_of_any_attainable_points(tmp_path):
    from mtl_tune.benchmarks.toy import INITS, pareto_front as toy_front, toy_objectives
    import torch

    ref = reference_point(["val/loss1", "val/loss2"], "toy")
    np.testing.assert_array_equal(ref, [0.0, 0.0])
    hv_front = hypervolume(toy_front(n=4001), ["min", "min"], ref)
    assert hv_front == pytest.approx(hypervolume(toy_front(n=2001), ["min", "min"], ref), rel=1e-3)
    # the front is the boundary of the attainable set: random x's never beat it
    x = torch.tensor(np.random.default_rng(0).uniform(-10, 10, size=(5000, 2)))
    losses = toy_objectives(x).numpy()
    assert hypervolume(losses, ["min", "min"], ref) <= hv_front + 1e-9
    inits = toy_objectives(torch.tensor(INITS, dtype=torch.float64)).numpy()
    assert hypervolume(inits, ["min", "min"], ref) < hv_front


def test_reference_point_rules():
    specs = [MetricSpec("seg/miou", "seg", True, 74.0, True), MetricSpec("depth/abs_err", "depth", False, 0.0125, True),
             MetricSpec("x", "x", False)]
    ref = reference_point(["val/seg/miou", "test/depth/abs_err", "val/delta_m"], "cityscapes", specs)
    np.testing.assert_allclose(ref, [0.0, 0.025, 100.0])  # +100 % relative drop in every metric
    assert reference_point(["val/x"], "b", specs, overrides={"x": 3.0}).tolist() == [3.0]
    with pytest.raises(ValueError, match="'val/x'"):
        reference_point(["val/x"], "b", specs)


def test_hypervolume_table_ignores_unfinished_trials_by_default(tmp_path):
    df = load_sweep(write_toy_sweep(tmp_path / "toy"))
    metrics, modes = ["val/loss1", "val/loss2"], ["min", "min"]
    ref = reference_point(metrics, "toy")
    base = hypervolume_table(df, metrics, modes, ref)
    cheat = df.iloc[[0]].copy()
    cheat[["status", "trial_id", "val/loss1", "val/loss2"]] = ["STOPPED_EARLY", "cheat", -5.0, -50.0]
    df2 = pd.concat([df, cheat], ignore_index=True)
    same = hypervolume_table(df2, metrics, modes, ref)
    pd.testing.assert_frame_equal(base, same)
    wider = hypervolume_table(df2, metrics, modes, ref, include_incomplete=True)
    assert wider.loc["(all)", "hypervolume"] == pytest.approx(250.0)  # the cheat's box dominates everything
    # the union's HV is at least every method's HV
    assert (base["hypervolume"] <= base.loc["(all)", "hypervolume"] + 1e-12).all()


# --------------------------------------------------------------------------- loading
def test_load_sweep_reads_table_and_meta(tmp_path):
    path = write_toy_sweep(tmp_path / "toy", n_per_method=6)
    df = load_sweep(path)
    assert len(df) == 18 and set(df["method"]) == {"ls", "famo", "cagrad"}
    assert df.attrs["sweeps"]["toy-demo"]["objective"]["metrics"] == ["val/loss1", "val/loss2"]
    assert df["error"].map(type).eq(str).all() and (df.loc[df.status == "TERMINATED", "error"] == "").all()
    assert df["synthetic"].dtype == bool and df["diverged"].isin([0, 1]).all()
    # a trials.csv path works too, and several sweeps concatenate with their own names
    both = load_sweep([path / "trials.csv", write_baseline_sweep(tmp_path / "city", n_per_method=4)])
    assert both.groupby("sweep").size().to_dict() == {"city-demo": 12, "toy-demo": 18}
    assert set(both.attrs["sweeps"]) == {"city-demo", "toy-demo"}


def test_load_sweep_errors_name_the_path(tmp_path):
    with pytest.raises(SweepNotFoundError, match="nope"):
        load_sweep(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SweepNotFoundError, match="empty"):
        load_sweep(tmp_path / "empty")


def test_completed_trials_applies_each_condition():
    df = pd.DataFrame({
        "trial_id": list("abcdef"),
        "status": ["TERMINATED", "ERROR", "TERMINATED", "TERMINATED", "STOPPED_EARLY", "terminated"],
        "diverged": [0, 0, 1, 0, 0, 0],
        "epochs": [5, 5, 5, 5, 5, 5],
        "training_iteration": [5, 5, 5, 3, 2, 6],
    })
    assert completed_trials(df)["trial_id"].tolist() == ["a", "f"]
    assert len(completed_trials(df, include_incomplete=True)) == 6
    # a condition whose column is missing is not applied
    assert completed_trials(df[["trial_id", "status"]])["trial_id"].tolist() == ["a", "c", "d", "f"]


def test_pareto_front_of_a_sweep_uses_completed_trials_only(tmp_path):
    df = load_sweep(write_toy_sweep(tmp_path / "toy"))
    front = pareto_front(df, ["val/loss1", "val/loss2"], ["min", "min"])
    assert (front["status"] == "TERMINATED").all()
    assert front["val/loss1"].is_monotonic_increasing and front["val/loss2"].is_monotonic_decreasing
    with pytest.raises(KeyError, match="val/nope"):
        pareto_front(df, ["val/loss1", "val/nope"], ["min", "min"])


def test_expand_list_hps_and_empty_table(tmp_path):
    df = pd.DataFrame({"hp/task_weights": ["[0.5, 1.5]", "[2.0, 0.0]", None], "hp/c": [0.1, 0.2, 0.3], "x": [1, 2, 3]})
    out = expand_list_hps(df)
    assert list(out.columns) == ["hp/task_weights[0]", "hp/task_weights[1]", "hp/c", "x"]
    np.testing.assert_array_equal(out["hp/task_weights[1]"].to_numpy(), [1.5, 0.0, np.nan])
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "trials.csv").write_text("")
    with pytest.raises(SweepNotFoundError, match="is empty"):
        load_sweep(tmp_path / "s")


def test_decode_hp_json_lists():
    assert decode_hp("[1.0, 2.0]") == [1.0, 2.0]
    assert decode_hp(json.dumps({"0": 0.5})) == {"0": 0.5}
    assert decode_hp(0.3) == 0.3 and decode_hp("[broken") == "[broken"


def test_pareto_mask_small_exhaustive_invariance():
    # every 3-point configuration on a 3×3 grid: the mask never depends on row order
    grid = list(itertools.product(range(3), range(3)))
    for trio in itertools.combinations(grid, 3):
        y = np.array(trio, dtype=float)
        m = pareto_mask(y, ["min", "min"])
        np.testing.assert_array_equal(m, brute_force_mask(y))
        np.testing.assert_array_equal(pareto_mask(y[::-1], ["min", "min"]), m[::-1])
