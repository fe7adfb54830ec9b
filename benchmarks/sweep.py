"""The Table 1 sweep on one machine with the in-process launcher against Ray, and a paper-scale projection.

Part 1 (``--trials`` times, the two launchers' order alternating from trial to trial): the wall time of
``reproduce("table1", scale="tiny", ...)`` for ``--envs`` x ``--variants`` (seed 0) into a fresh folder, with the
datasets collected beforehand and shared (not timed). The local launcher runs the jobs one after another in this
process; Ray starts a local instance with this machine's CPUs (as the CLI does), runs one task per job
(``--cpus-per-run`` each) and stops the instance, all inside the timed call. Beside them: the start + stop of a
local Ray instance alone, the first task on a fresh instance (its worker imports torch and this package) and the
round trip of an empty task on warm workers (Ray's fixed costs).

Part 2: the measured CPU seconds per imitation-training step at the paper's sizes (hidden 256-1024 per env, batch
200, streaming L = 2; median of ``--steps`` steps after one warm-up step, each of ``--projection-variants``), and
what the full sweep (4 variants x 5 envs x 3 seeds = 60 runs of 20 000 steps) would take: in CPU hours at those
rates, and in GPU hours at ``--gpu-step-s`` seconds per step, an estimate given as an argument (not measured here).

Writes ``benchmarks/results/sweep.json``; the timings need a quiet machine.
Usage: ``python benchmarks/sweep.py [--envs Pendulum] [--trials 3] [--steps 2] [--gpu-step-s 0.5]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import operator
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))  # run from a checkout

import torch

import deqmpc_gym  # noqa: F401  (registers the env ids)
from deqmpc_gym.experiments.launch import Job, LaunchConfig, run_jobs
from deqmpc_gym.experiments.reproduce import SCALES, TABLE1_VARIANTS, reproduce
from deqmpc_gym.experts import load_or_collect_dataset
from deqmpc_gym.io import atomic_write_text
from deqmpc_gym.policies import DEQMPCPolicy
from deqmpc_gym.training import ImitationTrainer, TrainConfig

ENVS = ("Pendulum", "Cartpole", "Quadrotor", "QPole", "QPoleObs")
RESULTS = Path(__file__).resolve().parent / "results" / "sweep.json"


def _env_id(short: str) -> str:
    return f"DEQMPC/{short}-v0"


def time_sweep(envs: list[str], variants: list[str], launch: LaunchConfig, data_dir: Path, root: Path) -> float:
    """Wall time [s] of the tiny Table 1 sweep into the fresh folder ``root`` (its datasets: ``data_dir``)."""
    root.mkdir(parents=True)
    (root / "datasets").symlink_to(data_dir, target_is_directory=True)
    t = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # the sweep's own lines and table: stdout keeps this script's
        reproduce("table1", scale="tiny", seeds=[0], envs=[_env_id(e) for e in envs], variants=variants,
                  out_dir=root, launch=launch)
    return time.perf_counter() - t


def _cold_import() -> float:
    """A task's first job in a fresh worker: the seconds to import torch and the package's training modules."""
    t = time.perf_counter()
    import deqmpc_gym.experiments.reproduce  # noqa: F401
    import deqmpc_gym.training  # noqa: F401

    return time.perf_counter() - t


def ray_fixed_costs(reps: int, cpus: int) -> dict[str, float]:
    """Median start + stop of a local Ray instance [s]; on a fresh instance, the round trip of a first task that
    imports the package [s] (and the import's share); then the round trip of an empty task on warm workers [ms]."""
    import ray

    starts = []
    for _ in range(reps):
        t = time.perf_counter()
        ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False)
        ray.shutdown()
        starts.append(time.perf_counter() - t)
    ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False)
    try:
        cold: dict[str, float] = {}
        t = time.perf_counter()
        run_jobs([Job("import", _cold_import)], LaunchConfig(launcher="ray", cpus_per_run=cpus), cold.__setitem__)
        first = time.perf_counter() - t
        jobs = [Job(f"noop{i}", operator.add, (i, 1)) for i in range(20)]
        run_jobs(jobs[:2], LaunchConfig(launcher="ray", cpus_per_run=cpus), lambda *a: None)  # warm workers
        trips = []
        for job in jobs:
            t = time.perf_counter()
            run_jobs([job], LaunchConfig(launcher="ray", cpus_per_run=cpus), lambda *a: None)
            trips.append(time.perf_counter() - t)
    finally:
        ray.shutdown()
    return {"ray_start_stop_s": statistics.median(starts), "first_task_s": first, "first_task_import_s": cold["import"],
            "empty_task_round_trip_ms": 1e3 * statistics.median(trips)}


def step_time(short: str, variant: str, steps: int, trajectories: int, data_dir: Path, tmp: Path) -> float:
    """Median CPU seconds of one training step at the paper's hidden size of ``short`` and batch 200."""
    paper = SCALES["paper"]
    env_id = _env_id(short)
    ds = load_or_collect_dataset(env_id, trajectories, seed=0, cache_dir=data_dir)
    torch.manual_seed(0)
    policy = DEQMPCPolicy.from_env(env_id, variant, hidden=paper.hidden[short])
    cfg = TrainConfig(steps=10**6, batch_size=paper.batch_size[short], val_batches=1, seed=0)
    trainer = ImitationTrainer(policy, ds, cfg, tmp / f"{short}-{variant}", progress=False)
    trainer.train_step()  # warm-up
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads of this process (and --cpus-per-run)")
    ap.add_argument("--envs", nargs="+", default=["Pendulum"], choices=ENVS, help="envs of the tiny sweep")
    ap.add_argument("--variants", nargs="+", default=list(TABLE1_VARIANTS), help="variants of the tiny sweep")
    ap.add_argument("--trials", type=int, default=3, help="tiny sweeps per launcher (order alternating)")
    ap.add_argument("--cpus-per-run", type=int, default=1, help="Ray: CPUs per task")
    ap.add_argument("--fixed-reps", type=int, default=3, help="Ray instance start + stop repetitions")
    ap.add_argument("--projection-envs", nargs="+", default=list(ENVS), choices=ENVS)
    ap.add_argument("--projection-variants", nargs="+", default=["deq-mpc-deq"],
                    help="variants timed at the paper's sizes; the projection applies their mean to all four")
    ap.add_argument("--steps", type=int, default=2, help="timed training steps per env at the paper's sizes")
    ap.add_argument("--trajectories", type=int, default=10, help="expert trajectories for the timed steps")
    ap.add_argument("--gpu-step-s", type=float, default=0.5,
                    help="ESTIMATE of one training step's seconds on one GPU at the paper's sizes (not measured)")
    ap.add_argument("--skip-sweep", action="store_true")
    ap.add_argument("--skip-projection", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    record: dict = {"cores": os.cpu_count(), "threads": args.threads, "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data_dir = tmp / "datasets"
        data_dir.mkdir()
        if not args.skip_sweep:
            import ray

            tiny = SCALES["tiny"]
            for e in args.envs:  # collected once, shared by every trial, not timed
                load_or_collect_dataset(_env_id(e), tiny.num_trajectories[e], seed=0, cache_dir=data_dir)
            launches = {"local": LaunchConfig(),
                        "ray": LaunchConfig(launcher="ray", cpus_per_run=args.cpus_per_run)}
            rows = []
            for trial in range(args.trials):
                order = ["local", "ray"] if trial % 2 == 0 else ["ray", "local"]
                for name in order:
                    wall = time_sweep(args.envs, args.variants, launches[name], data_dir, tmp / f"t{trial}-{name}")
                    rows.append({"trial": trial, "launcher": name, "wall_s": wall})
                    print(f"  trial {trial} {name}: {wall:.1f} s", file=sys.stderr, flush=True)
            med = {n: statistics.median(r["wall_s"] for r in rows if r["launcher"] == n) for n in launches}
            jobs = len(args.envs) * len(args.variants)
            record["sweep"] = {"scale": "tiny", "envs": args.envs, "variants": args.variants, "jobs": jobs,
                               "cpus_per_run": args.cpus_per_run, "ray": ray.__version__, "rows": rows,
                               "median_wall_s": med, "ray_vs_local": med["ray"] / med["local"],
                               **ray_fixed_costs(args.fixed_reps, args.cpus_per_run)}
        if not args.skip_projection:
            paper = SCALES["paper"]
            prow = []
            for e in args.projection_envs:
                for v in args.projection_variants:
                    s = step_time(e, v, args.steps, args.trajectories, data_dir, tmp)
                    prow.append({"env": e, "variant": v, "hidden": paper.hidden[e], "batch": paper.batch_size[e],
                                 "cpu_s_per_step": s})
                    print(f"  {e} {v} hidden {paper.hidden[e]}: {s:.2f} s/step", file=sys.stderr, flush=True)
            per_env = {e: statistics.mean(r["cpu_s_per_step"] for r in prow if r["env"] == e)
                       for e in args.projection_envs}
            runs = {e: len(TABLE1_VARIANTS) * len(paper.seeds[e]) for e in args.projection_envs}
            cpu_hours = sum(runs[e] * paper.steps[e] * per_env[e] for e in per_env) / 3600
            gpu_hours = sum(runs[e] * paper.steps[e] for e in per_env) * args.gpu_step_s / 3600
            record["projection"] = {"rows": prow, "steps_timed": args.steps, "runs": sum(runs.values()),
                                    "steps_per_run": {e: paper.steps[e] for e in per_env},
                                    "cpu_hours_one_core": cpu_hours, "gpu_step_s": args.gpu_step_s,
                                    "gpu_step_s_is_estimate": True, "gpu_hours": gpu_hours}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(record, indent=2))
    if "sweep" in record:
        sw = record["sweep"]
        print(f"Tiny Table 1 sweep ({', '.join(sw['envs'])} x {sw['jobs'] // len(sw['envs'])} variants = "
              f"{sw['jobs']} jobs, {record['cores']} cores; median of {args.trials} alternating trials)")
        print()
        print("| launcher | wall time [s] |")
        print("|---|---|")
        for n, w in sw["median_wall_s"].items():
            print(f"| {n} | {w:.1f} |")
        print()
        print(f"Ray: {sw['ray_vs_local']:.2f}x the local wall time; start + stop of a local instance "
              f"{sw['ray_start_stop_s']:.1f} s; first task in a fresh worker {sw['first_task_s']:.1f} s (of which "
              f"importing torch and the package {sw['first_task_import_s']:.1f} s); empty task round trip on warm "
              f"workers {sw['empty_task_round_trip_ms']:.1f} ms")
    if "projection" in record:
        pr = record["projection"]
        print()
        print(f"Paper scale (batch 200, streaming L = 2; median of {args.steps} steps after a warm-up, "
              f"{args.threads} thread(s))")
        print()
        print("| env | variant | hidden | CPU s/step |")
        print("|---|---|---|---|")
        for r in pr["rows"]:
            print(f"| {r['env']} | {r['variant']} | {r['hidden']} | {r['cpu_s_per_step']:.2f} |")
        print()
        print(f"{pr['runs']} runs: {pr['cpu_hours_one_core']:.0f} CPU hours at these rates; "
              f"{pr['gpu_hours']:.0f} GPU hours at an ESTIMATED {pr['gpu_step_s']} s per step on a GPU")


if __name__ == "__main__":
    main()
