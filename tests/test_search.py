"""The search CLI: input validation (no compute spent) and a real Ray Tune + Optuna run."""

import stat

import pytest

from mtl_tune.search.cli import main


def run_cli(capsys, *args):
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("args,match", [
    (["--method", "nope"], "unknown method 'nope'; valid methods: .*cagrad"),
    (["--benchmark", "imagenet"], "unknown benchmark 'imagenet'; valid benchmarks: .*toy"),
    (["--num-samples", "0"], "--num-samples 0: must be at least 1"),
    (["--objective", "accuracy"], "unknown objective 'accuracy' for benchmark toy; valid: pareto"),
    (["--objective", "test/loss1"], "leaks the test set"),
    (["--method", "cagrad", "--set", "c=7"], "c=7 is outside its range"),
    (["--method", "cagrad", "--set", "cc=1"], "no hyperparameter 'cc'"),
    (["--method", "ls,cagrad", "--set", "c=0.1"], "use it with a single --method"),
    (["--config", "learning_rate=1"], "learning_rate: not a setting of benchmark toy"),
    (["--benchmark", "multi_mnist", "--config", "val_fraction=0"], "without a validation split"),
    (["--scheduler", "asha"], "need a scalar objective"),
    (["--method", "cagrad", "--search-space", "/nonexistent/space.yaml"], "/nonexistent/space.yaml does not exist"),
])
def test_bad_input_is_one_clear_message(capsys, tmp_path, args, match):
    import re

    code, out, err = run_cli(capsys, *args, "--storage-path", str(tmp_path))
    assert code == 2
    assert re.search(match, err), err
    assert "Traceback" not in err + out
    assert not any(tmp_path.iterdir())  # nothing started


def test_unwritable_storage_path(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    blocker.chmod(stat.S_IRUSR)
    code, _, err = run_cli(capsys, "--storage-path", str(blocker / "sub"))
    assert code == 2 and f"{blocker} is not a folder" in err


def test_existing_sweep_needs_resume(capsys, tmp_path):
    (tmp_path / "s1").mkdir()
    (tmp_path / "s1" / "trials.csv").write_text("x")
    code, _, err = run_cli(capsys, "--storage-path", str(tmp_path), "--name", "s1")
    assert code == 2 and "--resume" in err
    code, _, err = run_cli(capsys, "--storage-path", str(tmp_path), "--name", "s2", "--resume")
    assert code == 2 and "does not exist" in err


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_real_pareto_search_on_the_toy(ray_cluster, tmp_path, capsys):
    from mtl_tune.analysis import load_sweep, pareto_mask

    code, out, err = run_cli(capsys, "--method", "ls,cagrad", "--num-samples", "3", "--epochs", "2",
                             "--config", "steps_per_epoch=150", "--storage-path", str(tmp_path), "--name", "sw",
                             "--verbose", "0")
    assert code == 0, err
    assert "non-dominated trials" in out and "trials.csv" in out
    table = load_sweep(tmp_path / "sw")
    assert sorted(table["method"].value_counts().to_dict().items()) == [("cagrad", 3), ("ls", 3)]  # same budget
    assert set(table["status"]) == {"TERMINATED"}
    assert (table["training_iteration"] == 2).all()
    # the first trial of each method runs the YAML defaults (Optuna enqueued point)
    assert (table.loc[table.method == "cagrad", "hp/c"] == 0.4).any()
    front = table[pareto_mask(table[["val/loss1", "val/loss2"]].to_numpy(float), ["min", "min"])]
    assert len(front) >= 1
    assert (tmp_path / "sw" / "pareto.png").stat().st_size > 10_000
    assert (tmp_path / "sw" / "sweep.json").is_file()


def test_simplex_grid_spreads_evenly_and_sums_to_k():
    from mtl_tune.search.compare import simplex_grid

    grid = simplex_grid(2, 5)
    assert len(grid) == 5
    assert [round(w[0], 3) for w in grid] == [0.002, 0.5, 1.0, 1.5, 1.998]
    for k, n in [(3, 10), (4, 20)]:
        g = simplex_grid(k, n)
        assert len(g) <= n and all(abs(sum(w) - k) < 1e-5 and min(w) > 0 for w in g)
        assert len({tuple(w) for w in g}) == len(g)


@pytest.mark.parametrize("method", ["ls", "amtl", "stch", "pbi", "epo", "pmgda", "paretomtl"])
def test_preference_methods_take_every_grid_point(method):
    """--preferences N sweeps each of these methods' preference argument: every grid point (K = 2, 3) builds."""
    from mtl_tune.registry import get_balancer
    from mtl_tune.search.compare import preference_arg, simplex_grid

    arg = preference_arg(method)
    assert arg == ("task_weights" if method == "ls" else "preferences")
    for k in (2, 3):
        for w in simplex_grid(k, 6):
            get_balancer(method, k, **{arg: w})


@pytest.mark.slow
def test_seed_reruns_and_preference_sweep(ray_cluster, tmp_path, capsys):
    import pandas as pd

    from mtl_tune.analysis import load_sweep

    code, out, err = run_cli(capsys, "--method", "ls,pcgrad", "--num-samples", "2", "--epochs", "1",
                             "--config", "steps_per_epoch=100", "--config", "init=3", "--seeds", "2", "--preferences", "3",
                             "--storage-path", str(tmp_path), "--name", "cmp", "--verbose", "0")
    assert code == 0, err
    table = load_sweep(tmp_path / "cmp")
    counts = table.groupby(["method", "phase"]).size().to_dict()
    # same search budget (pcgrad has no hyperparameter: one trial), 2 fresh seeds each, 3 ls preferences
    assert counts == {("ls", "search"): 2, ("ls", "seeds"): 2, ("ls", "prefs"): 3,
                      ("pcgrad", "search"): 1, ("pcgrad", "seeds"): 2}
    assert sorted(table.loc[table.phase == "seeds", "seed"]) == [1, 1, 2, 2]
    comparison = pd.read_csv(tmp_path / "cmp" / "comparison.csv")
    assert set(comparison["method"]) == {"ls", "pcgrad"} and (comparison["seeds"] == 2).all()
    assert sorted(comparison["rank"]) in ([1, 2], [1, 1])
    prefs = pd.read_csv(tmp_path / "cmp" / "preferences.csv")
    assert prefs["method"].tolist() == ["ls"] and prefs["points"].tolist() == [3]
    assert prefs["hypervolume"].iloc[0] > 0
    assert "method comparison" in out and "preference sweep" in out


def _table(rows):
    import pandas as pd

    base = {"status": "TERMINATED", "training_iteration": 1, "epochs": 1, "seed": 0, "phase": "search"}
    return pd.DataFrame([{**base, **r} for r in rows])


def test_pareto_comparison_ranks_by_hypervolume_and_warns_on_degenerate_numbers(tmp_path):
    from mtl_tune.search.cli import _comparison_title
    from mtl_tune.search.compare import comparison_table, preference_hypervolumes
    from mtl_tune.search.runner import SearchOptions, prepare

    plan = prepare(SearchOptions(methods=["ls", "mgda"], storage_path=str(tmp_path), name="c", seeds=2))
    table = _table([
        # ls: two trade-off points under the toy's reference (0, 0): HV = 2 + 2 − 1 (overlap) = 3
        {"method": "ls", "val/loss1": -1.0, "val/loss2": -2.0, "val/pareto_distance": 0.5},
        {"method": "ls", "val/loss1": -2.0, "val/loss2": -1.0, "val/pareto_distance": 0.4},
        # mgda: best on loss1 alone and on pareto_distance, but beats the reference in no objective pair
        {"method": "mgda", "val/loss1": -5.0, "val/loss2": 1.0, "val/pareto_distance": 0.1},
        {"method": "mgda", "val/loss1": -5.0, "val/loss2": 1.0, "val/pareto_distance": 0.1, "phase": "seeds", "seed": 1},
        {"method": "mgda", "val/loss1": -5.0, "val/loss2": 1.0, "val/pareto_distance": 0.1, "phase": "seeds", "seed": 1},
    ])
    comp = comparison_table(plan, table)
    assert comp["method"].tolist() == ["ls", "mgda"] and comp["rank"].tolist() == [1, 2]
    assert comp.loc[0, "hypervolume"] == pytest.approx(3.0) and comp.loc[1, "hypervolume"] == 0.0
    assert comp.loc[0, "non_dominated"] == 2
    assert comp.loc[1, "seeds"] == 1  # two re-runs of seed 1 are one seed
    notes = " ".join(comp.attrs["notes"])
    assert "hypervolume of mgda is 0" in notes and "reference point (val/loss1 = 0, val/loss2 = 0)" in notes
    title = _comparison_title(comp, plan)
    assert "ranked by hypervolume" in title and "reference point (0, 0)" in title and "val/pareto_distance" in title

    prefs = _table([{"method": "ls", "phase": "prefs", "val/loss1": 1.0, "val/loss2": 1.0},
                    {"method": "ls", "phase": "prefs", "val/loss1": 2.0, "val/loss2": 0.5}])
    out = preference_hypervolumes(plan, prefs)
    assert out["hypervolume"].tolist() == [0.0] and out["beats_reference"].tolist() == [0]
    assert any("hypervolume of ls is 0" in n for n in out.attrs["notes"])


def test_seed_reruns_of_a_deterministic_toy_say_so(tmp_path):
    from mtl_tune.search.compare import comparison_table
    from mtl_tune.search.runner import SearchOptions, prepare

    rows = [{"method": "ls", "val/pareto_distance": 0.3},
            {"method": "ls", "val/pareto_distance": 0.3, "phase": "seeds", "seed": 1},
            {"method": "ls", "val/pareto_distance": 0.3, "phase": "seeds", "seed": 2}]
    for jitter, deterministic in ((0, True), (0.5, False)):
        plan = prepare(SearchOptions(methods=["ls"], objective="pareto_distance", seeds=2, storage_path=str(tmp_path),
                                     name=f"d{jitter}", config={"init_jitter": jitter}))
        notes = comparison_table(plan, _table(rows)).attrs["notes"]
        assert any("deterministic in this configuration" in n for n in notes) == deterministic
