"""CPU time per training step of whole toy trials, with and without ``Optimizer``'s wrappers.

A toy trial (the README's main command runs 17 of them) is ~1 ms steps of tiny tensors, where the
``zero_grad()`` / ``step()`` wrappers of ``torch.optim`` (profiler scopes, hooks, a dynamo guard)
are a visible share. ``Balancer.train_step`` now calls ``clear_grads`` / ``adam_step``
(``mtl_tune.balancers._adam``): the same arithmetic bit for bit, without the wrappers. This
script runs each method's trial both ways in one process, alternating (ABAB…), and reports the
median CPU µs per step of the epochs after the first (the first evaluation computes the exact
Pareto front once per process) and whether every reported metric but the timing is equal.

    python bench/trial_step.py --methods ls,mgda,famo,cagrad --repeats 3
"""

from __future__ import annotations

import _common as c  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads; puts the checkout first)

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from unittest import mock  # noqa: E402

import torch  # noqa: E402

from mtl_tune.training.loop import train  # noqa: E402

TIMING = {"epoch_time_s"}


def one_trial(method: str, epochs: int, steps: int, wrappers: bool) -> tuple[float, dict]:
    """(CPU µs per step after the first epoch, the last report without timing)."""
    config = {"benchmark": "toy", "method": method, "epochs": epochs, "steps_per_epoch": steps, "seed": 0}
    stamps, reports = [], []

    def report(metrics: dict, state: dict | None) -> None:
        stamps.append(time.process_time())
        reports.append(metrics)

    patches = [mock.patch("mtl_tune.balancers.base.adam_step", lambda o: o.step()),
               mock.patch("mtl_tune.balancers.base.clear_grads", lambda o: o.zero_grad(set_to_none=True))] \
        if wrappers else []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for p in patches:
            p.start()
        try:
            train(config, report)
        finally:
            for p in patches:
                p.stop()
    per_step = (stamps[-1] - stamps[0]) / ((epochs - 1) * steps) * 1e6
    return per_step, {k: v for k, v in reports[-1].items() if k not in TIMING}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="ls,mgda,famo,cagrad")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--steps", type=int, default=1000)
    args = p.parse_args()
    torch.set_num_threads(1)  # a trial with --cpus-per-trial 1
    one_trial("ls", 2, 50, False)  # warm-up: imports and the exact front, outside the timed runs
    print("| method | with wrappers (µs/step) | without (µs/step) | without ÷ with | same metrics |")
    print("|---|---|---|---|---|")
    for method in args.methods.split(","):
        times: dict[bool, list[float]] = {True: [], False: []}
        finals: dict[bool, list[dict]] = {True: [], False: []}
        for _ in range(args.repeats):
            for wrappers in (True, False):
                t, final = one_trial(method, args.epochs, args.steps, wrappers)
                times[wrappers].append(t)
                finals[wrappers].append(final)
        with_w, without = statistics.median(times[True]), statistics.median(times[False])
        same = all(a == b for a, b in zip(finals[True], finals[False]))
        print(f"| {method} | {with_w:.0f} | {without:.0f} | {without / with_w:.2f} | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
