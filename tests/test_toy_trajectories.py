"""Toy two-task trajectories (toy/): known answers of the problem, the engine and the papers' pictures.

Paper claims are checked with lr 1e-2 and a few thousand steps where the statement still
holds at that speed (the search default of the Toy benchmark covers the papers' distance
ten times faster); the papers' own protocol (lr 1e-3, 35 000 steps) is in the slow tests.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from mtl_tune.benchmarks.toy import INITS, pareto_distance, pareto_front, pareto_set, toy_objectives
from mtl_tune.registry import available_balancers
from toy.common import KnownJacobian
from toy.engine import EngineConfig, MethodSpec, protocol_hparams, run_lockstep, run_method, run_reference
from toy.landscape import F_MIN, FrontDistance, first_within, gap_scores, toy_value_and_jacobian, toy_values
from toy.parallel import run_all
from toy.report import load_search_trials, non_dominated, summarize, summarize_all
from toy.trajectories import build_specs, main, parse_sets, run_trajectories, split_methods

# LS weight of f1 when L1 = 0.1·f1, L2 = f2 (docs/benchmarks.md#toy-pareto-set-and-front)
W_LS = 0.1 / 1.1
X1_LS = 7 * (2 * W_LS - 1)           # = −5.727: the weighted-sum optimum LS converges to


def needs(*names: str) -> None:
    missing = [n for n in names if n not in available_balancers()]
    if missing:
        pytest.skip(f"not registered yet: {missing}")


def spec(name: str, iters: int, label: str | None = None, scale: float = 0.1, **hp) -> MethodSpec:
    return MethodSpec(label or name, name, {**protocol_hparams(name, scale), **hp}, iters)


def run(name: str, inits, iters: int, lr: float = 1e-2, scale: float = 0.1, **hp):
    cfg = EngineConfig(lr=lr, scale=scale)
    return run_method(spec(name, iters, scale=scale, **hp), list(inits), cfg)


def final_distance(res, scale: float = 0.1) -> float:
    end = toy_objectives(torch.from_numpy(res.traj[-1]), scale).numpy()
    return float(pareto_distance(end, scale))


# ---------------------------------------------------------------- the problem itself
@pytest.mark.parametrize("scale", [0.1, 0.5, 1.0])
def test_analytic_jacobian_matches_autograd(scale):
    rng = np.random.default_rng(1)
    pts = np.concatenate([rng.uniform(-11, 11, (500, 2)), np.array(INITS), pareto_set(21)])
    x = torch.tensor(pts, requires_grad=True)
    losses = toy_objectives(x, scale)
    g1, = torch.autograd.grad(losses[:, 0].sum(), x, retain_graph=True)
    g2, = torch.autograd.grad(losses[:, 1].sum(), x)
    vals, jac = toy_value_and_jacobian(pts, scale)
    np.testing.assert_allclose(vals, losses.detach().numpy(), atol=1e-12)
    np.testing.assert_allclose(jac[:, 0], g1.numpy(), atol=1e-11)
    np.testing.assert_allclose(jac[:, 1], g2.numpy(), atol=1e-11)


def test_losses_alone_are_the_same_floats_as_with_the_jacobian():
    """``toy_values`` (Auto-λ's finite-difference evaluations) shares the forward of
    ``toy_value_and_jacobian``: the same bits, on every branch (gates at x₂ = ±0, the log floor
    |u| ≤ ε on both branches, huge and non-finite points) and for any leading shape."""
    rng = np.random.default_rng(3)
    x2 = rng.normal(size=2000)
    near_u1 = np.stack([-7 - 2 * np.tanh(-x2) + rng.normal(size=2000) * 1e-6, x2], -1)   # u₁ ≈ 0
    near_u2 = np.stack([7 + 2 * np.tanh(-x2) + rng.normal(size=2000) * 1e-6, x2], -1)    # u₂ ≈ 0
    edges = np.array([[a, b] for a in (-7.0, 0.0, 7.0, 1e300, np.inf, np.nan)
                      for b in (0.0, -0.0, 1e-320, -1e-12, 40.0, -40.0, np.inf, np.nan)])
    for pts in (rng.uniform(-11, 11, (3000, 2)), near_u1, near_u2, edges, rng.normal(size=(3, 4, 2)), np.zeros(2)):
        for scale in (0.1, 1.0):
            with np.errstate(all="ignore"):
                vals, jac = toy_value_and_jacobian(pts, scale)
                alone = toy_values(pts, scale)
            assert alone.shape == vals.shape == pts.shape and jac.shape == pts.shape + (2,)
            same = (alone.view(np.int64) == vals.view(np.int64)) | (np.isnan(alone) & np.isnan(vals))
            assert same.all()


def test_gradient_at_origin_is_the_papers_kink_value():
    # docs/benchmarks.md#toy-losses: at (0, 0) ∇f1 = ∇f2 = (0, 10.856); f = 0
    vals, jac = toy_value_and_jacobian(np.zeros(2), 0.1)
    np.testing.assert_allclose(vals, [0.0, 0.0], atol=1e-15)
    np.testing.assert_allclose(jac, [[0.0, 1.0856], [0.0, 10.856]], atol=1e-3)


def test_front_distance_matches_pareto_distance_and_is_zero_on_the_front():
    rng = np.random.default_rng(2)
    pts = rng.uniform([-2.5, -21], [1, 5], (300, 2))
    np.testing.assert_allclose(FrontDistance(0.1)(pts), pareto_distance(pts, 0.1), atol=1e-12)
    np.testing.assert_allclose(FrontDistance(0.1)(pareto_front(0.1, 2001)), 0.0, atol=1e-12)
    assert F_MIN == pytest.approx(-19.98943, abs=1e-4)


def test_first_within_and_gap_scores():
    assert first_within(np.array([3.0, 2.0, 0.5, 0.1, 0.2]), 0.3) == 3
    assert first_within(np.array([3.0, 2.0]), 0.3) is None
    np.testing.assert_allclose(gap_scores(np.array([0.1 * F_MIN, F_MIN]), 0.1), [0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(gap_scores(np.zeros(2), 0.1), [100.0, 100.0])


# ---------------------------------------------------------------- the engine
@pytest.mark.parametrize("name", ["ls", "famo", "mgda", "uw", "dwa"])
def test_lockstep_path_equals_train_step_reference(name):
    """The linearised lockstep writes exactly the gradient train_step writes (incl. FAMO's post-step
    update, UW's own parameters and epoch hooks). Init (0, 0) is left out: there x1 = 0 is a
    symmetric ridge that some methods leave by rounding noise (docs/toy.md)."""
    needs(name)
    cfg = EngineConfig(lr=1e-2, epoch_steps=40)
    s = spec(name, 100)
    fast, ref = run_lockstep(s, [0, 2, 3, 4], cfg), run_reference(s, [0, 2, 3, 4], cfg)
    for a, b in zip(fast, ref):
        assert a.status == b.status == "ok", (a.reason, b.reason)
        np.testing.assert_allclose(a.traj, b.traj, atol=1e-9)
        np.testing.assert_allclose(a.final_weights, b.final_weights, rtol=1e-7, atol=1e-9)
    if name == "ls":
        assert fast[0].path == "lockstep-batched"


def test_known_jacobian_answers_other_requests_with_autograd():
    eng = KnownJacobian()
    p = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    jac = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    losses = torch.tensor([5.0, 6.0], dtype=torch.float64) + jac @ p
    eng.prime(losses, p, jac)
    assert torch.equal(eng.jacobian(losses, [p]), jac)
    other = losses.log()     # a method differentiating log-losses must get their true Jacobian
    np.testing.assert_allclose(eng.jacobian(other, [p]).numpy(), (jac / torch.tensor([[5.0], [6.0]])).numpy())


def test_cagrad_with_c_zero_is_gradient_descent_on_the_sum():
    # CAGrad paper: c = 0 recovers GD on the average gradient; ×K → the LS (sum) update
    a = run("cagrad", [0, 2, 3], 300, c=0.0)
    b = run("ls", [0, 2, 3], 300)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x.traj, y.traj, atol=1e-10)


def test_failures_are_reported_with_step_and_reason():
    # FAMO with ℓ* above the losses cannot take log(ℓ − ℓ*): the run fails at step 0 and says why
    res = run("famo", [3], 10, min_losses=[5.0, 5.0])[0]
    assert res.status == "failed" and res.iters == 0
    assert "min_losses" in res.reason and res.reason.startswith("step 0")
    assert res.traj.shape == (1, 2)
    row = summarize(res, 0.1, 0.05)
    assert row["status"] == "failed" and row["final_distance"] > 1


def test_loss_shift_lets_loss_ratio_methods_run():
    needs("gradnorm")
    raw = run_method(spec("gradnorm", 5), [3], EngineConfig(shift=False))[0]
    assert raw.status == "failed" and "positive" in raw.reason
    assert run_method(spec("gradnorm", 5), [3], EngineConfig(shift=True))[0].status == "ok"


def test_every_registered_method_runs_or_says_why():
    specs = build_specs("all", iters=20)
    results = run_all(specs, range(5), EngineConfig(lr=1e-2), workers=1)
    assert {r.label for r in results} == set(available_balancers())
    for r in results:
        assert r.status in ("ok", "skipped"), f"{r.label} init {r.init_index}: {r.reason}"
        if r.status == "skipped":
            assert len(r.reason) > 20
        else:
            assert r.traj.shape == (21, 2) and np.isfinite(r.traj).all(), r.label
    if "consmtl" in available_balancers():
        assert all(r.status == "skipped" and "heads" in r.reason for r in results if r.name == "consmtl")


def test_gallery_panel_of_a_skipped_method_says_why():
    """ConsMTL cannot run on the toy (no heads): its gallery panel carries the reason, naming the
    run that shows its shared-parameter update (fairgrad, α = 2); a method that ran gets no note."""
    from toy.plots import gallery_figure, skip_note

    cfg = EngineConfig(lr=1e-2)
    groups = {"consmtl": run_method(MethodSpec("consmtl", "consmtl", {}, 5), [0, 1], cfg),
              "ls": run_method(MethodSpec("ls", "ls", {}, 5), [0, 1], cfg)}
    assert skip_note(groups["ls"]) is None
    assert skip_note(groups["consmtl"]).startswith("skipped: needs task-specific heads")
    fig = gallery_figure(groups, cfg.scale, ncols=2)
    notes = {ax.get_title(): " ".join(t.get_text().split()) for ax in fig.axes for t in ax.texts}
    assert set(notes) == {"consmtl (skipped)"}
    assert "heads" in notes["consmtl (skipped)"] and "fairgrad:alpha=2" in notes["consmtl (skipped)"]


def test_process_pool_gives_the_same_trajectories():
    specs = build_specs("ls,mgda,famo", iters=40)
    cfg = EngineConfig(lr=1e-2)
    one, two = run_all(specs, [0, 2, 4], cfg, workers=1), run_all(specs, [0, 2, 4], cfg, workers=2)
    assert [(r.label, r.init_index) for r in one] == [(r.label, r.init_index) for r in two]
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a.traj, b.traj)
        # the pool's workers measure what the table needs (the first step within tol) themselves
        assert a.reached == b.reached and a.reached[0] == 0.05
        np.testing.assert_array_equal(a.end_loss, b.end_loss)


@pytest.mark.parametrize("tol", [0.05, 0.3, 1e-9, 0.0, float("inf")])
def test_first_within_in_chunks_is_the_first_point_of_the_full_distances(tol):
    dist = FrontDistance(0.1)
    rng = np.random.default_rng(5)
    front = pareto_front(0.1, 2001)
    far = rng.uniform([-2.5, -21], [1, 5], (3000, 2)) + 2.0             # none within tol
    near = front[rng.integers(0, 2001, 500)] + rng.normal(0, 0.2, (500, 2))
    for losses in (far, np.vstack([far, near]), np.vstack([near, far]), far[:0], front[::50]):
        expected = first_within(dist(losses), tol) if len(losses) else None
        for chunk in (1, 7, 4096):
            assert dist.first_within(losses, tol, chunk) == expected


def _worker_dies(args):
    import os
    os._exit(3)


@pytest.mark.skipif(sys.platform != "linux", reason="the patched function reaches a forked worker only")
def test_a_worker_that_dies_is_an_error_not_a_hang(monkeypatch):
    from concurrent.futures.process import BrokenProcessPool

    import toy.parallel

    monkeypatch.setattr(toy.parallel, "_run_bin", _worker_dies)
    with pytest.raises(BrokenProcessPool):   # two bins (two methods, two workers): both on the pool
        run_all(build_specs("ls,mgda", iters=5), [0, 1], EngineConfig(), workers=2)


# ---------------------------------------------------------------- what the papers show
@pytest.mark.parametrize("scale,weights,x1", [(0.1, None, X1_LS), (1.0, None, 0.0), (0.1, [10.0, 1.0], 0.0)])
def test_ls_ends_at_the_weighted_sum_optimum(scale, weights, x1):
    """LS on w·f1 + (1 − w)·f2 ends at x1 = 7(2w − 1), x2 = x2*(x1)
    (docs/benchmarks.md#toy-pareto-set-and-front),
    w = a1·s/(a1·s + a2) for task weights (a1, a2) and scale s. At the optimum Adam's steps
    (lr 3e-2) are driven by rounding noise, so the end point is the mean of the last 500 steps."""
    hp = {} if weights is None else {"task_weights": weights}
    ps = pareto_set(2001)
    for res in run("ls", [1, 3, 4], 2500, lr=3e-2, scale=scale, **hp):
        assert res.traj[-500:, 0].mean() == pytest.approx(x1, abs=2e-3)
        x2_star = np.interp(res.traj[-1, 0], ps[:, 0], ps[:, 1])
        assert res.traj[-1, 1] == pytest.approx(x2_star, abs=0.5)   # x2 is the front's flat direction
        assert final_distance(res, scale) < 1e-2   # ≈ the spacing of the sampled front


def test_ls_stalls_in_the_log_valley():
    """Papers' lr 1e-3: from (−8.5, 7.5) and (9, 9) LS is still in the log branch x2 > 0, far from the
    front, after 4 000 steps (stalling is lr-dependent: at lr 2e-2 LS escapes from (9, 9))."""
    for res in run("ls", [0, 2], 4000, lr=1e-3):
        assert res.traj[-1, 1] > 0
        assert final_distance(res) > 1.0
        assert summarize(res, 0.1, 0.05)["iters_to_tol"] == ""


@pytest.mark.parametrize("name,iters", [("mgda", 2000), ("nashmtl", 1000), ("famo", 2000)])
def test_gradient_balancing_reaches_the_front_where_ls_stalls(name, iters):
    needs(name)
    for res in run(name, [0, 2], iters, lr=2e-2):
        assert res.status == "ok" and np.isfinite(res.traj).all()
        assert final_distance(res) < 0.05, (name, res.init_index, res.traj[-1])


def test_cagrad_c_moves_the_end_point_along_the_front():
    """Larger c moves CAGrad from LS's point toward the balanced (MGDA-like) side: the end point's
    x1 rises from the LS optimum −5.73 toward 0 (CAGrad §3; docs/toy.md)."""
    ends = [run("cagrad", [3], 600, lr=5e-2, c=c)[0].traj[-1, 0] for c in (0.0, 0.4, 0.9)]
    assert ends[0] == pytest.approx(X1_LS, abs=0.01)
    assert ends[0] < ends[1] < ends[2] < 0


# ---------------------------------------------------------------- outputs and CLI
@pytest.mark.parametrize("workers", [1, 2])   # 2: the figures on a process pool, the npz by a thread
def test_run_trajectories_writes_tables_plots_and_overlay(tmp_path, workers):
    import matplotlib.image as mpimg
    import pandas as pd

    trials = tmp_path / "trials.csv"
    pd.DataFrame({"method": ["ls", "mgda", "ls", "mgda"], "val/loss1": [-1.0, -1.5, 1e6, -0.5],
                  "val/loss2": [-15.0, -10.0, 1e6, -19.0], "diverged": [0, 0, 1, 0]}).to_csv(trials, index=False)
    specs = build_specs("ls,mgda", iters=60)
    out = tmp_path / "out"
    results, rows = run_trajectories(specs, [0, 2, 3], EngineConfig(lr=1e-2), workers=workers, out=out,
                                     trials_path=trials)
    for name in ("ls.png", "mgda.png", "gallery.png", "search_overlay.png"):
        img = mpimg.imread(out / name)
        assert img.shape[0] > 200 and img.shape[1] > 200 and img[..., :3].std() > 0.05, name
    table = pd.read_csv(out / "table.csv")
    assert len(table) == 6 and set(table["status"]) == {"ok"}
    assert {"final_distance", "iters_to_tol", "x1", "x2", "L1", "L2"} <= set(table.columns)
    assert "| method | init |" in (out / "table.md").read_text()
    npz = np.load(out / "trajectories.npz")
    assert npz["mgda__init2"].shape == (61, 2)
    for r in results:
        np.testing.assert_array_equal(npz[f"{r.label}__init{r.init_index}"], r.traj)


def test_a_failing_npz_write_is_an_error_not_a_silent_gap(tmp_path, monkeypatch):
    import toy.trajectories as trajectories

    def broken(path, arrays):
        raise OSError("disk full")

    monkeypatch.setattr(trajectories, "write_npz", broken)
    with pytest.raises(OSError, match="disk full"):
        run_trajectories(build_specs("ls", iters=5), [0], EngineConfig(), workers=1, out=tmp_path, plots=False)


def test_search_trials_loading(tmp_path):
    import pandas as pd

    path = tmp_path / "t.csv"
    pd.DataFrame({"val/loss1": [-1.0, np.nan, 1e6], "val/loss2": [-15.0, -3.0, 1e6],
                  "config/scale": [0.1] * 3}).to_csv(path, index=False)
    trials = load_search_trials(path, 0.1)
    np.testing.assert_allclose(trials.points, [[-1.0, -15.0]])
    assert trials.dropped == 2 and trials.of("anything").shape == (1, 2)
    with pytest.raises(ValueError, match="scale"):
        load_search_trials(path, 0.5)
    # the search's own table: benchmark and method columns, diverged flag
    pd.DataFrame({"benchmark": ["toy", "toy", "nyuv2"], "method": ["ls", "mgda", "ls"],
                  "val/loss1": [-1.0, -2.0, 0.3], "val/loss2": [-15.0, -0.4, 0.2], "diverged": [0, 0, 0]}
                 ).to_csv(path, index=False)
    trials = load_search_trials(path, 0.1)
    assert trials.points.shape == (2, 2)
    np.testing.assert_allclose(trials.of("mgda"), [[-2.0, -0.4]])
    pd.DataFrame({"a": [1]}).to_csv(path, index=False)
    with pytest.raises(ValueError, match="val/loss1"):
        load_search_trials(path, 0.1)
    pts = np.array([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0], [0.5, 0.5]])
    assert non_dominated(pts).tolist() == [True, True, False, True]


def test_build_specs_variants_sets_and_protocol():
    specs = build_specs("famo,cagrad,cagrad:c=0.9,ls:task_weights=[1,3]", parse_sets(["cagrad.rescale=0"]))
    labels = [s.label for s in specs]
    assert labels == ["famo", "cagrad", "cagrad(c=0.9)", "ls(task_weights=[1, 3])"]
    famo, cagrad, cagrad9, ls = specs
    assert famo.iters == 50_000 and cagrad.iters == 35_000
    assert famo.hparams["gamma"] == 0.0 and famo.hparams["min_losses"] == pytest.approx([-2.1, -21.0])
    assert cagrad.hparams == {"rescale": 0} and cagrad9.hparams == {"rescale": 0, "c": 0.9}
    assert ls.hparams["task_weights"] == [1, 3]
    assert build_specs("famo", iters=10)[0].iters == 10
    assert split_methods("a,b:x=[1,2],c") == ["a", "b:x=[1,2]", "c"]
    with pytest.raises(KeyError, match="valid methods"):
        build_specs("nosuchmethod")
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        build_specs("cagrad:cc=1")
    with pytest.raises(ValueError, match="not being run"):
        build_specs("ls", parse_sets(["cagrad.c=0.1"]))
    assert "ls" not in [s.name for s in build_specs("all", exclude=["ls"])]
    # nothing left to run: an error, not an empty table written over the --out folder's
    for methods, exclude in (("", ()), (",", ()), ("famo", ["famo"])):
        with pytest.raises(ValueError, match="leaves no method to run"):
            build_specs(methods, exclude=exclude)


def test_cli_main(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["--methods", "ls,cagrad:c=0.2", "--iters", "30", "--inits", "3,4", "--workers", "1",
                 "--no-plots", "--out", str(out)]) == 0
    assert "cagrad(c=0.2)" in capsys.readouterr().out
    assert (out / "table.csv").read_text().count("\n") == 5
    # bad input: exit status 2 and the reason, as argparse's own errors
    for bad, reason in [(["--inits", "7"], "--inits must be"), (["--inits", "x"], "--inits must be"),
                        (["--scale", "0"], "--scale must be"), (["--iters", "0"], "--iters must be"),
                        (["--scale", "inf"], "--scale must be a finite number"), (["--seed", "-1"], "--seed must be"),
                        (["--inits", "0,0"], "--inits must be distinct"),
                        (["--methods", "cagrad:c=0.1:c=0.2"], "gives a parameter twice"),
                        (["--search-trials", str(tmp_path / "none.csv")], "--search-trials"),
                        (["--search-trials", str(tmp_path)], "--search-trials"),
                        (["--methods", "nosuch"], "unknown method 'nosuch'")]:
        with pytest.raises(SystemExit) as exit_info:
            main(["--methods", "ls", *bad, "--out", str(out)])
        assert exit_info.value.code == 2, bad
        assert reason in capsys.readouterr().err, bad


def test_a_run_whose_losses_overflow_is_a_failed_row_not_a_traceback(tmp_path, capsys):
    """lr 1e160 throws x to ±1e159, where the losses are inf: the k-d tree of the front distance
    refused them and the whole job (every other method's runs) ended in a traceback."""
    out = tmp_path / "huge"
    assert main(["--methods", "ls,mgda", "--iters", "20", "--lr", "1e160", "--workers", "1", "--no-plots",
                 "--out", str(out)]) == 0
    table = (out / "table.csv").read_text().splitlines()
    assert len(table) == 11 and all(",failed," in row and "non-finite" in row for row in table[1:])


def test_summaries_are_finite_for_every_row():
    rows = summarize_all(run("mgda", range(5), 50), 0.1, 0.05)
    assert all(np.isfinite([r["final_distance"], r["x1"], r["x2"], r["L1"], r["L2"]]).all() for r in rows)


# ---------------------------------------------------------------- the papers' protocol (slow)
def papers_run():
    """Every registered method × the five inits, Adam lr 1e-3, 35 000 steps (FAMO 50 000): the
    default ``python -m toy.trajectories --methods all`` job, 2 workers, no plots."""
    results = run_all(build_specs("all"), range(5), EngineConfig(), workers=2)
    return {(r.label, r.init_index): r for r in results}


#: methods that reach the front from these inits (FAMO with its paper's 50 000 steps); CAGrad (c = 0.4)
#: from three: from (9, 9) it is still in the log valley after 35 000 steps, and when it leaves the
#: (−8.5, 7.5) valley depends on rounding (docs/toy.md) — while LS stalls from (9, 9)
REACH_THE_FRONT = [("mgda", range(5)), ("nashmtl", range(5)), ("famo", range(5)), ("fairgrad", range(5)),
                   ("imtl", range(5)), ("amtl", range(5)), ("pivrg", range(5)), ("gradnorm", range(5)),
                   ("cagrad", [1, 3, 4])]


@pytest.mark.slow
def test_papers_protocol():
    """One test over the whole job (one run, ~3 min on 2 cores; as one test it is built once, also
    with pytest-xdist, whose workers would each build a shared module fixture for their share):
    every method runs to the end without solver failures; LS ends at the weighted optimum from
    (0,0), (−7.5,−0.5), (9,−1), stays in the log valley from (9, 9) and stalls there for > 15 000
    steps from (−8.5, 7.5); the gradient-balancing methods of REACH_THE_FRONT reach the front."""
    runs = papers_run()
    for (label, i), r in runs.items():
        if r.status == "skipped":
            assert label == "consmtl", (label, r.reason)
            continue
        assert r.status == "ok", (label, i, r.reason)
        assert r.traj.shape == (50_001 if label == "famo" else 35_001, 2)
        assert np.isfinite(r.traj).all(), (label, i)
        assert not r.solver_failures, (label, i, r.solver_failures)   # Pareto stationarity is not a failure
    for i in (1, 3, 4):
        assert runs["ls", i].traj[-500:, 0].mean() == pytest.approx(X1_LS, abs=1e-3)
        assert runs["ls", i].traj[-1, 1] == pytest.approx(-8.409, abs=0.01)
    assert runs["ls", 2].traj[-1, 1] > 0 and final_distance(runs["ls", 2]) > 1.0
    assert runs["ls", 0].traj[15_000, 1] > 0
    for name, inits in REACH_THE_FRONT:
        needs(name)
        for i in inits:
            assert final_distance(runs[name, i]) < 0.05, (name, i, runs[name, i].traj[-1])
    assert final_distance(runs["cagrad", 2]) > 0.5
