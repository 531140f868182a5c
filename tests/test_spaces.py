import copy
import inspect
from pathlib import Path

import pytest
import yaml

from mtl_tune.balancers.base import Balancer
from mtl_tune.registry import available_balancers, available_benchmarks, balancer_class, get_balancer
from mtl_tune.spaces import SPACES_DIR, SpaceError, SpaceSampler, load_space


@pytest.mark.parametrize("method", available_balancers())
def test_every_method_has_a_valid_space_for_every_benchmark(method):
    for bench in available_benchmarks():
        space = load_space(method, bench)
        assert space.method == method
        for p in space.params:
            assert p.name  # validated against the constructor by load_space


@pytest.mark.parametrize("method", available_balancers())
def test_space_defaults_construct_the_method(method):
    space = load_space(method)
    kwargs = {p.name: p.default for p in space.params if p.default is not None and p.type != "simplex"}
    balancer_class(method)(3, **kwargs)


def test_every_yaml_belongs_to_a_registered_method():
    names = {p.stem for p in SPACES_DIR.glob("*.yaml")}
    assert names == set(available_balancers())


def write(tmp_path, data):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


@pytest.mark.parametrize("data,match", [
    ({"method": "cagrad", "params": {"c": {"type": "float", "low": 0, "high": 1, "default": 2.0}}}, r"c=2.0 is outside"),
    ({"method": "cagrad", "params": {"c": {"type": "real", "low": 0, "high": 1}}}, r"params.c.type must be one of"),
    ({"method": "cagrad", "params": {"cc": {"type": "float", "low": 0, "high": 1}}}, r"params.cc is not an argument"),
    ({"method": "cagrad", "params": {"c": {"type": "float", "low": 1, "high": 0}}}, r"needs low < high"),
    ({"method": "cagrad", "params": {"c": {"type": "float", "low": 0, "high": 1, "log": True}}}, r"log: true"),
    ({"method": "cagrad", "params": {"c": {"type": "float", "low": 0, "high": 1, "color": 1}}}, r"unknown field"),
    ({"method": "cagrad", "params": {}, "extra": 1}, r"unknown top-level key"),
    ({"method": "cagrad", "params": {"c": {"type": "float", "low": 0, "high": 1}},
      "benchmarks": {"toy": {"d": {"default": 1}}}}, r"undeclared hyperparameter"),
    ("method: [cagrad\n", r"not valid YAML"),
])
def test_malformed_files_name_file_key_and_rule(tmp_path, data, match):
    path = write(tmp_path, data)
    with pytest.raises(SpaceError, match=match) as err:
        load_space("cagrad", "toy", path)
    assert str(path) in str(err.value)


def test_benchmark_overrides_apply():
    assert {p.name: p.default for p in load_space("famo", "cityscapes").params}["gamma"] == pytest.approx(1e-2)
    assert {p.name: p.default for p in load_space("famo", "nyuv2").params}["gamma"] == pytest.approx(1e-3)


def test_set_validates_name_and_range():
    space = load_space("cagrad")
    assert space.with_fixed({"c": 0.2}).constants()["c"] == 0.2
    assert "c" not in [p.name for p in space.with_fixed({"c": 0.2}).searchable()]
    with pytest.raises(SpaceError, match="no hyperparameter 'cc'"):
        space.with_fixed({"cc": 1})
    with pytest.raises(SpaceError, match="outside its range"):
        space.with_fixed({"c": 5.0})


def test_sampler_suggests_declared_params_and_returns_constants():
    import optuna

    space = load_space("cagrad")
    sampler = SpaceSampler(space, 2, {"benchmark": "toy", "method": "cagrad"})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    const = sampler(trial)
    assert 0.0 <= trial.params["hparams/c"] <= 1.0
    assert const["method"] == "cagrad" and const["hparams/rescale"] == 1
    ls = SpaceSampler(load_space("ls"), 3, {})
    t2 = study.ask()
    ls(t2)
    assert sorted(t2.params) == ["hparams/task_weights/0", "hparams/task_weights/1", "hparams/task_weights/2"]


# ----------------------------------------------------------------------------- per-family checks
# (moved from the balancer test files: each family's spaces against its constructors)
ROOT = Path(__file__).resolve().parents[1]
SPACES = ROOT / "search_spaces"
GRAD_METHODS = ["mgdaub", "graddrop", "imtl", "gradvac", "amtl", "amtlub", "epo", "pmgda", "paretomtl", "moco", "sdmgrad",
                "modo", "excessmtl"]
LOSS_METHODS = ("si", "rlw", "dwa", "uw", "go4align", "gradnorm", "stch", "pbi", "autol")
SOLVER_METHODS = ("nashmtl", "fairgrad", "pivrg", "consmtl", "stgu")
BENCHMARK_TASKS = {"nyuv2": 3, "cityscapes": 2, "celeba": 40, "qm9": 11, "toy": 2}


@pytest.mark.parametrize("name", GRAD_METHODS)
def test_search_space_params_are_constructor_args(name):
    spec = yaml.safe_load((ROOT / "search_spaces" / f"{name}.yaml").read_text())
    assert spec["method"] == name
    cls = balancer_class(name)
    accepted = set(inspect.signature(cls.__init__).parameters)
    accepted |= set(inspect.signature(Balancer.__init__).parameters)  # max_norm etc. reach it via **kw
    params = spec.get("params") or {}
    assert set(params) <= accepted - {"self", "n_tasks", "kw"}
    defaults = {k: v["default"] for k, v in params.items() if v.get("default") is not None}
    cls(3, **defaults)


@pytest.mark.parametrize("name", GRAD_METHODS)
def test_search_space_loads(name):
    spaces = pytest.importorskip("mtl_tune.spaces")
    for benchmark in (None, "nyuv2"):
        space = spaces.load_space(name, benchmark)
        assert space.method == name


@pytest.mark.parametrize("method", LOSS_METHODS)
def test_search_space_params_are_ctor_args(method):
    space = yaml.safe_load((SPACES / f"{method}.yaml").read_text())
    assert space["method"] == method
    cls = balancer_class(method)
    ctor = inspect.signature(cls.__init__).parameters
    for key in space["params"]:
        assert key in ctor, f"{method}.yaml: {key} is not a constructor argument of {cls.__name__}"

    def build(params: dict, k: int):
        kwargs = {key: spec["default"] for key, spec in params.items() if spec.get("default") is not None}
        bal = cls(k, **kwargs)
        for key, spec in params.items():  # every categorical choice and the numeric bounds are accepted
            for value in spec.get("choices", []):
                cls(k, **{**kwargs, key: value})
            for bound in ("low", "high"):
                if spec.get(bound) is not None:
                    cls(k, **{**kwargs, key: spec[bound]})
        return bal

    assert build(space["params"], 3).name == method
    for bench, overrides in (space.get("benchmarks") or {}).items():
        assert bench in BENCHMARK_TASKS, bench
        params = copy.deepcopy(space["params"])
        for key, fields in overrides.items():
            assert key in params
            params[key].update(fields)
        build(params, BENCHMARK_TASKS[bench])


@pytest.mark.parametrize("method", SOLVER_METHODS)
def test_search_space_params_build_the_method(method):
    from mtl_tune.spaces import load_space

    for bench, k in ((None, 3), ("nyuv2", 3), ("cityscapes", 2), ("celeba", 40), ("qm9", 11)):
        space = load_space(method, bench)
        values = {p.name: p.default for p in space.params if p.default is not None}
        bal = get_balancer(method, k, **values)
        for name, value in values.items():
            if name != "max_norm":
                assert getattr(bal, name) == value or getattr(bal, name) == [value] * k
