"""Benchmark of imitation training per env and variant at the CPU scale of Table 1; prints markdown tables.

1. Training windows/s of :meth:`ImitationTrainer.train_step` with the compiled kernels (new path) beside the eager
   path (``kernels.disabled()``), the two alternating chunk by chunk in one run, per env and variant with the
   CPU-scale sizes of ``deqmpc-gym reproduce table1 --scale cpu`` (hidden 64; batch 64 for Pendulum / Cartpole, 32
   for the quadrotors; streaming L = 2: one cold and two warm-started layer calls per window), median over
   ``--trials`` chunks of ``--steps`` steps (validation and checkpoints excluded). Pendulum uses the shipped
   dataset, the other envs a small dataset collected from their shipped experts (``--trajectories``).
2. Time-share profile of the same steps, with wall-clock timers wrapped (in this script only) around
   ``WindowSampler.sample`` (data), the network's ``forward`` (network fwd, incl. DEQ fixed-point solves),
   ``deqmpc_gym.policies.layer.solve`` (MPC solver fwd), the solver's implicit-gradient ``backward``
   (solver bwd), ``loss.backward`` minus solver bwd (network bwd + autograd glue), the optimizer step with
   gradient clipping, and the rest (loss arithmetic, state shifting, Python overhead).

With ``--baseline-src DIR`` the baseline is instead the eager path of the code checked out in ``DIR`` (e.g. a
``git worktree`` of an earlier commit), run in a worker process that imports that checkout, the two processes
alternating chunk by chunk: the speed-up then includes every change between the two checkouts (the network's too).

Writes ``benchmarks/results/training.json``; rows of (env, variant) pairs not measured in a run are kept. Each row
holds the commit of the measured checkout (``code``) and its ``trials`` x ``steps``.
Usage: ``python benchmarks/training.py [--threads 1] [--steps 5] [--trials 3] [--envs Pendulum Cartpole ...]
[--baseline-src DIR]``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

if "--worker" not in sys.argv:  # a worker imports the checkout on its PYTHONPATH
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))  # run from a checkout

import numpy as np
import torch

import deqmpc_gym  # noqa: F401  (registers the env ids)
import deqmpc_gym.policies.layer as layer_mod
from deqmpc_gym.data import ExpertDataset, shipped_dataset
from deqmpc_gym.experiments.reproduce import SCALES
from deqmpc_gym.experts import collect_dataset, load_expert
from deqmpc_gym.io import atomic_write_text
from deqmpc_gym.mpc import solver as solver_mod
from deqmpc_gym.policies import DEQMPCPolicy
from deqmpc_gym.systems import kernels
from deqmpc_gym.training import ImitationTrainer, TrainConfig, WindowSampler

VARIANTS = ("diff-mpc-nn", "diff-mpc-deq", "deq-mpc-nn", "deq-mpc-deq")
ENVS = ("Pendulum", "Cartpole", "Quadrotor", "QPole", "QPoleObs")
RESULTS = Path(__file__).resolve().parent / "results" / "training.json"

TIMES: dict[str, float] = defaultdict(float)
ENABLED = [False]


def timed(name: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not ENABLED[0]:
            return fn(*args, **kwargs)
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            TIMES[name] += time.perf_counter() - t
    return wrapper


def install_timers() -> None:
    WindowSampler.sample = timed("data", WindowSampler.sample)
    layer_mod.solve = timed("solver fwd", layer_mod.solve)
    for cls in (solver_mod._ImplicitFn, solver_mod._FinalImplicitFn):
        cls.backward = staticmethod(timed("solver bwd", cls.backward))
    torch.Tensor.backward = timed("backward (total)", torch.Tensor.backward)


def dataset(short: str, trajectories: int) -> ExpertDataset:
    env_id = f"DEQMPC/{short}-v0"
    if short == "Pendulum":
        return ExpertDataset.load(shipped_dataset(env_id), env_id=env_id)
    return collect_dataset(load_expert(env_id), env_id, trajectories, seed=0)


def make_trainer(env_id: str, variant: str, ds: ExpertDataset, hidden: int, batch: int, out: str) -> ImitationTrainer:
    torch.manual_seed(0)
    policy = DEQMPCPolicy.from_env(env_id, variant, hidden=hidden)
    cfg = TrainConfig(steps=10**6, batch_size=batch, val_batches=1, seed=0)
    trainer = ImitationTrainer(policy, ds, cfg, out, progress=False)
    net = policy.layer.net
    net.forward = timed("network fwd", net.forward)
    opt = trainer.optimizer
    opt.step = timed("optimizer", opt.step)
    return trainer


def worker(threads: int, trajectories: int) -> None:
    """Baseline worker: per stdin line ``{"env", "variant", "steps"}`` run that many eager training steps (the first
    request of a pair builds its trainer and runs one untimed step) and print the seconds they took."""
    import tempfile

    torch.set_num_threads(threads)
    scale = SCALES["cpu"]
    trainers: dict[tuple[str, str], ImitationTrainer] = {}
    datasets: dict[str, ExpertDataset] = {}
    with tempfile.TemporaryDirectory() as tmp, kernels.disabled():
        for line in sys.stdin:
            req = json.loads(line)
            short, variant = req["env"], req["variant"]
            if (short, variant) not in trainers:
                if short not in datasets:
                    datasets[short] = dataset(short, trajectories)
                trainers[short, variant] = make_trainer(f"DEQMPC/{short}-v0", variant, datasets[short],
                                                        scale.hidden[short], scale.batch_size[short],
                                                        os.path.join(tmp, short + variant))
                trainers[short, variant].train_step()
            t = time.perf_counter()
            for _ in range(req["steps"]):
                trainers[short, variant].train_step()
            print(json.dumps({"seconds": time.perf_counter() - t}), flush=True)


class _Baseline:
    """The eager path of another checkout, in a worker process (``--baseline-src``)."""

    def __init__(self, src: str, args: argparse.Namespace) -> None:
        env = {**os.environ, "PYTHONPATH": os.path.abspath(src), "OMP_NUM_THREADS": str(args.threads)}
        cmd = [sys.executable, "-u", os.path.abspath(__file__), "--worker", "--threads", str(args.threads),
               "--trajectories", str(args.trajectories)]
        # started outside any checkout, so that the worker imports src and not an editable install's source
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                     cwd=tempfile.gettempdir())
        rev = subprocess.run(["git", "-C", src, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        self.name = f"eager path of {rev.stdout.strip() or src}"

    def steps(self, short: str, variant: str, steps: int) -> float:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"env": short, "variant": variant, "steps": steps}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the baseline worker exited; see its stderr above")
        return float(json.loads(line)["seconds"])

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--envs", nargs="+", default=list(ENVS), choices=ENVS)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--trajectories", type=int, default=20, help="dataset size of the envs other than Pendulum")
    ap.add_argument("--baseline-src", metavar="DIR",
                    help="checkout whose eager path is the baseline (default: this checkout's eager path)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="record to write (default: %(default)s)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.threads, args.trajectories)
        return
    torch.set_num_threads(args.threads)
    install_timers()
    torch.nn.utils.clip_grad_norm_ = timed("optimizer", torch.nn.utils.clip_grad_norm_)  # looked up per call
    scale = SCALES["cpu"]
    remote = _Baseline(args.baseline_src, args) if args.baseline_src else None
    baseline_name = remote.name if remote else "eager path of this checkout"

    here = subprocess.run(["git", "-C", os.path.dirname(os.path.abspath(__file__)), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip() or "unknown"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for short in args.envs:
            env_id = f"DEQMPC/{short}-v0"
            ds = dataset(short, args.trajectories)
            hidden, batch = scale.hidden[short], scale.batch_size[short]
            for variant in args.variants:
                trainer = make_trainer(env_id, variant, ds, hidden, batch, os.path.join(tmp, short + variant))
                trainer.train_step()  # warm-up (compiles or loads the kernels)
                if remote is None:
                    base = make_trainer(env_id, variant, ds, hidden, batch, os.path.join(tmp, short + variant + "-b"))
                    with kernels.disabled():
                        base.train_step()
                else:
                    remote.steps(short, variant, 0)  # builds the worker's trainer, one untimed step

                def baseline_seconds() -> float:
                    if remote is not None:
                        return remote.steps(short, variant, args.steps)  # noqa: B023  (called in this iteration)
                    with kernels.disabled():
                        t = time.perf_counter()
                        for _ in range(args.steps):
                            base.train_step()  # noqa: B023
                        return time.perf_counter() - t

                rates, base_rates, total = [], [], 0.0
                TIMES.clear()
                for _ in range(args.trials):  # the two paths alternate, so both see the same machine load
                    base_rates.append(args.steps / baseline_seconds())
                    ENABLED[0] = True
                    t = time.perf_counter()
                    for _ in range(args.steps):
                        trainer.train_step()
                    dt = time.perf_counter() - t
                    ENABLED[0] = False
                    total += dt
                    rates.append(args.steps / dt)
                shares = dict(TIMES)
                shares["network bwd"] = shares.pop("backward (total)", 0.0) - shares.get("solver bwd", 0.0)
                shares["other"] = total - sum(shares.values())
                rate, base_rate = float(np.median(rates)), float(np.median(base_rates))
                rows.append({"env": short, "variant": variant, "hidden": hidden, "batch": batch,
                             "steps_per_s": rate, "windows_per_s": rate * batch,
                             "baseline_windows_per_s": base_rate * batch, "speedup": rate / base_rate,
                             "baseline": baseline_name, "share": {k: v / total for k, v in shares.items()},
                             "code": here, "trials": args.trials, "steps": args.steps})
                print(f"  {short} {variant}: {rate * batch:.1f} windows/s, baseline {base_rate * batch:.1f} "
                      f"({rate / base_rate:.2f}x)", file=sys.stderr, flush=True)
    if remote is not None:
        remote.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    measured = {(r["env"], r["variant"]) for r in rows}
    kept = []
    if args.out.exists():  # rows of pairs not measured in this run stay
        kept = [r for r in json.loads(args.out.read_text())["rows"] if (r["env"], r["variant"]) not in measured]
    order = {(e, v): i for i, (e, v) in enumerate((e, v) for e in ENVS for v in VARIANTS)}
    merged = sorted(kept + rows, key=lambda r: order.get((r["env"], r["variant"]), len(order)))
    atomic_write_text(args.out, json.dumps({"threads": args.threads, "torch": torch.__version__, "rows": merged},
                                           indent=2))
    print(f"Baseline: {baseline_name}.")
    print(f"Imitation training at the CPU scale of Table 1 (streaming L = 2), {args.threads} torch thread(s); "
          f"median of {args.trials} x {args.steps} steps")
    print()
    print("| env | variant | hidden | batch | ms/step | windows/s | baseline windows/s | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        rate = r["steps_per_s"]
        print(f"| {r['env']} | {r['variant']} | {r['hidden']} | {r['batch']} | {1e3 / rate:.0f} | "
              f"{r['windows_per_s']:.0f} | {r['baseline_windows_per_s']:.0f} | {r['speedup']:.2f}x |")
    cols = ["data", "network fwd", "solver fwd", "network bwd", "solver bwd", "optimizer", "other"]
    print()
    print("Time share per training step (manual timers around the library calls):")
    print()
    print("| env | variant | " + " | ".join(cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for r in rows:
        print(f"| {r['env']} | {r['variant']} | " + " | ".join(f"{100 * r['share'].get(c, 0.0):.1f}%" for c in cols)
              + " |")


if __name__ == "__main__":
    main()
