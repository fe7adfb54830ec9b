"""Multi-start cold solves on the solver suite: every start run to the end against screened starts, beside one start.

Run:  python benchmarks/multistart.py [--problems unicycle,car] [--horizons 10,20] [--split report] [--starts 4]
      [--screen 2] [--B 200] [--reps 5] [--threads 1]
Prints a markdown table and writes benchmarks/results/multistart_<split>_k<starts>.json.

Per problem and horizon of ``benchmarks/solver_suite.py`` (same instances, the IPOPT references of its cache) three
configurations of ``MPCConfig.standalone(T)`` solve the same ``B`` instances cold to convergence:

* ``1 start``: the default;
* ``K full``: ``starts=K, screen_iters=0`` -- every start runs to its end, the best converged answer kept;
* ``K screened``: ``starts=K, screen_iters=j`` -- the starts run ``j`` AL iterations together, then each sample
  continues from its most promising start alone (:func:`deqmpc_gym.mpc.starts.screen`).

Columns: ``ok`` (samples at most 1e-4 above IPOPT's cost), ``conv`` (flagged converged), ``false conv`` (flagged
converged above 1e-4: another local solution) per configuration, and the time of each multi-start configuration
over one start's: medians of ``--reps`` calls, the three called in turn so that they see the same machine load.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # solver_suite, casadi_ref

import solver_suite as suite  # noqa: E402
import torch

from deqmpc_gym.io import atomic_write_text  # noqa: E402
from deqmpc_gym.mpc import STANDALONE_ITERS  # noqa: E402

CONFIGS = ("1 start", "K full", "K screened")


def measure(name: str, T: int, B: int, split: str, starts: int, screen: int, reps: int, cache: dict) -> dict:
    """One row: the counts of the three configurations and the multi-start times over one start's."""
    inst = suite.make_instances(name, T, B, split)
    ref, _ = suite.ipopt_references(inst, cache)
    problems = [suite.make_problem(inst), suite.make_problem(inst, starts=starts, screen_iters=0),
                suite.make_problem(inst, starts=starts, screen_iters=screen)]
    calls = [lambda pb=pb: suite.solve_suite(inst, pb, STANDALONE_ITERS) for pb in problems]
    times = suite.alternating_medians(calls, reps)
    row: dict = {"problem": name, "T": T, "B": B, "starts": starts, "screen_iters": screen,
                 "single_s": times[0]}
    for label, pb, t in zip(CONFIGS, problems, times):
        x, u, info, _ = suite.solve_suite(inst, pb, STANDALONE_ITERS)
        m = suite.evaluate(inst, x, u, info.converged, ref)
        row[label] = {"ok": m["ok"], "converged": m["converged"], "false_converged": m["false_converged"],
                      "time_over_single": t / times[0]}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--problems", default="unicycle,car")
    ap.add_argument("--horizons", default="10,20")
    ap.add_argument("--split", default="report", choices=("tune", "report"))
    ap.add_argument("--starts", type=int, default=4)
    ap.add_argument("--screen", type=int, default=2, help="screen_iters of the screened configuration")
    ap.add_argument("--B", type=int, default=200)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cache = suite.load_cache()
    rows = []
    print(f"| problem | T | ok: 1 start | {args.starts} full | {args.starts} screened | false conv: 1 / full / "
          "screened | time over 1 start: full / screened |")
    print("|---|---|---|---|---|---|---|")
    for name in args.problems.split(","):
        for T in map(int, args.horizons.split(",")):
            r = measure(name, T, args.B, args.split, args.starts, args.screen, args.reps, cache)
            rows.append(r)
            one, full, scr = (r[c] for c in CONFIGS)
            print(f"| {name} | {T} | {one['ok']} | {full['ok']} | {scr['ok']} | {one['false_converged']} / "
                  f"{full['false_converged']} / {scr['false_converged']} | {full['time_over_single']:.2f}x / "
                  f"{scr['time_over_single']:.2f}x |", flush=True)
    suite.save_cache(cache)
    out = os.path.join(suite.RESULTS, f"multistart_{args.split}_k{args.starts}.json")
    record = {"threads": args.threads, "torch": torch.__version__, "split": args.split, "reps": args.reps,
              "rows": rows}
    atomic_write_text(out, json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
