"""Declarative search spaces: ``search_spaces/<method>.yaml`` → Optuna define-by-run → constructor arguments.

Both directions of a sampled value live here: :class:`SpaceSampler` ENCODES a space for
Optuna (a simplex parameter becomes K uniforms ``hparams/<name>/<i>``) and
:func:`decode_hparams` turns what a trial receives back into the balancer's constructor
arguments (those K uniforms become Dirichlet(1) weights summing to K). The search uses the
first, the trainer and the trial table the second; neither needs the other's layer.

The file format is documented in ``search_spaces/README.md``. Loading validates every
field and raises :class:`SpaceError` naming the file, the key and what is allowed.
:class:`SpaceSampler` is the define-by-run function handed to OptunaSearch; it lives in
this importable module (never ``__main__`` or a closure) so a pickled searcher can be
restored by ``Tuner.restore`` from any entry point
(docs/references.md#restore-needs-an-importable-search-space).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from mtl_tune.registry import (BUILTIN_SPACES, NumberLoader, balancer_class, benchmark_names,  # noqa: F401 - re-exported
                               check_hparams, load_yaml, search_space_file)

#: the built-in methods' search-space folder (the checkout's search_spaces/, else the packaged copy)
SPACES_DIR = BUILTIN_SPACES
TYPES = ("float", "int", "categorical", "simplex")
PARAM_FIELDS = {"type", "low", "high", "log", "step", "choices", "default", "search", "description"}
TOP_FIELDS = {"method", "description", "params", "benchmarks"}
HP_PREFIX = "hparams/"
#: largest |bound| of an int parameter: bounds are read as floats (exact up to 2**53), and
#: Optuna's TPE fails on integers beyond int64 mid-search
MAX_INT_BOUND = 2**53


class SpaceError(ValueError):
    """A malformed search-space file or override; the message names file, key and rule."""


@dataclass(frozen=True)
class Param:
    name: str
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] | None = None
    default: Any = None
    search: bool = True
    description: str = ""

    @property
    def searchable(self) -> bool:
        return self.search and not (self.default is None and self.type != "simplex")

    def check_value(self, value: Any, where: str) -> None:
        """Raise SpaceError if ``value`` is outside this parameter's declared domain."""
        if value is None:
            return
        if self.type in ("float", "int"):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise SpaceError(f"{where}: {self.name} must be a number, got {value!r}")
            if self.type == "int" and int(value) != value:
                raise SpaceError(f"{where}: {self.name} must be an integer, got {value!r}")
            if not (self.low <= value <= self.high):
                raise SpaceError(f"{where}: {self.name}={value!r} is outside its range [{self.low}, {self.high}]")
        elif self.type == "categorical" and value not in self.choices:
            raise SpaceError(f"{where}: {self.name}={value!r} is not one of {list(self.choices)}")
        elif self.type == "simplex":
            if not isinstance(value, (list, tuple)) or any(not isinstance(v, (int, float)) or v < 0 for v in value):
                raise SpaceError(f"{where}: {self.name} must be a list of non-negative numbers, got {value!r}")


@dataclass(frozen=True)
class SearchSpace:
    method: str
    params: tuple[Param, ...]
    source: str = ""
    description: str = ""
    fixed: dict[str, Any] = field(default_factory=dict)

    def searchable(self) -> list[Param]:
        return [p for p in self.params if p.searchable and p.name not in self.fixed]

    def constants(self) -> dict[str, Any]:
        """Values that are not searched: defaults of unsearched params plus ``--set`` values."""
        out = {p.name: p.default for p in self.params if not p.searchable and p.type != "simplex"}
        out.update({p.name: p.default for p in self.params if p.type == "simplex" and not p.searchable
                    and p.default is not None})
        out.update(self.fixed)
        return {k: v for k, v in out.items() if v is not None}

    def default_point(self, n_tasks: int) -> dict[str, Any]:
        """Optuna parameter values that reproduce every default (the first trial)."""
        point: dict[str, Any] = {}
        for p in self.searchable():
            if p.type == "simplex":
                point.update({f"{HP_PREFIX}{p.name}/{i}": u for i, u in enumerate(simplex_draws(p.default, n_tasks))})
            else:
                point[f"{HP_PREFIX}{p.name}"] = p.default
        return point

    def with_fixed(self, values: dict[str, Any]) -> SearchSpace:
        by_name = {p.name: p for p in self.params}
        for key, value in values.items():
            if key not in by_name:
                raise SpaceError(f"--set {key}: {self.method} has no hyperparameter {key!r}; "
                                 f"valid: {', '.join(by_name) or '(none)'}")
            _check_not_null(by_name[key], value)
            by_name[key].check_value(value, f"--set {key}")
        return replace(self, fixed={**self.fixed, **values})

    def check_for(self, n_tasks: int, benchmark: str, imposed: dict[str, Any] | None = None) -> None:
        """Raise SpaceError unless the method can be built for ``n_tasks`` tasks with the
        fixed values and defaults, and with every categorical choice: the checks of
        :func:`mtl_tune.registry.get_balancer` (types, finiteness, vector lengths: one entry per
        task) and the balancers' constructors (ranges)."""
        for p in self.params:
            value = self.fixed.get(p.name)
            if p.type == "simplex" and value is not None and len(value) != n_tasks:
                raise SpaceError(f"--set {p.name}={value!r}: {self.method} needs {n_tasks} values "
                                 f"(one per task of {benchmark}), got {len(value)}")
            if p.type == "simplex" and p.default is not None and (len(p.default) != n_tasks or not any(p.default)):
                raise SpaceError(f"{self.source}: params.{p.name}.default {list(p.default)!r} must be {n_tasks} "
                                 f"non-negative weights, not all 0 (one per task of {benchmark})")
        base = {**(imposed or {}), **self.constants()}
        cls = balancer_class(self.method)
        trials = [("", base)] + [(f"{p.name}={c!r}", {**base, p.name: c}) for p in self.searchable()
                                 if p.type == "categorical" for c in p.choices]
        for label, kwargs in trials:
            try:  # the same checks as get_balancer: types and finiteness first, then the constructor's
                k, kwargs = check_hparams(self.method, n_tasks, kwargs)
                cls(k, **kwargs)
            except (ValueError, TypeError) as err:
                where = f"choice {label} in {self.source}" if label else \
                    (f"--set {', '.join(self.fixed)}" if self.fixed else self.source)
                raise SpaceError(f"{where}: {self.method} cannot be built for the {n_tasks} tasks of "
                                 f"{benchmark}: {err}") from None


def _check_not_null(param: Param, value: Any) -> None:
    """``--set name=`` (YAML null) would silently stop searching a parameter and drop it from the
    constants: allowed only where null is the declared default (e.g. no preference vector)."""
    if value is None and param.default is not None:
        raise SpaceError(f"--set {param.name}: an empty/null value is not allowed for {param.name}, whose declared "
                         f"default is {param.default!r}; give a value")


def _flag(raw: dict[str, Any], key: str, default: bool, where: str) -> bool:
    """A true/false field; anything else is an error (``bool("false")`` is True, ``bool(None)`` False)."""
    value = raw.get(key, default)
    if not isinstance(value, bool):
        raise SpaceError(f"{where} must be true or false, got {value!r}")
    return value


def _parse_bounds(name: str, raw: dict[str, Any], ptype: str, where: str) -> tuple[float, float, bool]:
    """(low, high, log) of a float/int parameter, each finite and with a finite high − low:
    Optuna's samplers overflow on infinite or huge ranges mid-search, long after validation."""
    for bound in ("low", "high"):
        value = raw.get(bound)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise SpaceError(f"{where}: params.{name}.{bound} must be a number for type {ptype}, got {value!r}")
        if not math.isfinite(float(value)):
            raise SpaceError(f"{where}: params.{name}.{bound} must be a finite number, got {value!r}")
    low, high = float(raw["low"]), float(raw["high"])
    if not low < high:
        raise SpaceError(f"{where}: params.{name} needs low < high, got low={low}, high={high}")
    if not math.isfinite(high - low):
        raise SpaceError(f"{where}: params.{name} range [{low:g}, {high:g}] is too wide: high - low overflows")
    if ptype == "int" and max(abs(low), abs(high)) > MAX_INT_BOUND:
        raise SpaceError(f"{where}: params.{name} bounds of an int parameter must lie within ±2**53, "
                         f"got low={low:g}, high={high:g}")
    log = _flag(raw, "log", False, f"{where}: params.{name}.log")
    if ptype == "int" and (int(low) != low or int(high) != high):  # int() would move them: 0.5 → 0 widens the range
        raise SpaceError(f"{where}: params.{name} bounds of an int parameter must be whole numbers, "
                         f"got low={raw['low']!r}, high={raw['high']!r}")
    if log and low <= 0:
        raise SpaceError(f"{where}: params.{name} has log: true, which needs low > 0 (got {low})")
    return low, high, log


def _parse_param(name: str, raw: Any, where: str) -> Param:
    if not isinstance(raw, dict):
        raise SpaceError(f"{where}: params.{name} must be a mapping of fields, got {type(raw).__name__}")
    unknown = set(raw) - PARAM_FIELDS
    if unknown:
        raise SpaceError(f"{where}: params.{name} has unknown field(s) {sorted(unknown)}; allowed: {sorted(PARAM_FIELDS)}")
    ptype = raw.get("type")
    if ptype not in TYPES:
        raise SpaceError(f"{where}: params.{name}.type must be one of {list(TYPES)}, got {ptype!r}")
    kw: dict[str, Any] = {"name": name, "type": ptype, "default": raw.get("default"),
                          "search": _flag(raw, "search", True, f"{where}: params.{name}.search"),
                          "description": str(raw.get("description", ""))}
    if ptype in ("float", "int"):
        low, high, log = _parse_bounds(name, raw, ptype, where)
        kw.update(low=low if ptype == "float" else int(low), high=high if ptype == "float" else int(high), log=log,
                  step=_parse_step(raw.get("step"), ptype, low, high, log, f"{where}: params.{name}.step"))
    elif ptype == "categorical":
        choices = raw.get("choices")
        if not isinstance(choices, list) or not choices:
            raise SpaceError(f"{where}: params.{name}.choices must be a non-empty list for type categorical")
        kw["choices"] = tuple(choices)
    param = Param(**kw)
    param.check_value(param.default, f"{where}: params.{name}.default")
    if param.step is not None and param.default is not None:  # the first trial must be a point of the grid
        n = (param.default - param.low) / param.step
        if abs(n - round(n)) > 1e-9 * max(1.0, abs(n)):
            raise SpaceError(f"{where}: params.{name}.default {param.default!r} is not on its grid low + k·step "
                             f"({param.low!r} + k·{param.step!r})")
    return param


def _parse_step(step: Any, ptype: str, low: float, high: float, log: bool, where: str) -> float | int | None:
    """Grid step of a float/int parameter: a number in (0, high − low], an integer for int,
    not combined with ``log: true`` (Optuna cannot draw a log-scaled grid)."""
    if step is None:
        return None
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not math.isfinite(step):
        raise SpaceError(f"{where} must be a number, got {step!r}")
    if not 0 < step <= high - low:
        raise SpaceError(f"{where} must be in (0, high − low] = (0, {high - low:g}], got {step!r}")
    if ptype == "int" and int(step) != step:
        raise SpaceError(f"{where} must be an integer for type int, got {step!r}")
    if log:
        raise SpaceError(f"{where}: a grid step cannot be combined with log: true; drop one of them")
    return int(step) if ptype == "int" else float(step)


def parse_space(data: Any, source: str, benchmark: str | None = None) -> SearchSpace:
    if not isinstance(data, dict):
        raise SpaceError(f"{source}: the file must be a YAML mapping with keys {sorted(TOP_FIELDS)}")
    unknown = set(data) - TOP_FIELDS
    if unknown:
        raise SpaceError(f"{source}: unknown top-level key(s) {sorted(unknown)}; allowed: {sorted(TOP_FIELDS)}")
    method = data.get("method")
    if not isinstance(method, str):
        raise SpaceError(f"{source}: 'method' must name a registered method")
    cls = balancer_class(method)
    raw_params = data.get("params") or {}
    if not isinstance(raw_params, dict):
        raise SpaceError(f"{source}: 'params' must be a mapping of hyperparameter name → fields")
    all_overrides = _benchmark_overrides(data.get("benchmarks"), source)
    for bench, entries in all_overrides.items():  # every benchmark's, not only the one in use
        for name, fields in (entries or {}).items():
            if name not in raw_params:
                raise SpaceError(f"{source}: benchmarks.{bench}.{name} overrides an undeclared hyperparameter; "
                                 f"declared: {', '.join(raw_params) or '(none)'}")
            if isinstance(raw_params[name], dict) and bench != benchmark:  # the one in use: parsed below
                _parse_param(name, {**raw_params[name], **fields}, f"{source} (benchmarks.{bench})")
    overrides = (all_overrides.get(benchmark) or {}) if benchmark else {}
    accepted = _constructor_args(cls)
    params = []
    for name, raw in raw_params.items():
        if name not in accepted:
            raise SpaceError(f"{source}: params.{name} is not an argument of {cls.__name__}; "
                             f"allowed: {', '.join(sorted(accepted))}")
        merged = {**raw, **overrides.get(name, {})} if isinstance(raw, dict) else raw
        params.append(_parse_param(name, merged, source))
    return SearchSpace(method=method, params=tuple(params), source=source, description=str(data.get("description", "")))


def _benchmark_overrides(raw: Any, source: str) -> dict[Any, dict[str, dict[str, Any]]]:
    """The ``benchmarks`` section: benchmark → hyperparameter → fields. Every benchmark's entry is
    checked, not only the one in use, so a malformed file fails on any machine, for any benchmark."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise SpaceError(f"{source}: 'benchmarks' must be a mapping of benchmark name → overrides, "
                         f"got {type(raw).__name__}")
    known = benchmark_names()
    for bench, entries in raw.items():
        if bench not in known:  # a misspelt name would be ignored for good
            raise SpaceError(f"{source}: benchmarks.{bench} names no benchmark; known: {', '.join(known)}")
        if entries is None:
            continue
        if not isinstance(entries, dict):
            raise SpaceError(f"{source}: benchmarks.{bench} must be a mapping of hyperparameter → fields, "
                             f"got {type(entries).__name__}")
        for name, fields in entries.items():
            if not isinstance(fields, dict):
                raise SpaceError(f"{source}: benchmarks.{bench}.{name} must be a mapping of fields to override "
                                 f"(e.g. {{default: 0.5}}), got {type(fields).__name__} {fields!r}")
    return raw


def _constructor_args(cls: type) -> set[str]:
    """The arguments a search space may declare: those ``get_balancer`` accepts (the one derivation
    from the constructors, :func:`mtl_tune.balancers._hparams.arg_specs`), less the engine object."""
    from mtl_tune.balancers._hparams import arg_specs

    return set(arg_specs(cls)) - {"jacobian_engine"}


def load_space(method: str, benchmark: str | None = None, path: str | Path | None = None) -> SearchSpace:
    """Load ``path`` (or the method's ``search_spaces/<method>.yaml``; a plug-in's own file, see
    :func:`mtl_tune.registry.search_space_file`), apply ``benchmark`` overrides, validate."""
    file = Path(path) if path is not None else search_space_file(method)
    if file.is_dir():
        raise SpaceError(f"search-space file {file} is a folder; give the .yaml file")
    if not file.is_file():
        raise SpaceError(f"search-space file {file} does not exist" +
                         ("" if path else f" (every method needs search_spaces/{method}.yaml)"))
    try:
        data = load_yaml(file.read_text())
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as err:
        raise SpaceError(f"{file}: not valid YAML: {' '.join(str(err).split())}") from None
    space = parse_space(data, str(file), benchmark)
    if space.method != method:
        raise SpaceError(f"{file}: declares method {space.method!r} but is used for {method!r}")
    return space


class SpaceSampler:
    """Optuna define-by-run function for one method's space (picklable, importable)."""

    def __init__(self, space: SearchSpace, n_tasks: int, constants: dict[str, Any]) -> None:
        self.space = space
        self.n_tasks = n_tasks
        self.constants = constants

    def __call__(self, trial: Any) -> dict[str, Any]:
        for p in self.space.searchable():
            key = f"{HP_PREFIX}{p.name}"
            if p.type == "float":
                trial.suggest_float(key, p.low, p.high, log=p.log, step=p.step)
            elif p.type == "int":
                trial.suggest_int(key, int(p.low), int(p.high), log=p.log, step=int(p.step or 1))
            elif p.type == "categorical":
                trial.suggest_categorical(key, list(p.choices))
            else:  # simplex: K uniforms, turned into Dirichlet(1) weights by the trainer
                for i in range(self.n_tasks):
                    trial.suggest_float(f"{key}/{i}", 1e-6, 1.0)
        fixed = {f"{HP_PREFIX}{k}": v for k, v in self.space.constants().items()}
        return {**self.constants, **fixed}


def simplex_draws(default: Any, n_tasks: int) -> list[float]:
    """The K uniforms :func:`decode_hparams` turns into ``default`` (scaled to sum K): the first
    trial's point. Without a default, or with equal weights, equal draws (0.5) give equal weights;
    otherwise uᵢ = exp(−wᵢ/max w) ∈ [e⁻¹, 1], whose −log uᵢ are proportional to the weights."""
    if default is None or len(set(default)) == 1:
        return [0.5] * n_tasks
    top = max(float(w) for w in default)
    return [math.exp(-float(w) / top) for w in default]


def decode_hparams(raw: dict[str, Any] | None, n_tasks: int) -> dict[str, Any]:
    """Turn the hyperparameters a trial receives into constructor arguments (the inverse of
    :class:`SpaceSampler`'s encoding).

    A simplex parameter arrives as ``{"0": u0, "1": u1, …}`` (K uniforms in (0, 1]); it
    becomes weights w_i = −log u_i / Σ_j −log u_j · K (a uniform Dirichlet draw scaled to sum K).
    """
    out: dict[str, Any] = {}
    for key, value in (raw or {}).items():
        if isinstance(value, dict) and value and all(str(k).isdigit() for k in value):
            u = np.array([float(value[str(i)]) for i in range(len(value))])
            if len(u) != n_tasks:
                raise ValueError(f"hyperparameter {key!r} has {len(u)} components but the benchmark has {n_tasks} tasks")
            e = -np.log(np.clip(u, 1e-12, 1.0))
            out[key] = (e / e.sum() * n_tasks).tolist() if e.sum() > 0 else [1.0] * n_tasks
        else:
            out[key] = value
    return out
