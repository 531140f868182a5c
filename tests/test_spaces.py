import pytest
import yaml

from mtl_tune.registry import available_balancers, available_benchmarks, balancer_class
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
