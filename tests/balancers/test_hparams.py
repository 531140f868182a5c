"""get_balancer's central check of every hyperparameter's type and finiteness
(mtl_tune/balancers/_hparams.py): for every registered method and every argument its constructor
takes, NaN, ±inf, a string, None (where None is not "off"), a bool for a number and a vector of the
wrong length are refused with a ValueError naming the method, the argument and the value; the
defaults and a valid non-default value of every argument still build.

The expected kind of each argument is read here from the constructor's annotation TEXT and the
search-space YAML, independently of _hparams.py's own reading, so a mistake there fails here.
"""

from __future__ import annotations

import inspect
import math
import re

import numpy as np
import pytest
import torch

from mtl_tune import registry
from mtl_tune.balancers import HyperparameterError
from mtl_tune.balancers._hparams import accepts_any_keyword, arg_specs
from mtl_tune.jacobian import JacobianEngine
from mtl_tune.registry import balancer_class, declared_params, get_balancer
from mtl_tune.spaces import load_space

K = 3
METHODS = registry.available_balancers()

#: valid non-default values of the arguments the search spaces do not declare (or declare with one
#: choice only); an argument missing from both this table and its YAML fails test_every_argument_is_covered
EXTRA_VALID = {
    "tol": 1e-8, "max_iter": 50, "seed": 7, "init": 0.5, "min_losses": [-1.0, -0.5, 0.0],
    "ideal": [0.0, 0.1, -0.2], "n_selected": 2, "n_byzantine": 0, "trim_number": 1,
    "gradient_path": "jacobian", "max_norm": 2.0, "jacobian_engine": JacobianEngine("loop"),
    "references": [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
}
#: arguments whose only valid non-default value depends on another one
NEEDS = {("rlw", "concentration"): {"distribution": "dirichlet"},
         ("sdmgrad", "niter"): {"inner": "official"}}


#: arguments of a base class that the method fixes in its super().__init__ call (not accepted)
FIXED_BY_SUBCLASS = {"consmtl": {"alpha"}, "pivrg": {"alpha"}}


def _arguments(cls: type) -> dict[str, inspect.Parameter]:
    """Constructor arguments along the MRO, as documented by the signatures (n_tasks excluded)."""
    out: dict[str, inspect.Parameter] = {}
    fixed = FIXED_BY_SUBCLASS.get(cls.name, set())
    for klass in cls.__mro__:
        if klass is torch.nn.Module:
            break
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters
        for name, p in list(params.items())[2:]:
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and name not in fixed:
                out.setdefault(name, p)
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            break
    return out


def expected_kind(method: str, name: str) -> tuple[str, bool]:
    """(kind, None allowed) from the annotation text, the YAML and the default."""
    p = _arguments(balancer_class(method))[name]
    text = str(p.annotation)
    none_ok = p.default is None or "None" in text
    if name == "jacobian_engine":
        return "engine", none_ok
    if name == "gradient_path":
        return "str", none_ok
    if "Sequence[Sequence[float]]" in text:
        return "int|matrix", none_ok
    if "Sequence[float]" in text:
        return ("float|vector" if "float |" in text else "vector"), none_ok
    for kind in ("bool", "int", "float", "str"):
        if re.search(rf"\b{kind}\b", text):
            return kind, none_ok
    raise AssertionError(f"{method}.{name}: no kind in annotation {text!r}")


PAIRS = [(m, a) for m in METHODS for a in _arguments(balancer_class(m))]


def bad_values(kind: str, none_ok: bool) -> list:
    nan, inf = math.nan, math.inf
    vec = {"wrong length": [1.0] * (K - 1), "too long": [1.0] * (K + 1), "nan entry": [1.0, nan, 1.0],
           "inf entry": [1.0, 1.0, inf], "string": "0.5", "bool entries": [True] * K, "str entries": ["1"] * K,
           "2-D": np.ones((K, K))}
    values = {
        "float": [nan, inf, -inf, "0.5", True, False, [1.0] * K, np.float64("nan")],
        "int": [2.5, nan, inf, "2", True, np.float64(2.0)],
        "bool": ["false", "true", "no", 0, 1, [], nan],
        "str": [1.0, True, ["mean"]],
        "vector": [*vec.values(), 2.0, True],
        "float|vector": [nan, inf, "0.1", True, *[v for k, v in vec.items() if k != "2-D"]],
        "int|matrix": [2.5, True, "5", [[1.0] * (K - 1)], [[1.0, nan, 1.0]], [["a"] * K]],
        "engine": ["loop", 1],
    }[kind]
    return values if none_ok else [*values, None]


@pytest.mark.parametrize("method, arg", PAIRS, ids=[f"{m}.{a}" for m, a in PAIRS])
def test_invalid_values_are_refused_naming_method_argument_and_value(method, arg):
    kind, none_ok = expected_kind(method, arg)
    for value in bad_values(kind, none_ok):
        with pytest.raises(ValueError) as err:
            get_balancer(method, K, **{arg: value})
        msg = str(err.value)
        assert isinstance(err.value, HyperparameterError), f"{method}.{arg}={value!r}: {msg}"
        assert msg.startswith(f"{method}: {arg} must be "), f"{method}.{arg}={value!r}: {msg}"
        shown = repr(value)
        assert shown[:40] in msg, f"{method}.{arg}={value!r}: the value is not named: {msg}"


def _valid_non_default(method: str, arg: str):
    spec = declared_params(method).get(arg)
    default = _arguments(balancer_class(method))[arg].default
    if spec is not None:
        ptype = spec["type"]
        if ptype in ("float", "int"):
            low, high = spec["low"], spec["high"]
            mid = math.sqrt(low * high) if spec.get("log") else (low + high) / 2
            value = round(mid) if ptype == "int" else mid
            if value == default:
                value = high if ptype == "int" else (low + mid) / 2
            return value
        if ptype == "simplex":
            return [0.5, 1.0, 1.5]
        others = [c for c in spec["choices"] if c != default]
        if others:
            return others[0]
    if arg in EXTRA_VALID:
        return EXTRA_VALID[arg]
    raise AssertionError(f"{method}.{arg}: no valid non-default value (add one to EXTRA_VALID)")


def test_every_argument_is_covered():
    for method, arg in PAIRS:
        _valid_non_default(method, arg)
        expected_kind(method, arg)


@pytest.mark.parametrize("method", METHODS)
def test_defaults_and_valid_values_still_build(method):
    assert type(get_balancer(method, K)) is balancer_class(method)
    for arg in _arguments(balancer_class(method)):
        value = _valid_non_default(method, arg)
        kwargs = {**NEEDS.get((method, arg), {}), arg: value}
        balancer = get_balancer(method, K, **kwargs)
        assert type(balancer) is balancer_class(method), f"{method}.{arg}={value!r}"


@pytest.mark.parametrize("method", METHODS)
def test_numpy_and_torch_numbers_are_accepted(method):
    kwargs = {}
    for arg in _arguments(balancer_class(method)):
        kind, _ = expected_kind(method, arg)
        value = _valid_non_default(method, arg)
        if kind == "float" and isinstance(value, float):
            kwargs[arg] = np.float32(value) if arg != "max_norm" else np.float64(value)
        elif kind in ("int", "int|matrix") and isinstance(value, int):
            kwargs[arg] = np.int64(value)
        elif kind == "bool":
            kwargs[arg] = np.bool_(value)
        elif kind in ("vector", "float|vector") and isinstance(value, list):
            kwargs[arg] = np.asarray(value)
    kwargs.pop("concentration", None), kwargs.pop("niter", None)  # need another argument (NEEDS)
    balancer = get_balancer(method, np.int64(K), **kwargs)
    assert balancer.n_tasks == K and type(balancer.n_tasks) is int
    assert get_balancer(method, torch.tensor(K)).n_tasks == K


@pytest.mark.parametrize("n_tasks", [True, 3.0, "3", None, [3]])
def test_n_tasks_must_be_an_integer(n_tasks):
    with pytest.raises(ValueError, match=r"cagrad: n_tasks must be a positive integer, got"):
        get_balancer("cagrad", n_tasks)


def test_tensor_vectors_are_accepted():
    assert get_balancer("ls", K, task_weights=torch.tensor([1.0, 2.0, 0.0])).n_tasks == K
    with pytest.raises(ValueError, match=r"ls: task_weights .* \(2 entries for 3 tasks\)"):
        get_balancer("ls", K, task_weights=torch.tensor([1.0, 2.0]))


def test_an_unknown_keyword_names_the_method_the_name_the_valid_ones_and_a_close_match():
    with pytest.raises(ValueError) as err:
        get_balancer("cagrad", K, C=0.3)
    msg = str(err.value)
    assert msg.startswith("cagrad: unknown hyperparameter 'C'; did you mean 'c'?")
    for valid in ("c", "rescale", "max_norm", "jacobian_engine", "gradient_path"):
        assert re.search(rf"\b{valid}\b", msg.split("valid:")[1])
    assert isinstance(err.value, TypeError)  # what the unexpected keyword raised before
    with pytest.raises(ValueError, match=r"famo: unknown hyperparameter 'wlr'; did you mean 'w_lr'\?"):
        get_balancer("famo", K, wlr=0.1)
    for method, names in FIXED_BY_SUBCLASS.items():  # fixed by the method (alpha=2), not arguments
        for name in names:
            with pytest.raises(TypeError, match="multiple values"):
                balancer_class(method)(K, **{name: 1.0})
            with pytest.raises(ValueError, match=rf"{method}: unknown hyperparameter '{name}' \(valid: "):
                get_balancer(method, K, **{name: 1.0})
    with pytest.raises(ValueError, match=r"imtl: unknown hyperparameter 'zzz' \(valid: gradient_path, "):
        get_balancer("imtl", K, zzz=1)


def test_the_accepted_names_are_the_ones_the_class_accepts():
    """A name the check accepts builds (no 'unexpected keyword' left over) and every other name is
    refused by the class itself too (the check refuses no argument the class takes)."""
    for method in METHODS:
        cls = balancer_class(method)
        assert not accepts_any_keyword(cls)
        for arg in arg_specs(cls, declared_params(method)):
            try:
                cls(K, **{arg: _valid_non_default(method, arg), **NEEDS.get((method, arg), {})})
            except TypeError as err:  # pragma: no cover - the failure message
                raise AssertionError(f"{method}: the class does not take {arg!r}: {err}") from err
        with pytest.raises(TypeError, match="unexpected keyword"):
            cls(K, not_an_argument=1)


def test_direct_construction_is_unchanged():
    """Only get_balancer checks: building the class keeps the constructor's own behaviour."""
    assert balancer_class("cagrad")(K, c=True).c == 1.0
    assert balancer_class("epo")(K, relax="no").relax is True  # bool("no"): the reason for the check
    with pytest.raises(ValueError):
        get_balancer("cagrad", K, c=True)


@pytest.mark.parametrize("method", METHODS)
def test_search_space_declarations_agree_with_the_check(method):
    """Every declared default and categorical choice (benchmark overrides included) passes the
    check, and the declared type matches the constructor's kind of the argument."""
    raw = registry.load_yaml(registry.search_space_file(method).read_text())
    space = load_space(method)
    for p in space.params:
        kind, none_ok = expected_kind(method, p.name)
        assert {"float": {"float", "float|vector"}, "int": {"int", "int|matrix"}, "simplex": {"vector"},
                "categorical": {"str", "bool", "int", "float", "float|vector", "int|matrix"}}[p.type] >= {kind}, \
            f"{method}.{p.name}: declared {p.type}, constructor {kind}"
        if p.type == "simplex":
            assert none_ok  # default null = all ones
    for bench in [None, *(raw.get("benchmarks") or {})]:
        for p in load_space(method, bench).params:
            values = [p.default, *(p.choices or ())]
            for value in values:
                if value is None:
                    continue
                k = len(value) if isinstance(value, list) else K
                registry.check_hparams(method, k, {p.name: value})


def test_the_search_preflight_runs_the_same_check():
    from mtl_tune.spaces import SpaceError

    space = load_space("dwa").with_fixed({"window": 25.0})  # the space's own check takes 25.0 for an int
    with pytest.raises(SpaceError, match=r"dwa: window must be an integer, got 25.0"):
        space.check_for(K, "nyuv2")


def test_plugin_style_class_without_annotations_uses_the_declared_types(monkeypatch):
    from mtl_tune.balancers.base import LossBalancer

    class Half(LossBalancer):
        name = "half_test"

        def __init__(self, n_tasks, scale=0.5, flag=False, mode="a", weights=None, **kw):
            super().__init__(n_tasks, **kw)

        def objective(self, losses):  # pragma: no cover - not stepped
            return losses.sum(), torch.ones_like(losses)

    declared = {"mode": {"type": "categorical", "choices": ["a", "b"], "default": "a"},
                "weights": {"type": "simplex", "default": None}}
    specs = arg_specs(Half, declared)
    assert specs["scale"].kinds == {"float"} and specs["flag"].kinds == {"bool"}
    assert specs["mode"].kinds == {"str"} and specs["weights"].kinds == {"vector"} and specs["weights"].none_ok
    from mtl_tune.balancers._hparams import check_hparams

    with pytest.raises(ValueError, match=r"half_test: scale must be a finite real number, got inf"):
        check_hparams(Half, K, {"scale": math.inf}, declared)
    with pytest.raises(ValueError, match=r"half_test: weights must be a list of 3 finite"):
        check_hparams(Half, K, {"weights": [1.0]}, declared)
    assert check_hparams(Half, K, {"scale": 1, "flag": np.bool_(True), "weights": None}, declared) == \
        (K, {"scale": 1, "flag": True, "weights": None})


@pytest.mark.parametrize(("name", "kwargs", "pattern"), [
    ("fairgrad", {"tol": -1.0}, "tol must be a finite number >= 0"),
    ("pivrg", {"max_iter": -1}, "max_iter must be an integer >= 0"),
    ("pcgrad", {"seed": 2 ** 70}, r"seed must be an integer in \[-2\*\*63, 2\*\*64\)"),
    ("graddrop", {"seed": -2 ** 64}, "seed must be an integer"),
    ("mgda", {"max_norm": float("inf")}, "max_norm must be a finite positive number or None"),
    ("ls", {"max_norm": True}, "max_norm must be a finite positive number or None"),
])
def test_constructors_refuse_what_get_balancer_would_refuse_too(name, kwargs, pattern):
    """Ranges are the constructors' checks: also when a class is built directly (no central check)."""
    with pytest.raises(ValueError, match=f"{name}: {pattern}"):
        registry.balancer_class(name)(3, **kwargs)
