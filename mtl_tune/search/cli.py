"""``python -m mtl_tune.search`` — tune balancer hyperparameters with Ray Tune + Optuna."""

from __future__ import annotations

import argparse
import errno
import json
import sys
from typing import Any, NoReturn

EXAMPLES = """\
examples:
  # the offline default: toy benchmark, five methods, Pareto search on 2 CPUs
  python -m mtl_tune.search

  # tune CAGrad's c on NYUv2 (Δm% on a validation split), 4 trials per GPU, ASHA
  python -m mtl_tune.search --benchmark nyuv2 --method cagrad --data-root /data/nyuv2 \\
      --objective delta_m --scheduler asha --gpus-per-trial 0.25 --num-samples 40

  # compare three methods with the same budget, multi-objective (per-task metrics)
  python -m mtl_tune.search --benchmark multi_mnist --method ls,famo,pivrg --objective pareto

  # fix a hyperparameter, run on an existing Ray cluster, resume after a crash
  python -m mtl_tune.search --method pivrg --set bound=2.0 --address auto --name run1 --resume
"""


def _value(text: str, where: str) -> Any:
    """``0.5`` → 0.5, ``1e-3`` → 0.001, ``[1, 2]`` → list, ``none`` stays a string."""
    import yaml

    from mtl_tune.spaces import load_yaml
    from mtl_tune.search.validate import SearchError

    try:
        return load_yaml(text)
    except yaml.YAMLError as err:
        raise SearchError(f"{where}: not a YAML value ({' '.join(str(err).split())})") from None


def _pairs(items: list[str], flag: str) -> dict[str, Any]:
    from mtl_tune.search.validate import SearchError

    out: dict[str, Any] = {}
    for item in items:
        key, eq, text = item.partition("=")
        if not eq or not key.strip():
            raise SearchError(f"{flag} {item!r}: expects KEY=VALUE, e.g. {flag} c=0.4")
        if key.strip() in out:  # the last would win silently: which one was meant?
            raise SearchError(f"{flag} {key.strip()} is given twice ({out[key.strip()]!r} and {text!r}); give it once")
        out[key.strip()] = _value(text, f"{flag} {item}")
    return out


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block) and exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


#: the built-in methods --preferences sweeps (a task_weights or preferences argument), for --help,
#: which must not load the balancers; tests/test_search_hostile.py checks it against the classes
PREFERENCE_AWARE = ("ls", "amtl", "amtlub", "stch", "pbi", "epo", "pmgda", "paretomtl", "upgrad", "dualproj", "config")

#: argparse destination → SearchOptions field where the names differ
FIELD_OF_DEST = {"method": "methods", "set": "fixed", "wandb": "wandb_project"}


def explicit_fields(argv: list[str] | None) -> set[str]:
    """SearchOptions fields the user gave on the command line (not argparse defaults)."""
    parser = build_parser()
    for action in parser._actions:  # argparse has no public switch for "only what was given"
        action.default = argparse.SUPPRESS
    given = vars(parser.parse_args(argv))
    return {FIELD_OF_DEST.get(dest, dest) for dest in given}


def build_parser() -> argparse.ArgumentParser:
    from mtl_tune.registry import balancer_names, benchmark_names

    p = OneLineParser(prog="python -m mtl_tune.search", description=__doc__,
                      epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--benchmark", default="toy", help=f"one of: {', '.join(benchmark_names())} (default: toy)")
    p.add_argument("--method", default="ls,mgda,pcgrad,cagrad,famo",
                   help=f"comma-separated method names or 'all'; valid: {', '.join(balancer_names())}")
    p.add_argument("--num-samples", type=int, default=4, help="trials per method (same budget for every method)")
    p.add_argument("--objective", default="pareto",
                   help="'pareto' (all per-task primary metrics, multi-objective), 'default' (Δm%% where baselines "
                        "exist), 'delta_m', or a metric name such as loss1 or val/seg/miou")
    p.add_argument("--sampler", choices=["tpe", "nsga2", "random"], default=None, help="Optuna sampler (default tpe)")
    p.add_argument("--scheduler", choices=["fifo", "asha", "hyperband"], default="fifo",
                   help="early stopping for scalar objectives (pareto searches run every trial to the end)")
    p.add_argument("--grace-period", type=int, default=1, help="epochs before ASHA may stop a trial")
    p.add_argument("--gpus-per-trial", type=float, default=0.0, help="GPUs per trial (per worker with --workers-per-trial); fractions pack trials on a GPU")
    p.add_argument("--cpus-per-trial", type=float, default=1.0,
                   help="CPUs per trial (per worker with --workers-per-trial)")
    p.add_argument("--workers-per-trial", type=int, default=1,
                   help="data-parallel workers per trial (a Ray Train run; --cpus/--gpus-per-trial are per worker, "
                        "--config batch_size stays the global batch; docs/cluster.md of the mtl_tune source)")
    p.add_argument("--max-concurrent", type=int, default=None, help="trials running at once (default: what fits)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray cluster (default: all)")
    p.add_argument("--storage-path", default="results", help="where sweeps are written (shared path on a cluster)")
    p.add_argument("--name", default=None,
                   help="sweep name, one folder name under --storage-path (default: <benchmark>-<timestamp>); "
                        "needed for --resume")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler and of every trial")
    p.add_argument("--epochs", type=int, default=None, help="epochs per trial (default: the benchmark's protocol)")
    p.add_argument("--data-root", default=None, help="data set location (or the benchmark's environment variable)")
    p.add_argument("--synthetic", action="store_true", help="random tensors of the real shapes (throughput only)")
    p.add_argument("--address", default=None, help="join an existing Ray cluster: 'auto' or host:port (without it the search starts a "
                        "local cluster of its own; RAY_ADDRESS and a `ray start` cluster are not joined)")
    p.add_argument("--resume", action="store_true",
                   help="continue the search --storage-path/--name with its stored arguments (given ones must match); "
                        "this loads Ray's pickled state of that folder, which can run code: resume only sweeps you wrote")
    p.add_argument("--search-space", default=None, help="YAML file replacing the method's built-in search space (search_spaces/<method>.yaml "
                        "of the package; mtl_tune.registry.search_space_file)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="fix a hyperparameter of the method (repeatable)")
    p.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                   help="override a benchmark/training setting, e.g. lr=1e-3 (repeatable)")
    p.add_argument("--max-failures", type=int, default=2,
                   help="restarts (>= 0) of a trial whose worker or node died, from its last checkpoint")
    p.add_argument("--seeds", type=int, default=0,
                   help="re-run each method's best configuration with N fresh seeds; rank methods by mean±std")
    p.add_argument("--preferences", type=int, default=0,
                   help="also sweep N task-preference weight vectors for preference-aware methods (those with "
                        f"a task_weights or preferences argument: {', '.join(PREFERENCE_AWARE)}) and compare "
                        "their fronts by hypervolume")
    p.add_argument("--optuna-storage", default=None, metavar="URL_OR_FILE",
                   help="where the Optuna studies live (one per method, named <name>/<method>): an RDB URL "
                        "(sqlite:///f.db, postgresql://...) or a journal file path; default: "
                        "sqlite:///<storage-path>/<name>/optuna.db. View with optuna-dashboard.")
    p.add_argument("--wandb", default=None, metavar="PROJECT", help="log every trial to Weights & Biases")
    p.add_argument("--verbose", type=int, default=1, choices=[0, 1, 2])
    return p


def options_from_args(args: argparse.Namespace):
    from mtl_tune.search.runner import SearchOptions

    return SearchOptions(
        benchmark=args.benchmark, methods=[m.strip() for m in args.method.split(",") if m.strip()],
        num_samples=args.num_samples, objective=args.objective, sampler=args.sampler, scheduler=args.scheduler,
        grace_period=args.grace_period, gpus_per_trial=args.gpus_per_trial, cpus_per_trial=args.cpus_per_trial,
        workers_per_trial=args.workers_per_trial,
        max_concurrent=args.max_concurrent, storage_path=args.storage_path, name=args.name, seed=args.seed,
        epochs=args.epochs, data_root=args.data_root, synthetic=args.synthetic, address=args.address,
        num_cpus=args.num_cpus, resume=args.resume, search_space=args.search_space,
        fixed=_pairs(args.set, "--set"), config=_pairs(args.config, "--config"), max_failures=args.max_failures,
        verbose=args.verbose, seeds=args.seeds, preferences=args.preferences, wandb_project=args.wandb,
        optuna_storage=args.optuna_storage)


def _config_text(row, hp_columns: list[str]) -> str:
    """``c=0.4 rescale=1`` from a trial's hp/ columns (its method's only), numbers rounded."""
    parts = []
    for col in hp_columns:
        value = row[col]
        if isinstance(value, float) and value != value:  # NaN: another method's hyperparameter
            continue
        if isinstance(value, str) and value.startswith("["):
            value = "[" + ", ".join(f"{float(v):.3g}" for v in json.loads(value)) + "]"
        elif isinstance(value, float):
            value = f"{value:.4g}"
        parts.append(f"{col[3:]}={value}")
    return " ".join(parts) or "(defaults)"


def _comparison_title(comparison, plan) -> str:
    """What the comparison ranks by: hypervolume on the declared objectives for a Pareto
    search, the scalar objective otherwise; and what the --seeds re-runs are."""
    parts = ["same budget per method"]
    scalar = comparison.attrs.get("scalar", plan.metrics[0])
    if comparison.attrs.get("ranking") == "hypervolume":
        ref = ", ".join(f"{r:g}" for r in comparison.attrs.get("reference") or [])
        parts.append(f"ranked by hypervolume of the search trials on {', '.join(plan.metrics)}, reference point ({ref})")
        if plan.options.seeds:
            parts.append(f"re-runs: each method's best configuration by {scalar} (the benchmark's scalar objective)")
    if plan.options.seeds:
        parts.append(f"mean±std of {scalar} over {plan.options.seeds} fresh seeds")
    return "; ".join(parts)


def print_failures(table) -> None:
    """Counts per status and the first line of each distinct error."""
    counts = table["status"].value_counts().to_dict() if "status" in table else {}
    print(f"trial status: {json.dumps(counts)}")
    errors = table["error"].fillna("").astype(str) if "error" in table else []
    seen: dict[str, int] = {}
    for error in errors:
        first = error.strip().splitlines()[0] if error.strip() else ""
        if first:
            seen[first] = seen.get(first, 0) + 1
    for first, n in seen.items():
        print(f"  {n} trial(s): {first}")


def finished(table, plan):
    """Search trials that ran to the end with every objective metric reported."""
    if table.empty or "status" not in table:
        return table.iloc[0:0]
    done = table[(table["status"] == "TERMINATED") & (table.get("phase", "search") == "search")]
    return done if all(m in done for m in plan.metrics) else done.iloc[0:0]


def print_summary(outcome, plan) -> bool:
    """Print the search's result; False when no search trial finished (the command fails)."""
    from mtl_tune.analysis import pareto_mask

    table = outcome.table
    print()
    if finished(table, plan).empty:
        print("no trial finished")
        if not table.empty:
            print_failures(table)
    else:
        table = table.assign(config=[_config_text(row, [c for c in table.columns if c.startswith("hp/")])
                                     for _, row in table.iterrows()])
        done = finished(table, plan)
        shown = ["method", "config", *plan.metrics]
        if plan.multi_objective and not done.empty:
            best = done[pareto_mask(done[plan.metrics].to_numpy(float), plan.modes)]
            title = f"non-dominated trials ({len(best)} of {len(table)}) on {', '.join(plan.metrics)}"
        else:
            best = done.sort_values(plan.metrics[0], ascending=plan.modes[0] == "min").head(8)
            title = f"best trials by {plan.metrics[0]} ({plan.modes[0]})"
        print(title)
        print(best[[c for c in shown if c in best]].to_string(index=False, float_format=lambda v: f"{v:.4g}")
              if not best.empty else "(none finished)")
        print()
        print_failures(table)
    if outcome.comparison is not None and not outcome.comparison.empty:
        print("\nmethod comparison (" + _comparison_title(outcome.comparison, plan) + ")")
        print(outcome.comparison.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        for note in outcome.comparison.attrs.get("notes", []):
            print(note)
    if outcome.preferences is not None and not outcome.preferences.empty:
        print("\npreference sweep: hypervolume of each method's reachable front")
        print(outcome.preferences.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        for note in outcome.preferences.attrs.get("notes", []):
            print(note)
    if plan.options.synthetic:
        print("NOTE: --synthetic: random inputs, for throughput only; these metrics mean nothing")
    print(f"\ntrial table : {outcome.table_path}")
    if outcome.plot_path:
        print(f"Pareto plot : {outcome.plot_path}")
    from mtl_tune.search.searcher import public_storage_url

    print(f"Optuna study: optuna-dashboard {public_storage_url(plan.optuna_storage)}")
    print(f"sweep folder: {outcome.sweep_dir}  (resume: --storage-path {plan.sweep_dir.parent} "
          f"--name {plan.name} --resume)")
    return not finished(table, plan).empty


def resume_command(plan) -> str:
    """The command that continues this search (its other arguments come from sweep.json)."""
    import shlex

    return (f"python -m mtl_tune.search --storage-path {shlex.quote(str(plan.sweep_dir.parent))} "
            f"--name {shlex.quote(plan.name)} --resume")


#: exit status of a search stopped by Ctrl+C (128 + SIGINT, as shells report it); SIGTERM gives 143
EXIT_INTERRUPTED = 130


def print_interrupted(outcome, plan) -> int:
    """What a Ctrl+C or SIGTERM left: the trials so far (no ranking: the methods did not get the
    same budget) and how to continue; exit 128 + the signal's number, as shells report it."""
    import signal

    signum = outcome.stop_signal or signal.SIGINT
    print_summary(outcome, plan)
    how = "Ctrl+C" if signum == signal.SIGINT else signal.Signals(signum).name
    print(f"\ninterrupted ({how}): the search stopped; no method comparison was made. Continue it with:\n"
          f"  {resume_command(plan)}")
    return 128 + int(signum)


#: what a full disk (or quota) says along an exception's chain: the OS, SQLite (Optuna's storage),
#: and pyarrow (Ray's file copies) word it differently
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
DISK_FULL_TEXT = ("No space left on device", "database or disk is full", "Disk quota exceeded")


def disk_full(err: BaseException) -> str | None:
    """The first line of the full-disk error in ``err``'s chain (causes and contexts), or None."""
    seen: set[int] = set()
    stack = [err]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        text = str(e)
        if (isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS) or any(t in text for t in DISK_FULL_TEXT):
            lines = [ln.strip() for ln in text.splitlines() if any(t in ln for t in DISK_FULL_TEXT)]
            return lines[0] if lines else f"{type(e).__name__}: {text.strip()[:200]}"
        stack += [e.__cause__, e.__context__]
    return None


def user_errors() -> tuple[type[Exception], ...]:
    """The exceptions that mean a bad argument (exit 2); none of their modules imports torch."""
    from mtl_tune.benchmarks.base import ConfigError, DataError
    from mtl_tune.registry import PluginError, UnknownNameError
    from mtl_tune.spaces import SpaceError
    from mtl_tune.search.validate import SearchError

    # PluginError: an installed plug-in that does not load (its entry point, package and cause)
    return UnknownNameError, SearchError, SpaceError, ConfigError, DataError, PluginError


def main(argv: list[str] | None = None) -> int:
    """Exit 0 when trials finished, 1 when none did or a full disk stopped the search, 2 for a bad
    argument (nothing started), 130 when Ctrl+C stopped the search, 143 when SIGTERM did."""
    from mtl_tune.search.runner import prepare, sweep_dir_of
    from mtl_tune.search.validate import SearchError, resume_options, stored_arguments

    args = build_parser().parse_args(argv)
    try:
        options = options_from_args(args)
        if options.resume and options.name:
            sweep_dir = sweep_dir_of(options)
            stored = stored_arguments(sweep_dir) if sweep_dir.is_dir() else None
            options = resume_options(options, explicit_fields(argv), stored)
        plan = prepare(options)
    except Exception as err:  # noqa: BLE001 - narrowed to the user errors just below
        if not isinstance(err, user_errors()):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    from mtl_tune.search import execute

    try:
        outcome = execute(plan)
    except SearchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - only a full disk is answered here; anything else is re-raised
        reason = disk_full(err)
        if reason is None:
            raise
        print(f"error: the disk is full ({reason}); the search stopped. Free space where {plan.sweep_dir} lives, "
              f"then continue it with:\n  {resume_command(plan)}\n(a state file Tune could not write whole is "
              "named then, with what to do)", file=sys.stderr)
        return 1
    if outcome.interrupted:
        return print_interrupted(outcome, plan)
    return 0 if print_summary(outcome, plan) else 1
