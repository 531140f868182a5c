"""One registry for method and benchmark names.

Adding a method is one file in ``mtl_tune/balancers/`` (a :class:`Balancer` subclass with
a ``name``) plus one ``search_spaces/<name>.yaml``; adding a benchmark is one file in
``mtl_tune/benchmarks/``. The registry imports those packages' public modules once and
maps names to classes; modules whose name starts with ``_`` and ``base`` are skipped.
Unknown names raise :class:`UnknownNameError`, whose message lists the valid names.

**Cheap look-ups.** The names are also read from the modules' source (classes with a
``name = "..."`` attribute) and the entry points' names, without importing anything
(:func:`balancer_names`, :func:`check_names`: ``--help`` and name errors answer before torch
loads), and :func:`balancer_class` / :func:`benchmark_class` import only the one module that
declares a built-in name no plug-in claims (a trial needs one method and one benchmark).
tests/test_registry_names.py checks both against the full scan.

**Checked arguments.** :func:`get_balancer` runs :func:`check_hparams` first: every
hyperparameter's type and finiteness (and the name's existence) from the constructor's signature,
see :mod:`mtl_tune.balancers._hparams`; building a class directly skips it.

**Plug-ins.** An installed package adds methods and benchmarks through the entry-point
groups ``mtl_tune.balancers`` and ``mtl_tune.benchmarks`` (``name = "module:Class"``, the
entry-point name equal to the class's ``name``). A plug-in method's search space is the
YAML file its class names in ``search_space`` (relative to the class's module), by default
``search_spaces/<name>.yaml`` next to that module. A plug-in whose name is taken, whose
target is not a subclass of the right base, or which does not import is an error naming
the distribution, never skipped in silence. See docs/api.md.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import importlib.util
import importlib.resources
import inspect
import pkgutil
import re
from functools import cache
from pathlib import Path
from typing import Any

import yaml

BALANCER_GROUP = "mtl_tune.balancers"
BENCHMARK_GROUP = "mtl_tune.benchmarks"


def builtin_spaces_dir() -> Path:
    """Where the built-in methods' ``<method>.yaml`` files live: the checkout's top-level
    ``search_spaces/`` (the copy a user edits) when running from a checkout, else the copy
    shipped inside the installed package (``mtl_tune/search_spaces``)."""
    root = Path(__file__).resolve().parents[1]
    if (root / "pyproject.toml").is_file() and (root / "search_spaces").is_dir():
        return root / "search_spaces"
    return Path(str(importlib.resources.files("mtl_tune") / "search_spaces"))


BUILTIN_SPACES = builtin_spaces_dir()


class NumberLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that also reads ``1e40`` and ``1.0e40`` as numbers.

    PyYAML follows YAML 1.1, where a float needs a dot and a signed exponent, so ``1e-3``
    and ``1.0e40`` would arrive as strings; YAML 1.2 (and every user) reads them as floats.
    (Here, below :mod:`mtl_tune.spaces`, which re-exports it, because :func:`get_balancer` reads
    the search-space files' declared types too.)"""


def _mapping_without_duplicates(loader: NumberLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    """A mapping whose keys are distinct (merge keys ``<<`` aside: overriding a merged key is what
    they are for). PyYAML keeps the last of two equal keys: a second ``c:`` replaced the first, a
    second ``params:`` emptied a whole search space, silently."""
    seen = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
            continue
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError("while constructing a mapping", node.start_mark,
                                                    f"found the key {key!r} twice", key_node.start_mark)
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


NumberLoader.construct_mapping = _mapping_without_duplicates  # type: ignore[method-assign]
NumberLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def load_yaml(text: str) -> Any:
    """Safe YAML with YAML 1.2 numbers (see :class:`NumberLoader`)."""
    return yaml.load(text, Loader=NumberLoader)  # noqa: S506 — a SafeLoader subclass


class UnknownNameError(KeyError):
    """An unknown method or benchmark name; ``str()`` lists the valid ones."""

    def __init__(self, kind: str, name: str, valid: list[str]) -> None:
        self.kind, self.name, self.valid = kind, name, valid
        super().__init__(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(valid)}")

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


def _scan(package: str, base_name: str) -> dict[str, type]:
    pkg = importlib.import_module(package)
    base = getattr(importlib.import_module(f"{package}.base"), base_name)
    found: dict[str, type] = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.startswith("_") or info.name == "base":
            continue
        module = importlib.import_module(f"{package}.{info.name}")
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, base) and obj.__module__ == module.__name__ and getattr(obj, "name", ""):
                if obj.name in found and found[obj.name] is not obj:
                    raise RuntimeError(f"two classes register the name {obj.name!r}: "
                                       f"{found[obj.name].__module__} and {obj.__module__}")
                found[obj.name] = obj
    return dict(sorted(found.items()))


class PluginError(RuntimeError):
    """An installed plug-in that cannot be registered; the message names its distribution."""


def _plugins(group: str, base: type, builtin: dict[str, type]) -> dict[str, type]:
    found: dict[str, type] = {}
    for ep in importlib.metadata.entry_points(group=group):
        dist = getattr(ep.dist, "name", None) or "an unknown distribution"
        where = f"entry point {ep.name!r} = {ep.value!r} of {dist} (group {group})"
        try:
            obj = ep.load()
        except Exception as err:  # noqa: BLE001 - any import failure of third-party code
            raise PluginError(f"{where} does not load: {type(err).__name__}: {err}") from err
        if not (inspect.isclass(obj) and issubclass(obj, base)):
            raise PluginError(f"{where} is not a subclass of {base.__module__}.{base.__name__}")
        taken = builtin.get(ep.name) or found.get(ep.name)
        if taken is not None and taken is not obj:
            raise PluginError(f"{where}: the name {ep.name!r} is already taken by {taken.__module__}.{taken.__name__}")
        if getattr(obj, "name", "") != ep.name:
            raise PluginError(f"{where}: the class's name is {getattr(obj, 'name', '')!r}, not {ep.name!r}")
        problems = obj.declaration_problems() if hasattr(obj, "declaration_problems") else []
        if problems:  # a benchmark's tasks, metrics and reference points
            raise PluginError(f"{where}: {'; '.join(problems)}")
        found[ep.name] = obj
    return found


@cache
def balancer_classes() -> dict[str, type]:
    """Every method name → its :class:`~mtl_tune.balancers.base.Balancer` subclass (plug-ins included)."""
    from mtl_tune.balancers.base import Balancer
    builtin = _scan("mtl_tune.balancers", "Balancer")
    return dict(sorted({**builtin, **_plugins(BALANCER_GROUP, Balancer, builtin)}.items()))


@cache
def benchmark_classes() -> dict[str, type]:
    """Every benchmark name → its :class:`~mtl_tune.benchmarks.base.Benchmark` subclass (plug-ins included)."""
    from mtl_tune.benchmarks.base import Benchmark
    builtin = _scan("mtl_tune.benchmarks", "Benchmark")
    return dict(sorted({**builtin, **_plugins(BENCHMARK_GROUP, Benchmark, builtin)}.items()))


@cache
def _declarations(package: str) -> dict[str, tuple[str, ...]] | None:
    """Name → the public modules of ``package`` whose classes declare ``name = "<name>"``,
    read from their source without importing them (the modules import torch, SciPy, cvxpy:
    seconds). None when a module has no readable source (then only the full scan can tell)."""
    spec = importlib.util.find_spec(package)  # imports the parent package only
    if spec is None or not spec.submodule_search_locations:
        return None
    found: dict[str, tuple[str, ...]] = {}
    for info in pkgutil.iter_modules(spec.submodule_search_locations):
        if info.name.startswith("_") or info.name == "base":
            continue
        source = Path(getattr(info.module_finder, "path", "")) / f"{info.name}.py"
        if info.ispkg or not source.is_file():
            return None
        for node in ast.parse(source.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.ClassDef):
                for name in _class_name_attr(node):
                    found[name] = (*found.get(name, ()), info.name)
    return found


def _declared_names(package: str) -> list[str] | None:
    declared = _declarations(package)
    return None if declared is None else sorted(declared)


def _one_class(package: str, base_name: str, group: str, name: str) -> type | None:
    """``name``'s class, importing only the one built-in module that declares it; None when
    only the full scan can answer (the name declared in no module or in several, taken by a
    plug-in's entry point too, or not found as a subclass of the base where declared). A
    trial needs one method and one benchmark: this spares it importing all of them."""
    declared = (_declarations(package) or {}).get(name, ())
    if len(declared) != 1 or any(ep.name == name for ep in importlib.metadata.entry_points(group=group)):
        return None
    module = importlib.import_module(f"{package}.{declared[0]}")
    base = getattr(importlib.import_module(f"{package}.base"), base_name)
    matches = [obj for _, obj in inspect.getmembers(module, inspect.isclass)
               if issubclass(obj, base) and obj.__module__ == module.__name__ and getattr(obj, "name", "") == name]
    return matches[0] if len(matches) == 1 else None


def _class_name_attr(node: ast.ClassDef) -> list[str]:
    """``["cagrad"]`` for a class body with ``name = "cagrad"`` (or ``name: str = "cagrad"``)."""
    for stmt in node.body:
        target, value = None, None
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
            target, value = stmt.targets[0], stmt.value
        elif isinstance(stmt, ast.AnnAssign):
            target, value = stmt.target, stmt.value
        if (isinstance(target, ast.Name) and target.id == "name" and isinstance(value, ast.Constant)
                and isinstance(value.value, str) and value.value):
            return [value.value]
    return []


def _cheap_names(package: str, group: str, full: Any) -> list[str]:
    """Sorted names of ``package``'s classes plus the plug-ins' entry-point names, without
    importing any of them; the full registry's names when it is loaded already or when a
    module's source cannot be read. Equal to the full registry's names (tests/test_registry_names.py);
    a plug-in that does not load still fails when it is used (the full scan)."""
    if full.cache_info().currsize:
        return list(full())
    declared = _declared_names(package)
    if declared is None:
        return list(full())
    return sorted({*declared, *(ep.name for ep in importlib.metadata.entry_points(group=group))})


def balancer_names() -> list[str]:
    """Sorted method names (plug-ins included) without importing the methods' modules: for
    ``--help`` and name checks, which must answer before torch loads."""
    return _cheap_names("mtl_tune.balancers", BALANCER_GROUP, balancer_classes)


def benchmark_names() -> list[str]:
    """Sorted benchmark names (plug-ins included) without importing the benchmarks' modules."""
    return _cheap_names("mtl_tune.benchmarks", BENCHMARK_GROUP, benchmark_classes)


def check_names(kind: str, names: list[str]) -> None:
    """:class:`UnknownNameError` for the first of ``names`` that is not a registered ``kind``
    (``"method"`` or ``"benchmark"``), checked without importing the modules."""
    valid = balancer_names() if kind == "method" else benchmark_names()
    for name in names:
        if name not in valid:
            raise UnknownNameError(kind, name, valid)


def search_space_file(method: str) -> Path:
    """The search-space YAML of ``method``: ``search_spaces/<method>.yaml`` for built-in
    methods; for a plug-in the file its class names in ``search_space`` (relative to its
    module's folder), by default ``search_spaces/<method>.yaml`` next to its module."""
    cls = balancer_class(method)
    if cls.__module__.startswith("mtl_tune."):
        return BUILTIN_SPACES / f"{method}.yaml"
    module_dir = Path(inspect.getfile(cls)).resolve().parent
    return module_dir / (getattr(cls, "search_space", None) or f"search_spaces/{method}.yaml")


def clear_cache() -> None:
    """Forget the scanned names (after installing a plug-in into a running process)."""
    balancer_classes.cache_clear()
    benchmark_classes.cache_clear()
    _declarations.cache_clear()
    declared_params.cache_clear()


def available_balancers() -> list[str]:
    """Sorted method names, plug-ins included."""
    return list(balancer_classes())


def available_benchmarks() -> list[str]:
    """Sorted benchmark names, plug-ins included."""
    return list(benchmark_classes())


def balancer_class(name: str) -> type:
    """The Balancer subclass registered as ``name``; :class:`UnknownNameError` lists the valid ones.
    A built-in name no plug-in claims imports only its own module (the others are not needed)."""
    if not balancer_classes.cache_info().currsize:
        cls = _one_class("mtl_tune.balancers", "Balancer", BALANCER_GROUP, name)
        if cls is not None:
            return cls
    classes = balancer_classes()
    if name not in classes:
        raise UnknownNameError("method", name, list(classes))
    return classes[name]


def imposed_options(method: str, benchmark: Any, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The constructor arguments ``benchmark`` imposes (``Benchmark.balancer_options``) that the method
    registered as ``method`` names in its constructor; arguments it does not take are left out."""
    offered = benchmark.balancer_options(config)
    if not offered:
        return {}
    params = inspect.signature(balancer_class(method).__init__).parameters
    return {arg: value for arg, value in offered.items() if arg in params}


def benchmark_class(name: str) -> type:
    """The Benchmark subclass registered as ``name``; :class:`UnknownNameError` lists the valid ones.
    A built-in name no plug-in claims imports only its own module."""
    if not benchmark_classes.cache_info().currsize:
        cls = _one_class("mtl_tune.benchmarks", "Benchmark", BENCHMARK_GROUP, name)
        if cls is not None:
            return cls
    classes = benchmark_classes()
    if name not in classes:
        raise UnknownNameError("benchmark", name, list(classes))
    return classes[name]


@cache
def declared_params(method: str) -> dict[str, dict[str, Any]]:
    """The ``params`` mapping of ``method``'s search-space YAML as written (no benchmark overrides),
    for the declared types of :func:`check_hparams`; empty when the file is missing or malformed
    (:func:`mtl_tune.spaces.load_space` reports that; building a balancer does not need the file)."""
    try:
        data = load_yaml(search_space_file(method).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    params = data.get("params") if isinstance(data, dict) else None
    return {k: v for k, v in params.items() if isinstance(v, dict)} if isinstance(params, dict) else {}


def check_hparams(name: str, n_tasks: Any, hparams: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """Check the type and finiteness of ``n_tasks`` and of every hyperparameter of the method ``name``
    before its class is built: unknown names, wrong types, NaN/inf and vectors of the wrong length
    raise :class:`mtl_tune.balancers._hparams.HyperparameterError` (a ``ValueError``) naming the
    method, the argument, the value and what is allowed (rules: :mod:`mtl_tune.balancers._hparams`;
    ranges stay the constructors' checks). Returns ``n_tasks`` as an int and the hyperparameters
    with NumPy scalars as Python numbers."""
    from mtl_tune.balancers._hparams import check_hparams as check

    return check(balancer_class(name), n_tasks, hparams, declared_params(name))


def get_balancer(name: str, n_tasks: int, **hparams: Any):
    """Instantiate the balancer ``name`` for ``n_tasks`` tasks with its hyperparameters, after
    :func:`check_hparams` (building the class directly skips that check)."""
    n_tasks, hparams = check_hparams(name, n_tasks, hparams)
    return balancer_class(name)(n_tasks, **hparams)


def get_benchmark(name: str, **options: Any):
    """Instantiate the benchmark ``name`` with its options (``data_root``, ``synthetic``, ...)."""
    return benchmark_class(name)(**options)
