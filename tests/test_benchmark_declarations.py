"""What a benchmark class declares (tasks, metrics, default objective, hypervolume reference) is
checked before a search trains anything: a plug-in's mistake is one line, not a crash after the
trials (a MultiMNIST Pareto search of two methods failed in its comparison, with no reference)."""

from __future__ import annotations

import pytest

from mtl_tune.analysis import reference_point
from mtl_tune.benchmarks.toy import Toy
from mtl_tune.metrics import MetricSpec
from mtl_tune.registry import available_benchmarks, benchmark_class
from mtl_tune.search.runner import SearchOptions, _objective
from mtl_tune.search.validate import SearchError, check_hypervolume_reference


@pytest.mark.parametrize("name", available_benchmarks())
def test_every_builtin_benchmark_is_sound_and_places_every_metric_in_a_hypervolume(name):
    cls = benchmark_class(name)
    assert cls.declaration_problems() == []
    ref = reference_point([f"val/{m.name}" for m in cls.metrics], name, cls.metrics)
    assert len(ref) == len(cls.metrics)


def test_multi_mnist_reference_is_chance():
    ref = reference_point(["val/left/acc", "val/right/acc", "val/left/loss"], "multi_mnist")
    assert ref.tolist() == pytest.approx([0.0, 0.0, 2.302585092994046], abs=1e-15)


def _toy_like(**attrs):
    return type("Declared", (Toy,), {"name": "declared", **attrs})


@pytest.mark.parametrize("attrs, problem", [
    ({"tasks": ("task1", "task1")}, "tasks must be distinct"),
    ({"metrics": ()}, "non-empty tuple of MetricSpec"),
    ({"metrics": Toy.metrics + Toy.metrics[:1]}, "metric names must be distinct"),
    ({"metrics": Toy.metrics + (MetricSpec("x", "typo", False),)}, "measures task 'typo'"),
    ({"metrics": (MetricSpec("loss1", "task1", False, 0.0, True),)}, "baseline 0.0"),
    ({"metrics": (MetricSpec("loss1", "task1", False, float("nan"), True),)}, "baseline nan"),
    ({"metrics": (MetricSpec("loss1", "task1", False),)}, "no metric is primary"),
    ({"reference_points": {"nope": 1.0}}, "reference_points names 'nope'"),
    ({"reference_points": {"loss1": float("inf")}}, "must be a finite number"),
])
def test_declaration_problems_name_what_is_wrong(attrs, problem):
    problems = _toy_like(**attrs).declaration_problems()
    assert any(problem in p for p in problems), problems


@pytest.mark.parametrize("objective", [("val/nonexistent", "min"), ("val/loss1", "max"), ("loss1", "min"),
                                       ("val/loss1", "minimize")])
def test_a_default_objective_that_is_no_metric_is_refused(objective):
    """A plug-in's default_objective naming a metric it never reports: every trial failed on Tune's
    metric check with a long traceback and no table."""
    bench = _toy_like(default_objective=lambda self: objective)()
    with pytest.raises(SearchError, match=r"default_objective\(\) gives"):
        _objective(bench, "default")
    assert _objective(Toy(), "default") == (["val/pareto_distance"], ["min"])


def test_a_pareto_comparison_needs_a_reference_point_before_anything_runs(monkeypatch):
    bench = _toy_like(reference_points={})()
    with pytest.raises(SearchError, match="no fixed hypervolume reference for metric 'val/loss1'.*compared by hyper"):
        check_hypervolume_reference(bench, ["val/loss1", "val/loss2"], preferences=False)
    with pytest.raises(SearchError, match="no fixed hypervolume reference"):
        check_hypervolume_reference(bench, [], preferences=True)
    check_hypervolume_reference(Toy(), ["val/loss1", "val/loss2"], preferences=True)


def test_prepare_refuses_a_pareto_search_of_two_methods_without_a_reference(monkeypatch, tmp_path):
    from mtl_tune.search.runner import prepare

    monkeypatch.setattr(benchmark_class("multi_mnist"), "reference_points", {})
    options = SearchOptions(benchmark="multi_mnist", methods=["ls", "rlw"], objective="pareto",
                            storage_path=str(tmp_path))
    with pytest.raises(SearchError, match="val/left/acc"):
        prepare(options)
    assert not any(tmp_path.iterdir())


def test_a_task_without_a_metric_is_a_declaration_problem_and_has_no_score():
    from mtl_tune.metrics import task_scores

    problems = _toy_like(tasks=("task1", "task2", "task3")).declaration_problems()
    assert any("task(s) ['task3'] have no metric" in p for p in problems), problems
    specs = [MetricSpec("loss1", "task1", False, 1.0, True)]
    assert task_scores({"loss1": 1.5}, specs, ["task1"]) == [50.0]
    with pytest.raises(ValueError, match="task 'typo' has no metric"):
        task_scores({"loss1": 1.5}, specs, ["task1", "typo"])  # was 0.0: "equal to STL"
