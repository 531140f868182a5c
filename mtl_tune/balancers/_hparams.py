"""The type and finiteness check of a method's constructor arguments, run by ``get_balancer``.

What a method accepts is read from what is declared already, never listed twice:

* **names**: the constructors' signatures along the class's MRO (a subclass's own arguments, then
  those its ``**kw`` forwards to its bases: ``max_norm`` and ``jacobian_engine`` of
  :class:`~mtl_tune.balancers.base.Balancer`, ``gradient_path`` of a gradient method), less the
  ones a subclass fixes in its own ``super().__init__(...)`` call (ConsMTL's ``alpha=2.0``);
* **types**: each argument's annotation (``float``, ``int``, ``bool``, ``str``, ``Sequence[float]``
  — one number per task —, unions and ``None``); where an argument has none (a plug-in), the
  ``type`` its search-space YAML declares (``float`` / ``int`` / ``simplex`` / ``categorical``,
  whose choices' types count), else the type of its default.

The rules: a float is a real number (int, float, NumPy real; never a bool, a string or None)
and finite; an int is an integer (``operator.index``, not a bool); a bool is ``True`` / ``False``
(or a NumPy bool), not a string; a string argument is a string (the constructors check which
ones); a per-task vector is a list, tuple, 1-D array or tensor of ``n_tasks`` finite real
numbers (a string is not a sequence here); ``None`` only where the annotation or the default
says ``None`` (= off). No method documents an infinite hyperparameter as meaningful, so none is
allowed. An unknown name is refused naming the valid ones (and the close match of a typo).

Ranges (``w_lr > 0``, ``0 ≤ beta < 1``, a vector's non-negativity, which strings) stay the
constructors' own checks; the YAML's ``low`` / ``high`` and numeric ``choices`` are SEARCH ranges,
not limits, and are not read here. Every refusal is a :class:`HyperparameterError` — a
``ValueError`` as the constructors' range errors, and a ``TypeError`` too, as the unexpected
keyword or wrong type Python raised before — naming the method, the argument, the value and what
is allowed. Building a class directly skips this check (only ``get_balancer`` and the search's
pre-flight :meth:`mtl_tune.spaces.SearchSpace.check_for` run it).
"""

from __future__ import annotations

import ast
import collections.abc
import difflib
import inspect
import math
import numbers
import operator
import textwrap
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import torch

class HyperparameterError(ValueError, TypeError):
    """An invalid constructor argument given to ``get_balancer``; the message names the method,
    the argument, the value and what is allowed. A ValueError (the project's convention for
    invalid hyperparameters) that is also a TypeError (what an unknown keyword or a wrong type
    raised before this check)."""


@dataclass(frozen=True)
class ArgSpec:
    """What one constructor argument accepts: ``kinds`` among ``float``, ``int``, ``bool``, ``str``,
    ``vector`` (one finite number per task), ``matrix`` (a list of such vectors), ``instance`` (of
    ``classes``) and ``any`` (not checked: an annotation this module cannot read)."""

    name: str
    kinds: frozenset[str]
    none_ok: bool = False
    #: the only strings accepted where a string is a sentinel of a numeric argument (``max_norm="default"``)
    strings: tuple[str, ...] | None = None
    classes: tuple[type, ...] = ()

    def allowed(self, n_tasks: int) -> str:
        """The accepted values in words."""
        words = []
        for kind in ("float", "int", "bool", "str", "vector", "matrix", "instance"):
            if kind not in self.kinds:
                continue
            if kind == "float":
                words.append("a finite real number")
            elif kind == "int":
                words.append("an integer")
            elif kind == "bool":
                words.append("True or False")
            elif kind == "str":
                words.append(" or ".join(map(repr, self.strings)) if self.strings else "a string")
            elif kind == "vector":
                words.append(f"a list of {n_tasks} finite real numbers (one per task)")
            elif kind == "matrix":
                words.append(f"a list of {n_tasks}-vectors of finite real numbers")
            else:
                words.append(" or ".join(f"a {c.__name__}" for c in self.classes))
        if self.none_ok:
            words.append("None")
        if not words:
            return "nothing (no value is accepted)"
        return ", ".join(words[:-1]) + (" or " if len(words) > 1 else "") + words[-1]


# ---------------------------------------------------------------- reading the declarations
def _is_real_type(tp: Any) -> bool:
    return tp in (float, int) or (inspect.isclass(tp) and issubclass(tp, numbers.Real) and tp is not bool)


def _kinds_of_hint(hint: Any) -> tuple[set[str], bool, tuple[type, ...]]:
    """(kinds, None allowed, classes) of a resolved annotation; ``{"any"}`` where it cannot tell."""
    if hint is None or hint is type(None):
        return set(), True, ()
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        kinds: set[str] = set()
        none_ok, classes = False, ()
        for arg in typing.get_args(hint):
            k, n, c = _kinds_of_hint(arg)
            kinds |= k
            none_ok |= n
            classes += c
        return kinds, none_ok, classes
    if origin is typing.Literal:
        kinds, none_ok = set(), False
        for value in typing.get_args(hint):
            if value is None:
                none_ok = True
            else:
                kinds |= _kinds_of_hint(type(value))[0]
        return kinds, none_ok, ()
    if hint is bool:
        return {"bool"}, False, ()
    if hint is int:
        return {"int"}, False, ()
    if hint is float or _is_real_type(hint):
        return {"float"}, False, ()
    if hint is str:
        return {"str"}, False, ()
    if origin in (collections.abc.Sequence, list, tuple, collections.abc.Iterable, collections.abc.Collection):
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        if len(args) == 1 and _is_real_type(args[0]):
            return {"vector"}, False, ()
        if len(args) == 1:
            inner = _kinds_of_hint(args[0])[0]
            if inner == {"vector"}:
                return {"matrix"}, False, ()
        return {"any"}, False, ()
    if inspect.isclass(hint) and hint.__module__ not in ("builtins", "typing"):
        return {"instance"}, False, (hint,)
    return {"any"}, False, ()


_PLAIN = {"float": float, "int": int, "bool": bool, "str": str, "None": None}


def _resolve(annotation: Any, func: Any, hints: dict[str, Any], name: str) -> Any:
    """The annotation of ``name`` as an object: from ``typing.get_type_hints`` when that worked,
    else evaluated alone in the function's module, else (names under ``TYPE_CHECKING``) read from
    the string's plain parts (``float | None``); ``inspect.Parameter.empty`` when there is none."""
    if name in hints:
        return hints[name]
    if not isinstance(annotation, str):
        return annotation
    try:
        return eval(annotation, getattr(func, "__globals__", {}))  # noqa: S307 - the class's own source
    except Exception:  # noqa: BLE001 - an unresolvable name: fall back to the plain parts
        parts = [p.strip() for p in annotation.split("|")]
        if all(p in _PLAIN for p in parts):
            return typing.Union[tuple(_PLAIN[p] or type(None) for p in parts)]  # noqa: UP007
        return typing.Any


def _fixed_and_forwarded(init: Any, var_kw: str | None) -> tuple[set[str], bool, dict[str, Any]]:
    """Keywords ``init`` fixes in its ``super().__init__(...)`` (or ``Base.__init__(self, ...)``)
    call, whether that call forwards ``**var_kw`` (otherwise the class keeps the extra keywords
    itself: no name is unknown), and the keywords it reads out of ``**var_kw`` itself before
    forwarding the rest (``kw.pop("alpha", 1.0)``, ``kw.get(...)``, ``kw["alpha"]``) → their literal
    default (``Parameter.empty`` when none). A key read by a non-literal name counts as keeping every
    keyword (not forwarded). Without readable source: nothing fixed, forwarded."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(init)))
    except (OSError, TypeError, SyntaxError):
        return set(), True, {}
    fixed: set[str] = set()
    read: dict[str, Any] = {}
    forwarded, dynamic = False, False
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "__init__":
            for kw in node.keywords:
                if kw.arg is not None:
                    fixed.add(kw.arg)
                elif isinstance(kw.value, ast.Name) and kw.value.id == var_kw:
                    forwarded = True
        key = default_node = None
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args \
                and isinstance(node.func.value, ast.Name) and node.func.value.id == var_kw \
                and node.func.attr in ("pop", "get", "setdefault"):
            key, default_node = node.args[0], (node.args[1] if len(node.args) > 1 else None)
        elif isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == var_kw:
            key = node.slice
        if key is None:
            continue
        if isinstance(key, ast.Constant) and isinstance(key.value, str):
            literal = default_node is not None and isinstance(default_node, ast.Constant)
            read.setdefault(key.value, default_node.value if literal else inspect.Parameter.empty)
        else:
            dynamic = True
    return fixed, forwarded and not dynamic, read


@dataclass(frozen=True)
class _Signature:
    params: tuple[tuple[str, Any, Any], ...]  # (name, default, resolved annotation)
    open: bool                                     # a class keeps unknown keywords itself


@cache
def _signature(cls: type) -> _Signature:
    """The constructor arguments of ``cls`` along its MRO (see the module docstring)."""
    found: dict[str, tuple[Any, Any]] = {}
    fixed: set[str] = set()
    for klass in cls.__mro__:
        init = vars(klass).get("__init__")
        if init is None:
            continue
        if klass is torch.nn.Module or klass is object:
            break
        sig = inspect.signature(init)
        try:
            hints = typing.get_type_hints(init)
        except Exception:  # noqa: BLE001 - a name only imported under TYPE_CHECKING: resolve one by one
            hints = {}
        var_kw = None
        for i, (name, p) in enumerate(sig.parameters.items()):
            if p.kind is p.VAR_KEYWORD:
                var_kw = name
                continue
            if i < 2 or p.kind in (p.VAR_POSITIONAL, p.POSITIONAL_ONLY):  # self, n_tasks
                continue
            if name in found or name in fixed:
                continue
            annotation = inspect.Parameter.empty if p.annotation is p.empty else \
                _resolve(p.annotation, init, hints, name)
            found[name] = (p.default, annotation)
        if var_kw is None:
            break
        more_fixed, forwarded, read = _fixed_and_forwarded(init, var_kw)
        if not forwarded:
            return _Signature(tuple((n, *v) for n, v in found.items()), open=True)
        for name, default in read.items():  # taken out of **kw by this class itself
            if name not in found and name not in fixed:
                found[name] = (default, inspect.Parameter.empty)
        fixed |= more_fixed
    return _Signature(tuple((n, *v) for n, v in found.items()), open=False)


def _kinds_of_declared(declared: Mapping[str, Any]) -> tuple[set[str], bool]:
    """Kinds from a search-space declaration ``{"type": ..., "choices": [...], "default": ...}``."""
    ptype = declared.get("type")
    if ptype == "float":
        return {"float"}, False
    if ptype == "int":
        return {"int"}, False
    if ptype == "simplex":
        return {"vector"}, False
    if ptype == "categorical":
        kinds, none_ok = set(), False
        for choice in declared.get("choices") or ():
            if choice is None:
                none_ok = True
            else:
                kinds |= _kinds_of_value(choice)
        return kinds or {"any"}, none_ok
    return {"any"}, False


def _kinds_of_value(value: Any) -> set[str]:
    if isinstance(value, (bool, np.bool_)):
        return {"bool"}
    if isinstance(value, numbers.Real):
        return {"float"}  # an int default of an unannotated argument may stand for any number
    if isinstance(value, str):
        return {"str"}
    if isinstance(value, (list, tuple)):
        return {"vector"}
    return {"any"}


def arg_specs(cls: type, declared: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, ArgSpec]:
    """Every argument ``cls`` takes besides ``n_tasks`` → what it accepts; ``declared`` is the
    method's search-space ``params`` mapping (read only for arguments without an annotation)."""
    out: dict[str, ArgSpec] = {}
    for name, default, annotation in _signature(cls).params:
        none_ok, classes = default is None, ()
        if annotation is not inspect.Parameter.empty and annotation is not typing.Any:
            kinds, hint_none, classes = _kinds_of_hint(annotation)
            none_ok |= hint_none
        elif declared and isinstance(declared.get(name), Mapping):
            kinds, decl_none = _kinds_of_declared(declared[name])
            none_ok |= decl_none or declared[name].get("default", default) is None
        else:
            kinds = _kinds_of_value(default) if default is not inspect.Parameter.empty else {"any"}
        strings = (default,) if "str" in kinds and kinds - {"str"} and isinstance(default, str) else None
        out[name] = ArgSpec(name, frozenset(kinds), none_ok, strings, classes)
    return out


def accepts_any_keyword(cls: type) -> bool:
    """Whether ``cls`` keeps keywords it does not name itself (then no name is unknown)."""
    return _signature(cls).open


# ---------------------------------------------------------------- checking values
def _is_bool(value: Any) -> bool:
    return isinstance(value, (bool, np.bool_)) or (torch.is_tensor(value) and value.dtype == torch.bool)


def _real_scalar(value: Any) -> float | None:
    """``value`` as a float when it is one real number (Python or NumPy, or a 0-d array / tensor,
    as entries of a vector may be); None when it is not (a bool, a string, None, a container)."""
    if _is_bool(value):
        return None
    if isinstance(value, numbers.Real):
        try:
            return float(value)
        except OverflowError:
            return math.inf
    if torch.is_tensor(value) and value.ndim == 0 and not value.dtype.is_complex:
        return float(value)
    if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "iuf":
        return float(value)
    return None


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _describe(value: Any) -> str:
    return f"{_shown(value)} (a {type(value).__name__})"


def _vector_problem(value: Any, n_tasks: int) -> str | None:
    """Why ``value`` is not ``n_tasks`` finite real numbers; None when it is."""
    if torch.is_tensor(value) or isinstance(value, np.ndarray):
        if value.ndim != 1:
            return f"a {value.ndim}-D array"
        if torch.is_tensor(value):
            if value.dtype == torch.bool or value.dtype.is_complex:
                return f"a tensor of dtype {value.dtype}"
            entries = value.detach().cpu().double().tolist()
        else:
            if value.dtype.kind not in "iuf":
                return f"an array of dtype {value.dtype}"
            entries = value.astype(float).tolist()
    elif isinstance(value, (str, bytes, Mapping, set, frozenset)) or not isinstance(value, collections.abc.Sequence):
        return f"a {type(value).__name__}, not a list of numbers"
    else:
        entries = []
        for i, entry in enumerate(value):
            number = _real_scalar(entry)
            if number is None:
                return f"entry {i} is {_describe(entry)}, not a real number"
            entries.append(number)
    if len(entries) != n_tasks:
        return f"{len(entries)} entries for {n_tasks} tasks"
    for i, number in enumerate(entries):
        if not math.isfinite(number):
            return f"entry {i} is {number}"
    return None


def _check_one(spec: ArgSpec, value: Any, n_tasks: int) -> tuple[bool, Any, str]:
    """(accepted, the value to pass on, why not)."""
    if value is None:
        return spec.none_ok, value, "None is not allowed"
    if "any" in spec.kinds:
        return True, value, ""
    why = ""
    if "bool" in spec.kinds and isinstance(value, (bool, np.bool_)):
        return True, bool(value), ""
    if "int" in spec.kinds and not _is_bool(value) and not isinstance(value, float):
        try:
            return True, operator.index(value), ""
        except TypeError:
            pass
    if "float" in spec.kinds:
        number = _real_scalar(value) if not isinstance(value, (np.ndarray, torch.Tensor)) else None
        if number is not None:
            if math.isfinite(number):
                return True, value if type(value) in (int, float) else number, ""
            why = "not finite"
    if "str" in spec.kinds and isinstance(value, str) and (spec.strings is None or value in spec.strings):
        return True, value, ""
    if "vector" in spec.kinds:
        problem = _vector_problem(value, n_tasks)
        if problem is None:
            return True, value, ""
        if not why and not isinstance(value, (str, numbers.Number)):
            why = problem
    if "matrix" in spec.kinds and isinstance(value, collections.abc.Sequence) and not isinstance(value, (str, bytes)):
        problems = [(i, _vector_problem(row, n_tasks)) for i, row in enumerate(value)]
        bad = [(i, p) for i, p in problems if p is not None]
        if not bad:
            return True, value, ""
        if not why:
            why = f"row {bad[0][0]}: {bad[0][1]}"
    if "instance" in spec.kinds and isinstance(value, spec.classes):
        return True, value, ""
    if not why:
        why = f"a {type(value).__name__}"
    return False, value, why


def check_n_tasks(method: str, n_tasks: Any) -> int:
    """``n_tasks`` as a Python int (NumPy and torch integers accepted); a bool or a non-integer is
    refused. Its positivity is the constructor's check."""
    if _is_bool(n_tasks) or isinstance(n_tasks, float):
        raise HyperparameterError(f"{method}: n_tasks must be a positive integer, got {_describe(n_tasks)}")
    try:
        return operator.index(n_tasks)
    except TypeError:
        raise HyperparameterError(f"{method}: n_tasks must be a positive integer, got {_describe(n_tasks)}") from None


def check_hparams(cls: type, n_tasks: Any, hparams: Mapping[str, Any],
                  declared: Mapping[str, Mapping[str, Any]] | None = None) -> tuple[int, dict[str, Any]]:
    """Check ``n_tasks`` and every hyperparameter of the method ``cls`` (see the module docstring);
    return them as the constructor should get them (NumPy integers as ints, NumPy floats as floats,
    NumPy bools as bools; everything else unchanged). :class:`HyperparameterError` on the first
    invalid one."""
    method = getattr(cls, "name", "") or cls.__name__
    k = check_n_tasks(method, n_tasks)
    specs = arg_specs(cls, declared)
    out: dict[str, Any] = {}
    for name, value in hparams.items():
        spec = specs.get(name)
        if spec is None:
            if accepts_any_keyword(cls):
                out[name] = value
                continue
            raise HyperparameterError(_unknown(method, name, list(specs)))
        ok, value, why = _check_one(spec, value, k)
        if not ok:
            raise HyperparameterError(f"{method}: {name} must be {spec.allowed(k)}, got {_shown(value)} ({why})")
        out[name] = value
    return k, out


def _unknown(method: str, name: str, valid: list[str]) -> str:
    match = [v for v in valid if v.lower() == str(name).lower()] or \
        difflib.get_close_matches(str(name), valid, n=1, cutoff=0.6)
    hint = f"; did you mean {match[0]!r}?" if match else ""
    return f"{method}: unknown hyperparameter {name!r}{hint} (valid: {', '.join(valid) or 'none'})"
