"""Plug-in registry: an installed package adds a method (with its search space) and a
benchmark through the ``mtl_tune.balancers`` / ``mtl_tune.benchmarks`` entry points.

The package is "installed" the way pip lays it out: a module and a ``*.dist-info`` folder
(METADATA + entry_points.txt) in a directory on ``sys.path``.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mtl_tune import registry
from mtl_tune.spaces import load_space

PLUGIN = '''
import torch
from mtl_tune.balancers.base import LossBalancer
from mtl_tune.benchmarks.toy import Toy


class HalfSum(LossBalancer):
    """Every task weighted by ``scale`` (a plug-in method)."""

    name = "halfsum"
    search_space = "spaces/halfsum.yaml"

    def __init__(self, n_tasks, scale=0.5, **kw):
        super().__init__(n_tasks, **kw)
        self.scale = float(scale)

    def objective(self, losses):
        w = torch.full_like(losses, self.scale)
        return (w * losses).sum(), w


class ToyAgain(Toy):
    name = "toy_again"


class ToyTwice(Toy):  # a metric declared twice: a Pareto search would optimise loss1 twice
    name = "toy_twice"
    metrics = Toy.metrics + Toy.metrics[:1]


class ToyZeroBaseline(Toy):
    name = "toy_zero"
    metrics = tuple(type(m)(m.name, m.task, m.higher_is_better, 0.0, m.primary) for m in Toy.metrics)
'''

SPACE = '''
method: halfsum
params:
  scale:
    type: float
    low: 0.1
    high: 1.0
    default: 0.5
'''


def install(root: Path, entry_points: str, name: str = "mtl-halfsum") -> None:
    pkg = root / "mtl_halfsum"
    (pkg / "spaces").mkdir(parents=True)
    (pkg / "__init__.py").write_text(PLUGIN)
    (pkg / "spaces" / "halfsum.yaml").write_text(SPACE)
    info = root / f"{name.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))


@pytest.fixture
def plugin_env(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.clear_cache()
    yield tmp_path
    sys.modules.pop("mtl_halfsum", None)
    registry.clear_cache()


GOOD = """
[mtl_tune.balancers]
halfsum = mtl_halfsum:HalfSum

[mtl_tune.benchmarks]
toy_again = mtl_halfsum:ToyAgain
"""


def test_installed_plugin_adds_a_method_its_space_and_a_benchmark(plugin_env):
    install(plugin_env, GOOD)
    assert "halfsum" in registry.available_balancers() and "cagrad" in registry.available_balancers()
    assert "toy_again" in registry.available_benchmarks()
    bal = registry.get_balancer("halfsum", 2, scale=0.25)
    losses = torch.tensor([1.0, 3.0], requires_grad=True)
    info = bal.backward(losses, [losses])
    torch.testing.assert_close(losses.grad, torch.tensor([0.25, 0.25]))
    torch.testing.assert_close(info.weights, torch.tensor([0.25, 0.25]))
    space = load_space("halfsum")
    assert [p.name for p in space.params] == ["scale"] and space.params[0].high == 1.0
    assert type(registry.get_benchmark("toy_again")).__name__ == "ToyAgain"


def test_without_the_plugin_the_name_is_unknown():
    registry.clear_cache()
    with pytest.raises(registry.UnknownNameError, match="halfsum"):
        registry.balancer_class("halfsum")


@pytest.mark.parametrize("entry, message", [
    ("[mtl_tune.balancers]\ncagrad = mtl_halfsum:HalfSum\n", "already taken"),
    ("[mtl_tune.balancers]\nhalfsum = mtl_halfsum:ToyAgain\n", "not a subclass"),
    ("[mtl_tune.balancers]\nother = mtl_halfsum:HalfSum\n", "not 'other'"),
    ("[mtl_tune.balancers]\nhalfsum = mtl_halfsum_missing:HalfSum\n", "does not load"),
    ("[mtl_tune.benchmarks]\ntoy_twice = mtl_halfsum:ToyTwice\n", "metric names must be distinct"),
    ("[mtl_tune.benchmarks]\ntoy_zero = mtl_halfsum:ToyZeroBaseline\n", "baseline 0.0: a finite non-zero"),
])
def test_a_bad_plugin_is_a_clear_error_naming_its_distribution(plugin_env, entry, message):
    install(plugin_env, entry, name="mtl-broken")
    with pytest.raises(registry.PluginError, match=message) as err:
        registry.available_balancers() if "balancers" in entry else registry.available_benchmarks()
    assert "mtl-broken" in str(err.value)


def test_cheap_name_listing_includes_plugins_without_loading_them(plugin_env):
    install(plugin_env, GOOD)
    assert "halfsum" in registry.balancer_names() and "toy_again" in registry.benchmark_names()
    assert "mtl_halfsum" not in sys.modules  # listed from the entry points, not imported
    assert registry.balancer_names() == registry.available_balancers()
    assert registry.benchmark_names() == registry.available_benchmarks()


def test_a_plugin_claiming_a_builtin_name_is_an_error_even_for_a_single_lookup(plugin_env):
    install(plugin_env, "[mtl_tune.balancers]\ncagrad = mtl_halfsum:HalfSum\n", name="mtl-broken")
    with pytest.raises(registry.PluginError, match="already taken"):
        registry.balancer_class("cagrad")  # the one-module path must not bypass the plug-ins


def test_a_broken_plugin_is_one_error_line_from_the_commands(plugin_env, capsys):
    """`search` and `toy` refuse to run with a plug-in that does not load (they list every method),
    with its entry point and cause in one `error:` line and exit 2 — it was a 40-60-line traceback."""
    from mtl_tune.search.cli import main as search_main
    from toy.trajectories import main as toy_main

    install(plugin_env, "[mtl_tune.balancers]\nhalfsum = mtl_halfsum_missing:HalfSum\n", name="mtl-broken")
    code = search_main(["--method", "ls", "--num-samples", "1", "--epochs", "1",
                        "--storage-path", str(plugin_env / "r"), "--name", "x"])
    err = capsys.readouterr().err
    assert code == 2 and "mtl-broken" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exit_info:
        toy_main(["--methods", "ls", "--no-plots", "--out", str(plugin_env / "toy")], prog="mtl-tune toy")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "mtl-tune toy: error:" in err and "mtl-broken" in err


# ---------------------------------------------------------------- what a plug-in method's code may do
from mtl_tune.balancers.base import BalancerError, LossBalancer, check_weights  # noqa: E402


class KeywordsOnly(LossBalancer):
    """Reads its own argument out of **kw and forwards the rest (a common plug-in style)."""

    name = "kwonly"

    def __init__(self, n_tasks, **kw):
        self.alpha = float(kw.pop("alpha", 1.0))
        super().__init__(n_tasks, **kw)

    def objective(self, losses):
        w = torch.full_like(losses, self.alpha)
        return (w * losses).sum(), w


class WrongWeights(LossBalancer):
    name = "wrongweights"

    def __init__(self, n_tasks, shape=(1,), **kw):
        super().__init__(n_tasks, **kw)
        self.shape = shape

    def objective(self, losses):
        return losses.sum(), (None if self.shape is None else torch.ones(self.shape))


def test_a_keyword_a_plugin_takes_out_of_its_kwargs_is_accepted():
    """``kw.pop("alpha", 1.0)`` before ``super().__init__(n_tasks, **kw)``: alpha was refused as unknown."""
    from mtl_tune.balancers._hparams import arg_specs, check_hparams

    assert set(arg_specs(KeywordsOnly)) >= {"alpha", "max_norm"}
    assert check_hparams(KeywordsOnly, 2, {"alpha": 3.0}) == (2, {"alpha": 3.0})
    with pytest.raises(TypeError, match="unknown hyperparameter 'alpah'"):
        check_hparams(KeywordsOnly, 2, {"alpah": 3.0})
    with pytest.raises(TypeError, match="alpha must be"):
        check_hparams(KeywordsOnly, 2, {"alpha": "big"})  # its literal default 1.0 says: a number


@pytest.mark.parametrize("shape, got", [(None, "NoneType"), ((1,), r"shape \(1,\)"), ((7,), r"shape \(7,\)")])
def test_weights_of_the_wrong_shape_are_a_clear_error(shape, got):
    """None failed deep inside; (1,) was broadcast into made-up logged weights; (7,) broke the trainer later."""
    losses = torch.tensor([1.0, 3.0], requires_grad=True)
    with pytest.raises(BalancerError, match=rf"wrongweights: objective\(\) must return the per-task weights as a "
                                            rf"tensor of shape \(2,\), got {got}"):
        WrongWeights(2, shape=shape).backward(losses, [losses])
    check_weights("x", torch.ones(2), 2, "objective()")
