"""What ``--resume`` finds of an experiment, checked before Tune is asked to restore it.

A driver killed with SIGKILL can stop between any two of a method's first steps: its Optuna study
created in the storage, Tune's folder and ``tuner.pkl`` written, Tune's first
``experiment_state-*.json`` written. Only after the last one can Tune restore the run; before it,
the resumed search starts the experiment again, with the earlier start's leftovers set aside
(:func:`set_aside_unsaved_start`). A kill can also cut short a state file Tune was rewriting, and
a user can lose the sweep's ``optuna.db``: Tune's restore would then fail and silently start the
experiment over in the same folder, or crash inside Optuna, so both are refused up front with the
way out (:func:`check_saved_states`, :func:`check_studies`).
"""

from __future__ import annotations

import json
import pickletools
from pathlib import Path
from typing import TYPE_CHECKING

from mtl_tune.analysis.trial_table import PHASES
from mtl_tune.search.searcher import make_storage
from mtl_tune.search.validate import SearchError

if TYPE_CHECKING:
    from mtl_tune.search.runner import Plan


def tune_state_saved(exp_dir: Path) -> bool:
    """Tune saved the experiment's state, so ``Tuner.restore`` can continue it. A driver killed
    after Tune created the folder (``tuner.pkl``) but before its first ``experiment_state-*.json``
    leaves a folder that ``Tuner.can_restore`` accepts and ``Tuner.restore`` rejects."""
    from ray import tune

    return exp_dir.is_dir() and any(exp_dir.glob("experiment_state-*.json")) and tune.Tuner.can_restore(str(exp_dir))


#: the files Tune restores an experiment from, each the newest by name, and how each is written
#: (Tune's searcher files are pickles whatever their suffix)
RESTORED_FILES = (("experiment_state-*.json", "json"), ("search_gen_state-*.json", "pickle"),
                  ("searcher-state-*.pkl", "pickle"), ("basic-variant-state-*.json", "pickle"))


def _whole_file(path: Path, kind: str) -> bool:
    """``path`` is whole: JSON with the two parts Tune restores from, or a pickle whose opcodes run
    to its STOP — walked by :func:`pickletools.genops`, which builds no object (nothing is unpickled)."""
    try:
        if kind == "json":
            data = json.loads(path.read_text(encoding="utf-8"))
            return isinstance(data, dict) and isinstance(data.get("trial_data"), list) and "runner_data" in data
        with path.open("rb") as f:
            return any(op.name == "STOP" for op, _, _ in pickletools.genops(f))
    except (OSError, UnicodeDecodeError, ValueError):  # truncated JSON or pickle: ValueError
        return False


def check_saved_states(plan: Plan) -> None:
    """Before ``--resume`` runs anything: an experiment of the sweep whose newest experiment state,
    search-generator state or searcher state (the files Tune restores from) is not whole stops the
    resume with a SearchError naming it. Tune writes these in place or copies them to the sweep
    folder, so a kill during the write truncates one; Tune's restore then fails, logs "Restarting
    experiment" and starts the experiment over in the same folder — the table was rebuilt from that
    new run (earlier trials gone from it) and the search reported itself interrupted at every resume."""
    for method in plan.spaces:
        for suffix in PHASES:
            exp_dir = plan.sweep_dir / f"{method}{suffix}"
            if not exp_dir.is_dir():
                continue
            for pattern, kind in RESTORED_FILES:
                files = sorted(exp_dir.glob(pattern))
                if not files or _whole_file(files[-1], kind):
                    continue
                raise SearchError(
                    f"--resume: {files[-1]} is unreadable (cut short by a kill or a full disk while Ray Tune "
                    f"wrote it?), so Tune cannot restore {exp_dir.name}; nothing was changed. Its trials' own files are intact "
                    f"(`python -m mtl_tune.analyze {plan.sweep_dir}` reads them). To go on, move {exp_dir} "
                    f"aside (or put back a good copy of the file) and --resume again: {exp_dir.name} then starts afresh")


def check_studies(plan: Plan) -> None:
    """Before ``--resume`` runs anything: every method whose Tune state will be restored finds its
    Optuna study in the storage. The restored searcher is bound to that study; without it (the
    sweep's optuna.db deleted or not copied along, another --optuna-storage) the resume crashed
    inside Optuna with "Record does not exist". The sweep's own optuna.db is looked at without
    opening it when it is missing (opening would create an empty one)."""
    restored = [m for m in plan.spaces if tune_state_saved(plan.sweep_dir / m)]
    if not restored:
        return
    own_file = plan.sweep_dir / "optuna.db"
    if not plan.options.optuna_storage and not own_file.is_file():
        names: set[str] = set()
    else:
        import optuna

        from mtl_tune.search.searcher import public_storage_url

        try:
            names = set(optuna.get_all_study_names(make_storage(plan.optuna_storage)))
        except Exception as err:  # noqa: BLE001 - SQLAlchemy, driver and OS errors alike: unusable
            first = " ".join(str(err).split())[:300]
            raise SearchError(f"--resume: the Optuna storage {public_storage_url(plan.optuna_storage)} cannot be "
                              f"opened ({type(err).__name__}: {first})") from None
    missing = [m for m in restored if plan.study_name(m) not in names]
    if missing:
        where = own_file if not plan.options.optuna_storage else "the --optuna-storage of this search"
        raise SearchError(
            f"--resume: the Optuna {'study' if len(missing) == 1 else 'studies'} "
            f"{', '.join(repr(plan.study_name(m)) for m in missing)} of this search "
            f"{'is' if len(missing) == 1 else 'are'} not in {where}, and the saved searchers continue "
            f"{'it' if len(missing) == 1 else 'them'}; nothing was changed. Put the sweep's optuna.db back, "
            f"or move {', '.join(str(plan.sweep_dir / m) for m in missing)} aside and --resume again to "
            "search those methods afresh")


def set_aside_unsaved_start(plan: Plan, experiment: str, study: str | None) -> None:
    """Before an experiment starts afresh on ``--resume``: what an earlier start left without any
    state Tune saved is moved aside, not mixed into the new run or deleted. Its folder becomes
    ``<experiment>.unsaved-<time>`` (trial files, if any, kept for reading); the method's Optuna
    study, created before Tune's folder, is copied to ``<study>.unsaved-<time>`` and removed, so the
    new start samples exactly what an uninterrupted run would (the earlier start's asked but never
    told trials, and its enqueued default point, would otherwise linger in it)."""
    import time

    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    exp_dir = plan.sweep_dir / experiment
    if exp_dir.exists():
        aside = plan.sweep_dir / f"{experiment}.unsaved-{stamp}"
        exp_dir.rename(aside)
        print(f"--resume: {experiment} was interrupted before Ray Tune saved any state; it starts again "
              f"(what the first start left is in {aside})")
    if study is None:
        return
    import optuna

    storage = make_storage(plan.optuna_storage)
    if study not in optuna.get_all_study_names(storage):
        return
    kept = f"{study}.unsaved-{stamp}"
    optuna.copy_study(from_study_name=study, from_storage=storage, to_storage=storage, to_study_name=kept)
    optuna.delete_study(study_name=study, storage=storage)
    print(f"--resume: {experiment}'s Optuna study has no Tune run in the sweep to continue; it starts afresh "
          f"(the earlier start's trials are kept as study {kept!r})")
