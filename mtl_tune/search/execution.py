"""Execute a validated :class:`~mtl_tune.search.runner.Plan` on Ray Tune.

The one module that builds and starts Tune runs: the Optuna search of each method
(:func:`run_method`), the seed re-runs and the preference sweep (:func:`run_grid`), then the
tidy table (:mod:`mtl_tune.analysis.trial_table`) and the comparison tables
(:mod:`mtl_tune.search.compare`) after each of them.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from mtl_tune.analysis.trial_files import experiment_rows
from mtl_tune.analysis.trial_table import trial_rows, write_sweep_json, write_table
from mtl_tune.analysis.trial_table import build_table as tidy_table
from mtl_tune.search import compare
from mtl_tune.search.concurrency import fitting_trials
from mtl_tune.search.lock import SweepLock
from mtl_tune.search.resume_state import (check_saved_states, check_studies, set_aside_unsaved_start,
                                            tune_state_saved)
from mtl_tune.search.runner import Plan, SearchError, sweep_info, trial_constants
from mtl_tune.search.searcher import MTLOptunaSearch, make_sampler, make_storage, own_storage_at
from mtl_tune.spaces import SpaceSampler
from mtl_tune.search.validate import check_cluster_resources

logger = logging.getLogger(__name__)


@dataclass
class Outcome:
    sweep_dir: Path
    table: pd.DataFrame
    table_path: Path
    plot_path: Path | None
    comparison: pd.DataFrame | None = None
    preferences: pd.DataFrame | None = None
    #: stopped by Ctrl+C (SIGINT) or SIGTERM: the table holds what exists, no comparison was made
    interrupted: bool = False
    #: the signal that stopped it (``signal.SIGINT`` or ``signal.SIGTERM``), when ``interrupted``
    stop_signal: int | None = None


class Interrupted(Exception):
    """Ctrl+C (SIGINT) or SIGTERM stopped a Tune run: the search stops instead of going on to the next method."""


class StopFlag(threading.Event):
    """Set by the first SIGINT/SIGTERM; ``signum`` says which."""

    signum: int | None = None
    handler: Any = None

    def rearm(self) -> None:
        """Install the handler again where something replaced it (``ray.init`` sets its own SIGTERM
        handler, which aborts the driver); nothing after the first signal (the second stops at once)."""
        if self.handler is not None and not self.is_set():
            for signum in STOP_SIGNALS:
                signal.signal(signum, self.handler)


#: statuses of a trial that ran to its end; any other after ``fit()`` means Tune was interrupted
ENDED = ("TERMINATED", "ERROR")


def check_not_interrupted(results: Any, expected: int | None) -> None:
    """Raise :class:`Interrupted` when ``Tuner.fit()`` returned early. Tune catches the first
    SIGINT itself, saves its state and returns normally (no flag in its API): the sign is a trial
    that did not end, or fewer trials than the budget (interrupted before they were sampled)."""
    total = len(results)
    if results.num_terminated + results.num_errors < total or (expected is not None and total < expected):
        raise Interrupted


#: the signals that stop a search gracefully: Ctrl+C, and what ``kill``, ``timeout``, Slurm and
#: ``docker stop`` send (Ray's own SIGTERM handler aborted the driver: no table, exit 134)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _tune_stop_handler() -> Any:
    """Tune's graceful-stop handler of the run in progress, or None. Tune registers it for SIGUSR1
    on every run (ray/tune/tune.py ``_setup_signal_catching``): it ends the run after saving the
    experiment state, with the unfinished trials resumable — what its own SIGINT handler does."""
    handler = signal.getsignal(signal.SIGUSR1) if hasattr(signal, "SIGUSR1") else None
    return handler if getattr(handler, "__name__", "") == "signal_interrupt_tune_run" else None


@contextmanager
def stop_signals() -> Iterator[StopFlag]:
    """The first Ctrl+C (SIGINT) or SIGTERM sets the returned flag, checked after each step, and asks
    the Tune run in progress to stop the way Tune's own Ctrl+C handler does (its final state saved,
    the trials resumable); a second one stops at once. Tune's own SIGINT handler is switched off
    (``TUNE_DISABLE_SIGINT_HANDLER``, a documented setting) because it swallowed the signal: the run
    returned as if complete — its stopped trials count as TERMINATED — and the next method started.
    Only in the main thread (signal handlers cannot be set elsewhere)."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    previous_env = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"

    def handler(signum: int, frame: Any) -> None:
        if flag.signum is None:
            flag.signum = signum
        flag.set()
        tune_stop = _tune_stop_handler()
        if tune_stop is not None:  # (between two runs: the last run's handler; its run has ended, harmless)
            tune_stop(signal.SIGUSR1, frame)
        else:  # no Tune run to ask (Ray still starting, or a Ray release without that handler): say so
            print(f"{signal.Signals(signum).name}: the search stops after the step in progress", file=sys.stderr)
        # after Tune's handler, which re-installs the SIGINT handler it found (this one)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    for signum in STOP_SIGNALS:
        signal.signal(signum, handler)
    flag.handler = handler
    try:
        yield flag
    finally:
        for signum, old in previous.items():
            if old is not None:  # None: a handler not set from Python (nothing Python can put back)
                signal.signal(signum, old)
        if previous_env is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = previous_env


def init_ray(plan: Plan) -> None:
    """Start a local Ray cluster, or join ``--address``, with Ray's token authentication as Ray
    sets it: a new local cluster requires the token (``ray.init`` creates ``~/.ray/auth_token``
    on first use) so no other process on the network can run code in it; never switched off here."""
    import ray

    # Tune writes one checkpoint per epoch; short toy epochs would otherwise flood the log
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if ray.is_initialized():
        return
    kwargs = {"include_dashboard": False, "log_to_driver": plan.options.verbose > 1, "configure_logging": False}
    if plan.options.address:
        try:
            ray.init(address=plan.options.address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError, ray.exceptions.AuthenticationError) as err:
            raise SearchError(
                f"--address {plan.options.address}: could not connect to a Ray cluster ({err}). Start one with "
                "`ray start --head` or pass host:port of a running head node. A cluster with token authentication "
                "(Ray's default) needs RAY_AUTH_MODE=token and its token in this environment: RAY_AUTH_TOKEN, "
                "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (docs/cluster.md of the mtl_tune source).") from None
    else:
        # address="local": always a cluster of our own. Without it Ray would join a cluster named
        # by RAY_ADDRESS or left running by `ray start` (refusing --num-cpus there): a search
        # runs code only on a cluster the user named with --address
        ray.init(address="local", num_cpus=plan.options.num_cpus, **kwargs)
        keep_token_private()


def keep_token_private(token_file: Path | None = None) -> None:
    """Ray writes ``~/.ray/auth_token`` with the process umask (world-readable with the usual
    022); whoever reads it can run code in our clusters, so make it readable by its owner only."""
    token_file = token_file or Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        if token_file.is_file() and token_file.stat().st_mode & 0o077:
            token_file.chmod(0o600)
    except OSError as err:  # not ours (a shared token file): say so, do not fail the search
        logger.warning("could not make the Ray token file %s private (%s)", token_file, err)


def _scheduler(plan: Plan, epochs: int):
    from ray.tune.schedulers import ASHAScheduler, AsyncHyperBandScheduler

    o = plan.options
    if o.scheduler == "asha":
        return ASHAScheduler(metric=plan.metrics[0], mode=plan.modes[0], max_t=epochs, grace_period=o.grace_period)
    if o.scheduler == "hyperband":
        # the asynchronous form (several ASHA brackets): Tune's synchronous HyperBandScheduler
        # pauses trials at each rung, and after --resume its lost bracket state left them PAUSED
        return AsyncHyperBandScheduler(metric=plan.metrics[0], mode=plan.modes[0], max_t=epochs,
                                       grace_period=o.grace_period, brackets=3)
    return None


def trial_dirname(trial) -> str:
    """Short, stable trial folder names (Tune's default embeds every config value)."""
    return f"{trial.config.get('method', 'trial')}_{trial.trial_id}"


#: what the driver of a multi-worker trial reserves: no CPU or GPU (its Ray Train workers
#: reserve those), only a nominal 1 MiB of Ray's memory resource, as Tune refuses an empty request
DRIVER_MEMORY = float(2**20)


def trial_resources(options) -> dict[str, float]:
    """What Tune reserves for a trial: its resources with one worker; with
    ``--workers-per-trial N > 1`` only :data:`DRIVER_MEMORY`: the trial just drives a Ray Train
    run whose N workers reserve ``--cpus/--gpus-per-trial`` each in their own placement group
    (search/data_parallel.py), so a trial reserving CPUs too would hold them twice."""
    if options.workers_per_trial > 1:
        return {"cpu": 0, "gpu": 0, "memory": DRIVER_MEMORY}
    return {"cpu": options.cpus_per_trial, "gpu": options.gpus_per_trial}


def reuse_actors(options) -> bool:
    """Run a method's trials one after another in the same Ray actor (Tune's ``reuse_actors``)
    instead of a fresh worker process each: that start (re-importing torch, Ray and every
    balancer and benchmark) was most of the ≈ 3–5 s per trial outside the trainable
    (docs/performance.md §4). Safe because :func:`~mtl_tune.search.trainable.train_trial`
    sets all the process state it depends on at each start (seeds, torch threads, cuDNN flags)
    and the data caches are keyed by everything that shapes the data. Not with
    ``--workers-per-trial N > 1``: that trial's clean-up (aborting its Ray Train run) runs when
    its actor stops."""
    return options.workers_per_trial <= 1


def run_method(plan: Plan, method: str) -> None:
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    from mtl_tune.search.trainable import trainable_for

    o = plan.options
    space = plan.spaces[method]
    exp_dir = plan.sweep_dir / method
    trainable = tune.with_resources(trainable_for(o.workers_per_trial), trial_resources(o))
    searchable = space.searchable()
    # a method without hyperparameters has nothing to search: one trial (per seed) is the fair budget
    budget = o.num_samples if searchable else 1
    saved = o.resume and tune_state_saved(exp_dir)
    if o.resume and not saved:
        set_aside_unsaved_start(plan, method, study=plan.study_name(method))
    if saved:
        logger.info("resuming %s from %s", method, exp_dir)
        with own_storage_at(None if o.optuna_storage else plan.optuna_storage):  # the pickles name the first folder's
            results = tune.Tuner.restore(str(exp_dir), trainable, resume_unfinished=True, resume_errored=True).fit()
        check_not_interrupted(results, budget)
        return
    epochs = int(trial_constants(plan, method).get("epochs", plan.bench.defaults.get("epochs", 1)))
    sampler = make_sampler(o.sampler or "tpe", o.seed, len(plan.metrics), budget)
    searcher = MTLOptunaSearch(
        space=SpaceSampler(space, plan.bench.n_tasks, trial_constants(plan, method)),
        metric=plan.metrics if plan.multi_objective else plan.metrics[0],
        mode=plan.modes if plan.multi_objective else plan.modes[0],
        sampler=sampler,
        study_name=plan.study_name(method), storage=make_storage(plan.optuna_storage),
        points_to_evaluate=[space.default_point(plan.bench.n_tasks)] if searchable else None,
    )
    limit = o.max_concurrent or fitting_trials(o)
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=ConcurrencyLimiter(searcher, max_concurrent=limit),
                                    scheduler=_scheduler(plan, epochs), num_samples=budget, reuse_actors=reuse_actors(o),
                                    trial_dirname_creator=trial_dirname),
        run_config=tune.RunConfig(
            name=method, storage_path=str(plan.sweep_dir), verbose=o.verbose,
            failure_config=tune.FailureConfig(max_failures=o.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2), callbacks=callbacks(plan)),
    )
    check_not_interrupted(tuner.fit(), budget)


def run_grid(plan: Plan, experiment: str, param_space: dict[str, Any]) -> None:
    from ray import tune

    from mtl_tune.search.trainable import trainable_for

    o = plan.options
    path = plan.sweep_dir / experiment
    trainable = tune.with_resources(trainable_for(o.workers_per_trial), trial_resources(o))
    # multi-worker trials reserve nothing in Tune: without a limit all would start and queue for workers;
    # single-process ones with fractional CPUs would start as many processes as fractions fit
    limit = o.max_concurrent or fitting_trials(o)
    saved = tune_state_saved(path)
    if not saved:
        set_aside_unsaved_start(plan, experiment, study=None)
    if saved:
        results = tune.Tuner.restore(str(path), trainable, resume_unfinished=True, resume_errored=True).fit()
        check_not_interrupted(results, None)
        return
    results = tune.Tuner(
        trainable, param_space=param_space,
        tune_config=tune.TuneConfig(num_samples=1, reuse_actors=reuse_actors(o), trial_dirname_creator=trial_dirname,
                                    max_concurrent_trials=limit),
        run_config=tune.RunConfig(name=experiment, storage_path=str(plan.sweep_dir), verbose=o.verbose,
                                  failure_config=tune.FailureConfig(max_failures=o.max_failures),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=2))).fit()
    check_not_interrupted(results, None)


def run_seeds(plan: Plan, table: pd.DataFrame, stop: threading.Event | None = None) -> None:
    from ray import tune

    metric, mode = compare.ranking_objective(plan)
    seeds = [plan.options.seed + i for i in range(1, plan.options.seeds + 1)]
    for method in plan.spaces:
        if stop is not None and stop.is_set():  # one Tune run per method: a signal ends the phase here
            raise Interrupted
        config = best_config(table, method, metric, mode)
        if config is None:
            print(f"--seeds: {method} has no finished trial with {metric}; no re-runs")
            continue
        run_grid(plan, f"{method}.seeds", {**config, "seed": tune.grid_search(seeds)})


def run_preferences(plan: Plan, stop: threading.Event | None = None) -> None:
    from ray import tune

    grid = compare.simplex_grid(plan.bench.n_tasks, plan.options.preferences)
    for method in plan.spaces:
        if stop is not None and stop.is_set():
            raise Interrupted
        arg = compare.preference_arg(method)
        if arg is None:
            continue
        const = trial_constants(plan, method)
        fixed = {k: v for k, v in plan.spaces[method].constants().items() if k != arg}
        const["hparams"] = {**fixed, arg: tune.grid_search(grid)}
        run_grid(plan, f"{method}.prefs", const)


def best_config(table: pd.DataFrame, method: str, metric: str, mode: str) -> dict[str, Any] | None:
    """The config of ``method``'s best finished search trial, read back from Tune's state of
    this search's own folder (``ExperimentAnalysis`` unpickles it: never on other people's folders)."""
    from ray.tune import ExperimentAnalysis

    done = table[(table["method"] == method) & (table["status"] == "TERMINATED")
                 & (table.get("phase", "search") == "search")]
    if done.empty or metric not in done:
        return None
    best = done.sort_values(metric, ascending=mode == "min").iloc[0]
    analysis = ExperimentAnalysis(str(best["logdir"]).rsplit("/", 1)[0])
    for trial in analysis.trials:
        if trial.trial_id == best["trial_id"]:
            return dict(trial.config)
    return None


def callbacks(plan: Plan) -> list:
    """Opt-in Weights & Biases logging (the seed repos log there); TensorBoard event
    files are written by Tune for every trial anyway."""
    if not plan.options.wandb_project:
        return []
    from ray.air.integrations.wandb import WandbLoggerCallback

    return [WandbLoggerCallback(project=plan.options.wandb_project, group=plan.name)]


def experiment_table_rows(exp: Path, plan: Plan) -> list[dict[str, Any]]:
    """One experiment's rows from Tune's state, or, when that state cannot be read (a corrupt
    ``experiment_state-*.json``, a truncated pickle), from the per-trial JSON files as
    ``analyze`` reads them, with a warning naming the folder: a finished result is never lost."""
    try:
        return trial_rows(exp, plan.name, plan.bench.n_tasks)
    except Exception as err:  # noqa: BLE001 - any unreadable state; the per-trial files remain
        print(f"warning: Tune's state in {exp} is unreadable ({type(err).__name__}: {err}); "
              "its trials were read from their own files")
        return experiment_rows(exp, plan.name, plan.bench.n_tasks)


def build_table(plan: Plan) -> pd.DataFrame:
    """The tidy table of every experiment of the search (methods × phases), sorted by method and phase."""
    return tidy_table(plan.sweep_dir, plan.spaces, plan.name, plan.bench.n_tasks,
                      rows_of=lambda exp: experiment_table_rows(exp, plan))


def finish(plan: Plan) -> Outcome:
    """Rebuild the tidy table from Tune's state and write it (atomically)."""
    table = build_table(plan)
    return Outcome(plan.sweep_dir, table, write_table(table, plan.sweep_dir), None)


def plot_front(plan: Plan, table: pd.DataFrame) -> Path | None:
    """``pareto.png``: the trials over the benchmark's primary metrics, with the benchmark's
    true front when it knows one; None when there are fewer than two primary metrics or no
    trial reported them."""
    pareto_metrics = [f"val/{m.name}" for m in plan.bench.primary_metrics()]
    if len(pareto_metrics) < 2 or table.empty or not all(m in table for m in pareto_metrics):
        return None
    from mtl_tune.analysis import known_front_points, plot_pareto_front

    reference = known_front_points(plan.bench.name, pareto_metrics, {**plan.bench.defaults, **plan.options.config})
    return plot_pareto_front(table, pareto_metrics, [m.mode for m in plan.bench.primary_metrics()],
                             plan.sweep_dir / "pareto.png", title=f"{plan.bench.name}: trials and their Pareto front",
                             reference_front=reference)


def check_storage_reachable(plan: Plan) -> None:
    """An explicit --optuna-storage opens before anything is written (a database server that is
    down, a wrong password): otherwise the first trial fails after sweep.json exists, and the
    same --name then needs --resume. The default storage is created with the sweep folder."""
    if not plan.options.optuna_storage:
        return
    from mtl_tune.search.searcher import public_storage_url

    try:
        make_storage(plan.optuna_storage)
    except Exception as err:  # noqa: BLE001 - SQLAlchemy, driver and OS errors alike mean "unusable"
        first = " ".join(str(err).split())[:300]
        raise SearchError(f"--optuna-storage {public_storage_url(plan.optuna_storage)}: cannot be opened "
                          f"({type(err).__name__}: {first})") from None


def execute(plan: Plan) -> Outcome:
    """Run the plan while holding the sweep folder's lock (one driver per sweep)."""
    if plan.options.resume:  # what Tune and Optuna restore from is there and whole: checked before Ray starts
        check_saved_states(plan)
        check_studies(plan)
    with stop_signals() as stop:  # from ray.init on: a Ctrl+C while Ray starts was a traceback
        init_ray(plan)
        stop.rearm()  # ray.init replaced the SIGTERM handler with its own
        if plan.options.address:  # only the running cluster knows its nodes; checked before anything is written
            check_cluster_resources(plan.options)
        check_storage_reachable(plan)
        with SweepLock(plan.sweep_dir):
            return run_all(plan, stop)


def run_all(plan: Plan, stop: threading.Event) -> Outcome:
    """Every phase of the search; a Ctrl+C ends it after writing the table of what exists
    (``Outcome.interrupted``): no later method runs and nothing is compared or ranked."""
    write_sweep_json(plan.sweep_dir, sweep_info(plan))
    outcome = None
    try:
        for method in plan.spaces:
            run_phase(stop, run_method, plan, method)
            outcome = finish(plan)  # keep the table current after every method: nothing finished is lost
        if plan.options.seeds:
            run_phase(stop, run_seeds, plan, outcome.table, stop)
            outcome = finish(plan)
        if plan.options.preferences:
            run_phase(stop, run_preferences, plan, stop)
            outcome = finish(plan)
        if stop.is_set():
            raise Interrupted
    except Interrupted:
        outcome = finish(plan)
        outcome.interrupted = True
        outcome.stop_signal = getattr(stop, "signum", None) or signal.SIGINT
        return outcome
    outcome.plot_path = plot_front(plan, outcome.table)  # once, on the final table (≈ 0.35 s a plot)
    if plan.options.seeds or len(plan.spaces) > 1:
        outcome.comparison = compare.comparison_table(plan, outcome.table)
        write_table(outcome.comparison, plan.sweep_dir, "comparison.csv")
    if plan.options.preferences:
        outcome.preferences = compare.preference_hypervolumes(plan, outcome.table)
        write_table(outcome.preferences, plan.sweep_dir, "preferences.csv")
    return outcome


def run_phase(stop: threading.Event, step: Any, *args: Any) -> None:
    """``step(*args)``, unless a Ctrl+C came before it; a KeyboardInterrupt (second Ctrl+C, or
    Tune's handler not installed) counts as an interruption too."""
    if stop.is_set():
        raise Interrupted
    try:
        step(*args)
    except KeyboardInterrupt:
        raise Interrupted from None
