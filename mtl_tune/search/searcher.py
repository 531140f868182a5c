"""OptunaSearch with the fixes a multi-objective MTL search needs (docs/references.md#ray-tune-and-optuna).

* P2: a trial that ends before its epoch budget (stopped by ASHA/HyperBand) is told to
  Optuna as PRUNED, not COMPLETE with its truncated values, so it never lands on a front.
* The study lives in a real Optuna storage (:func:`make_storage`: SQLite in the sweep
  folder by default, any RDB URL or a journal file), so optuna-dashboard and Optuna's
  plots read it while the search runs and after. Optuna's RDB and journal storages
  pickle as their URL / file path and reconnect on unpickling, which is what Tune's
  searcher checkpoint needs for ``--resume``.
* P1: a non-finite objective never reaches ``study.tell`` (which would raise, be swallowed
  and leave a zombie RUNNING trial); the trainer already reports finite penalties, and a
  value that is still not finite is told as FAIL with a warning.
* A trial that reported ``failed = 1`` (bad data or configuration met at run time, failure
  class 2 of docs/reliability.md) is told FAIL, like one that crashed for good.
* NSGA-II is :class:`PicklableNSGAIISampler`, so the searcher can be checkpointed and resumed.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

logger = logging.getLogger(__name__)

SAMPLERS = ("tpe", "nsga2", "random")


class PicklableNSGAIISampler(optuna.samplers.NSGAIISampler):
    """NSGA-II whose state can be pickled into Tune's searcher checkpoint.

    Optuna's genetic samplers guard their generation cache with a ``threading.Lock``,
    which cannot be pickled; Tune pickles the searcher (with its study and sampler) after
    every trial and on ``--resume`` loads it back. The lock only serialises threads of one
    process, so it is dropped from the state and a fresh one made on load; the cache itself
    is kept (it is rebuilt from the study anyway when the study id changes)."""

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_thread_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._thread_lock = threading.Lock()


def make_sampler(kind: str, seed: int, n_objectives: int, budget: int) -> optuna.samplers.BaseSampler:
    """A seeded Optuna sampler. NSGA-II's population is kept well below the budget,
    otherwise it never leaves its random first generation
    (docs/references.md#nsga-ii-population-and-small-budgets)."""
    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(2, budget // 3)))
    if kind == "nsga2":
        return PicklableNSGAIISampler(seed=seed, population_size=max(4, min(50, budget // 4)))
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"unknown sampler {kind!r}; valid: {', '.join(SAMPLERS)}")


STORAGE_FILE = "optuna.db"


def default_storage_url(sweep_dir: Path) -> str:
    """``sqlite:////abs/path/<sweep>/optuna.db`` (percent-encoded): the studies next to the trial table."""
    from mtl_tune.search.validate import sqlite_url

    return sqlite_url(Path(sweep_dir).resolve() / STORAGE_FILE)


def make_storage(spec: str) -> optuna.storages.BaseStorage:
    """An Optuna storage from an RDB URL (``sqlite:///…``, ``postgresql://…``) or a journal
    file path (the journal suits shared file systems, where SQLite's locking is unreliable)."""
    if "://" in spec:
        # a generous lock timeout: optuna-dashboard may read the SQLite file while trials finish
        kwargs = {"connect_args": {"timeout": 30}} if spec.startswith("sqlite") else {}
        return optuna.storages.RDBStorage(spec, engine_kwargs=kwargs)
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(spec))


@contextlib.contextmanager
def own_storage_at(url: str | None) -> Iterator[None]:
    """While a search is restored, point every unpickled SQLite storage that is the sweep's own
    ``optuna.db`` at ``url``, the file in the sweep folder as it is now.

    Tune's pickles (``tuner.pkl``, the searcher checkpoint) keep the storage of the first run as
    an absolute URL and reconnect to it on load: after a move that file is gone ("unable to open
    database file"), after a copy it is the original sweep's database, silently shared. Optuna's
    RDBStorage has no hook for this, so its ``__setstate__`` is wrapped for the restore only
    (the driver restores one experiment at a time, in its main thread). ``url`` None (an explicit
    --optuna-storage) changes nothing; with the default storage the search has no other SQLite
    file named optuna.db, whatever the sweep folder was called when it was pickled."""
    from mtl_tune.search.validate import is_own_storage

    if url is None:
        yield
        return
    original = optuna.storages.RDBStorage.__setstate__

    def setstate(storage: optuna.storages.RDBStorage, state: dict[str, Any]) -> None:
        if is_own_storage(state.get("url")) and state.get("url") != url:
            state = {**state, "url": url}
        original(storage, state)

    optuna.storages.RDBStorage.__setstate__ = setstate
    try:
        yield
    finally:
        optuna.storages.RDBStorage.__setstate__ = original


def public_storage_url(spec: str) -> str:
    """``spec`` with any password masked, for files and logs."""
    if "://" not in spec:
        return spec
    from sqlalchemy.engine import make_url

    try:
        return make_url(spec).render_as_string(hide_password=True)
    except Exception:  # not an SQLAlchemy URL: show the scheme only
        return spec.split("://", 1)[0] + "://***"


class MTLOptunaSearch(OptunaSearch):
    """OptunaSearch that tells truncated trials PRUNED and never tells non-finite values."""

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        self._sync_with_storage()

    def _sync_with_storage(self) -> None:
        """A persistent study may be ahead of the searcher checkpoint: a trial told after it is
        finished in storage, so it is marked completed here (a second tell would raise)."""
        study = getattr(self, "_ot_study", None)
        if study is None:
            return
        finished = {t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished()}
        self._completed_trials.update(tid for tid, t in self._ot_trials.items() if t.number in finished)
        self._fail_orphans()

    def _fail_orphans(self) -> None:
        """After a kill, the stored study may hold RUNNING trials asked after the searcher's last
        checkpoint; Tune re-suggests their slots, so they would never finish. Tell them FAIL."""
        study = getattr(self, "_ot_study", None)
        if study is None:
            return
        mine = {t.number for t in self._ot_trials.values()}
        for frozen in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if frozen.number not in mine:
                logger.warning("Optuna trial %d of study %s was asked after the last searcher checkpoint of a "
                               "killed search; told as FAIL", frozen.number, study.study_name)
                study.tell(frozen.number, state=TrialState.FAIL)

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        config = super().suggest(trial_id)
        if trial_id in self._ot_trials:  # lets a stored study be joined to trials.csv (and read in the dashboard)
            self._ot_trials[trial_id].set_user_attr("tune_trial_id", trial_id)
        return config

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return super().on_trial_complete(trial_id, result, error)
        ot_trial = self._ot_trials[trial_id]
        metrics = self.metric if isinstance(self.metric, list) else [self.metric]
        values = [None if not result else result.get(m) for m in metrics]
        truncated = bool(result) and float(result.get("epoch", 0)) < float(result.get("epochs", 0)) \
            and not result.get("diverged")
        if error or (result and result.get("failed")):  # crashed for good, or bad data/configuration
            state, told = TrialState.FAIL, None
        elif not result or truncated or any(v is None for v in values):
            state, told = TrialState.PRUNED, None
        elif not all(math.isfinite(float(v)) for v in values):
            logger.warning("trial %s reported a non-finite objective %s; told as FAIL", trial_id, values)
            state, told = TrialState.FAIL, None
        else:
            state, told = TrialState.COMPLETE, values if len(values) > 1 else values[0]
        self._ot_study.tell(ot_trial, told, state=state)
        self._completed_trials.add(trial_id)
