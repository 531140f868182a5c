"""Search-space files and --set values that used to pass validation and fail later: a
non-mapping ``benchmarks`` section, scalar overrides, infinite or overflowing bounds, null."""

from pathlib import Path

import pytest
import yaml

from mtl_tune.spaces import SpaceError, load_space

C = {"type": "float", "low": 0.0, "high": 1.0, "default": 0.4}


def _write(tmp_path: Path, data: dict | str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def _assert_refused(tmp_path: Path, data: dict | str, match: str) -> None:
    """Loading ``data`` as cagrad's space for the toy is a SpaceError matching ``match`` that names the file."""
    path = _write(tmp_path, data)
    with pytest.raises(SpaceError, match=match) as err:
        load_space("cagrad", "toy", path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("benchmarks,match", [
    ([1], r"'benchmarks' must be a mapping of benchmark name → overrides, got list"),
    ("toy", r"'benchmarks' must be a mapping of benchmark name → overrides, got str"),
    ({"toy": [1]}, r"benchmarks.toy must be a mapping of hyperparameter → fields, got list"),
    ({"toy": {"c": 5}}, r"benchmarks.toy.c must be a mapping of fields to override .* got int 5"),
    ({"toy": {"c": [1]}}, r"benchmarks.toy.c must be a mapping of fields to override .* got list"),
    ({"nyuv2": {"c": 0.5}}, r"benchmarks.nyuv2.c must be a mapping"),  # not the benchmark in use: still checked
])
def test_malformed_benchmarks_section_names_file_key_and_shape(tmp_path, benchmarks, match):
    _assert_refused(tmp_path, {"method": "cagrad", "params": {"c": C}, "benchmarks": benchmarks}, match)


def test_empty_benchmark_entry_means_no_overrides(tmp_path):
    path = _write(tmp_path, "method: cagrad\nparams:\n  c: {type: float, low: 0, high: 1, default: 0.4}\n"
                            "benchmarks:\n  toy:\n")
    assert load_space("cagrad", "toy", path).params[0].default == 0.4


@pytest.mark.parametrize("bounds,match", [
    ("low: 0, high: .inf", r"params.c.high must be a finite number, got inf"),
    ("low: -.inf, high: 1", r"params.c.low must be a finite number, got -inf"),
    ("low: 0, high: 1.0e400", r"params.c.high must be a finite number"),
    ("low: -1e308, high: 1e308", r"params.c range .* is too wide: high - low overflows"),
    ("low: 1e-300, high: 1e400, log: true", r"params.c.high must be a finite number"),
])
def test_infinite_or_overflowing_bounds_are_refused(tmp_path, bounds, match):
    _assert_refused(tmp_path, f"method: cagrad\nparams:\n  c: {{type: float, {bounds}, default: 0.4}}\n", match)


def test_int_bounds_beyond_2_to_53_are_refused(tmp_path):
    path = _write(tmp_path, "method: cagrad\nparams:\n  rescale: {type: int, low: 0, high: 1e300, default: 1}\n")
    with pytest.raises(SpaceError, match=r"params.rescale bounds of an int parameter must lie within ±2\*\*53"):
        load_space("cagrad", "toy", path)


def test_huge_but_finite_bounds_still_sample(tmp_path):
    import optuna

    from mtl_tune.spaces import SpaceSampler

    path = _write(tmp_path, "method: cagrad\nparams:\n  c: {type: float, low: -8e307, high: 8e307, default: 0.4}\n")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: (SpaceSampler(load_space("cagrad", "toy", path), 2, {})(t), 0.0)[1], n_trials=3)
    assert len(study.trials) == 3


def test_set_null_is_refused_where_the_default_is_not_null():
    space = load_space("cagrad")
    with pytest.raises(SpaceError, match=r"--set c: an empty/null value is not allowed for c, whose declared "
                                         r"default is 0.4"):
        space.with_fixed({"c": None})


def test_set_null_stays_allowed_where_the_default_is_null():
    space = load_space("amtl")
    assert {p.name: p.default for p in space.params}["preferences"] is None
    assert space.with_fixed({"preferences": None}).fixed == {"preferences": None}


@pytest.mark.parametrize("text,match", [
    # PyYAML keeps the last of two equal keys: a second c replaced the first, a second params emptied the space
    ("method: cagrad\nparams:\n  c: {type: float, low: 0, high: 1, default: 0.4}\n"
     "  c: {type: float, low: 0, high: 0.5, default: 0.2}\n", r"found the key 'c' twice"),
    ("method: cagrad\nparams:\n  c: {type: float, low: 0, high: 1, default: 0.4}\nparams: {}\n",
     r"found the key 'params' twice"),
    # bool("false") is True and bool(None) False: log scale switched on, a parameter silently not searched
    ("method: cagrad\nparams:\n  c: {type: float, low: 0.1, high: 1, default: 0.4, log: 'false'}\n",
     r"params.c.log must be true or false, got 'false'"),
    ("method: cagrad\nparams:\n  c: {type: float, low: 0.1, high: 1, default: 0.4, search: 'false'}\n",
     r"params.c.search must be true or false, got 'false'"),
    ("method: cagrad\nparams:\n  c: {type: float, low: 0.1, high: 1, default: 0.4, search: }\n",
     r"params.c.search must be true or false, got None"),
    # int(0.5) = 0: the sampler drew 0, outside the declared range
    ("method: cagrad\nparams:\n  rescale: {type: int, low: 0.5, high: 2.9, default: 1}\n",
     r"params.rescale bounds of an int parameter must be whole numbers, got low=0.5, high=2.9"),
    # every benchmark's entry: a misspelt benchmark, a misspelt field, an impossible range
    ("method: cagrad\nparams:\n  c: {type: float, low: 0, high: 1, default: 0.4}\nbenchmarks:\n  tyo: {c: {default: 0.3}}\n",
     r"benchmarks.tyo names no benchmark; known: .*toy"),
    ("method: cagrad\nparams:\n  c: {type: float, low: 0, high: 1, default: 0.4}\n"
     "benchmarks:\n  cityscapes: {c: {defualt: 0.3}}\n", r"\(benchmarks.cityscapes\): params.c has unknown field"),
    ("method: cagrad\nparams:\n  c: {type: float, low: 0, high: 1, default: 0.4}\n"
     "benchmarks:\n  qm9: {c: {high: -5}}\n", r"\(benchmarks.qm9\): params.c needs low < high"),
    ("method: cagrad\nparams:\n  c: {type: float, low: 0, high: 1, default: 0.4}\n"
     "benchmarks:\n  qm9: {nope: {default: 1}}\n", r"benchmarks.qm9.nope overrides an undeclared hyperparameter"),
    # Optuna draws the grid low + k·step; a default off it was run as the first trial anyway
    ("method: cagrad\nparams:\n  c: {type: float, low: 0.1, high: 1, step: 0.3, default: 0.5}\n",
     r"params.c.default 0.5 is not on its grid"),
])
def test_fields_that_were_read_loosely_are_refused(tmp_path, text, match):
    _assert_refused(tmp_path, text, match)


def test_merge_keys_may_still_override_what_they_merge(tmp_path):
    path = _write(tmp_path, "method: cagrad\nparams:\n  c: &c {type: float, low: 0, high: 1, default: 0.4}\n"
                            "benchmarks:\n  nyuv2:\n    c:\n      <<: *c\n      default: 0.6\n")
    assert load_space("cagrad", "nyuv2", path).params[0].default == 0.6


def test_a_declared_simplex_default_is_the_first_trial_and_must_fit_the_tasks(tmp_path):
    """The first trial reproduces every default: a simplex default [1, 3] was drawn as equal weights."""
    from mtl_tune.spaces import decode_hparams

    path = _write(tmp_path, "method: ls\nparams:\n  task_weights: {type: simplex, default: [1, 3]}\n")
    space = load_space("ls", "toy", path)
    point = space.default_point(2)
    decoded = decode_hparams({"task_weights": {str(i): point[f"hparams/task_weights/{i}"] for i in range(2)}}, 2)
    assert decoded["task_weights"] == pytest.approx([0.5, 1.5], rel=1e-12)
    equal = load_space("ls", "toy", _write(tmp_path, "method: ls\nparams:\n  task_weights: {type: simplex}\n"))
    assert list(equal.default_point(2).values()) == [0.5, 0.5]  # no default: equal draws, as before
    with pytest.raises(SpaceError, match=r"params.task_weights.default \[1, 3\] must be 3 non-negative weights"):
        space.check_for(3, "three-task benchmark")


def test_a_folder_given_as_the_space_file_is_named_as_a_folder(tmp_path):
    with pytest.raises(SpaceError, match="is a folder; give the .yaml file"):
        load_space("cagrad", "toy", tmp_path)
