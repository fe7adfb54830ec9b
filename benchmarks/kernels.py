"""Benchmark of the compiled kernels (``deqmpc_gym.systems.kernels``, ``deqmpc_gym.mpc.fused``); prints markdown
tables and writes ``benchmarks/results/kernels.json``.

1. Warm ``act()`` latency on QPole (hidden ``--hidden``, default 256) for every variant, with the compiled kernels
   and with the eager path (``kernels.disabled()``) side by side in one run: the policy is warm-started along
   ``--episodes`` expert episodes (the shipped PPO expert drives, the policy acts on the visited states; at least
   ``--calls`` calls per path), the two paths alternating episode by episode. Medians in ms and their ratio.
2. Cold compile time per system: a fresh process with an empty kernel cache (``DEQMPC_GYM_CACHE``) builds the
   dynamics kernels, the fused AL loop (compiled when the kernel module is built), the implicit gradient's solve
   (``fused.implicit_solve``, compiled at its first call) and the per-AL-iteration Newton loop of
   ``stop_when_converged`` solves (compiled at the first such solve); then a second fresh process loads them from
   numba's disk cache.

With ``--baseline-src DIR`` the act() baseline is instead the eager path of the code checked out in ``DIR`` (e.g. a
``git worktree`` of an earlier commit), in a worker process that imports that checkout, the two processes
alternating episode by episode (same weights: both seed the policy alike): the speed-up then includes every change
between the two checkouts (the network's too).

Usage: ``python benchmarks/kernels.py [--hidden 256] [--episodes 3] [--calls 100] [--skip-compile | --compile-only]
[--baseline-src DIR]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if "--worker" not in sys.argv:  # a worker imports the checkout on its PYTHONPATH
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))  # run from a checkout

import gymnasium as gym
import numpy as np
import torch

import deqmpc_gym  # noqa: F401  (registers the ids)
from deqmpc_gym.experts import load_expert
from deqmpc_gym.io import atomic_write_text
from deqmpc_gym.policies import DEQMPCPolicy
from deqmpc_gym.systems import kernels

VARIANTS = ("diff-mpc-nn", "diff-mpc-deq", "deq-mpc-nn", "deq-mpc-deq")
SYSTEMS = ("pendulum", "cartpole", "quadrotor", "qpole")
RESULTS = Path(__file__).resolve().parent / "results" / "kernels.json"

_COMPILE_SNIPPET = """
import time, torch
from deqmpc_gym.mpc import MPCConfig, MPCProblem, fused
from deqmpc_gym.systems import get_system, kernels
s = get_system({name!r})
t = time.perf_counter()
assert kernels.kernels_for(s) is not None
t1 = time.perf_counter()
pb = MPCProblem(s, MPCConfig())
assert fused.usable(pb, torch.zeros(1, s.nx, dtype=torch.float64), False)
t2 = time.perf_counter()
z = lambda *shape: torch.zeros(*shape, dtype=torch.float64)
fused.implicit_solve(pb, z(1, pb.T, s.nx), z(1, pb.T, s.nu), z(1, pb.T, s.nx), z(1, pb.T - 1, s.nx),
                     z(1, pb.T, pb.n_ineq), torch.ones(1, dtype=torch.float64), None, z(1, pb.T, pb.n))
t3 = time.perf_counter()
from deqmpc_gym.mpc import solve
with torch.no_grad():  # a standalone solve: one compiled Newton loop per AL iteration
    solve(pb, z(1, s.nx), z(1, pb.T, s.nx), stop_when_converged=True)
print(t1 - t, t2 - t1, t3 - t2, time.perf_counter() - t3)
"""


def expert_states(env_id: str, episodes: int, steps: int) -> list[np.ndarray]:
    """Observations of ``episodes`` expert episodes (seeds 0..), at most ``steps`` each."""
    expert = load_expert(env_id)
    env = gym.make(env_id)
    out = []
    for ep in range(episodes):
        obs, _ = env.reset(seed=ep)
        seq = [obs]
        for _ in range(steps - 1):
            a, _ = expert.predict(obs, deterministic=True)
            obs, _, term, trunc, _ = env.step(a)
            if term or trunc:
                break
            seq.append(obs)
        out.append(np.asarray(seq))
    env.close()
    return out


def act_times(policy: DEQMPCPolicy, states: np.ndarray) -> list[float]:
    """Seconds per warm ``act()`` along one episode's states (the first, cold call excluded)."""
    policy.reset()
    policy.act(states[0])
    times = []
    for obs in states[1:]:
        t = time.perf_counter()
        policy.act(obs)
        times.append(time.perf_counter() - t)
    return times


def worker() -> None:
    """Baseline worker: per stdin line ``{"env", "variant", "hidden", "states"}`` (an ``.npy`` of observations)
    print the eager path's warm act() times along those states (the policy of a pair built, seeded, on first use)."""
    torch.set_num_threads(1)
    policies: dict[tuple[str, str, int], DEQMPCPolicy] = {}
    with kernels.disabled():
        for line in sys.stdin:
            req = json.loads(line)
            key = (req["env"], req["variant"], req["hidden"])
            if key not in policies:
                torch.manual_seed(0)
                policies[key] = DEQMPCPolicy.from_env(req["env"], req["variant"], hidden=req["hidden"])
            print(json.dumps({"times": act_times(policies[key], np.load(req["states"]))}), flush=True)


class _Baseline:
    """The eager act() of another checkout, in a worker process (``--baseline-src``)."""

    def __init__(self, src: str, tmp: str) -> None:
        env = {**os.environ, "PYTHONPATH": os.path.abspath(src), "OMP_NUM_THREADS": "1"}
        # started outside any checkout, so that the worker imports src and not an editable install's source
        self.proc = subprocess.Popen([sys.executable, "-u", os.path.abspath(__file__), "--worker"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=tmp)
        self.tmp = tmp
        rev = subprocess.run(["git", "-C", src, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        self.name = f"eager path of {rev.stdout.strip() or src}"

    def times(self, env_id: str, variant: str, hidden: int, states: np.ndarray) -> list[float]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        path = os.path.join(self.tmp, "states.npy")
        np.save(path, states)
        self.proc.stdin.write(json.dumps({"env": env_id, "variant": variant, "hidden": hidden, "states": path})
                              + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the baseline worker exited; see its stderr above")
        return list(json.loads(line)["times"])

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait()


def act_rows(env_id: str, hidden: int, episodes: int, calls: int, baseline_src: str | None = None) -> list[dict]:
    steps = max(2, calls // episodes + 2)
    eps = expert_states(env_id, episodes, steps)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        remote = _Baseline(baseline_src, tmp) if baseline_src else None
        for variant in VARIANTS:
            torch.manual_seed(0)
            policy = DEQMPCPolicy.from_env(env_id, variant, hidden=hidden)

            def baseline(states: np.ndarray) -> list[float]:
                if remote is not None:
                    return remote.times(env_id, variant, hidden, states)  # noqa: B023  (called in this iteration)
                with kernels.disabled():
                    return act_times(policy, states)  # noqa: B023

            act_times(policy, eps[0][:3])  # warm-up: compiles / loads the kernels
            baseline(eps[0][:3])
            new: list[float] = []
            old: list[float] = []
            for seq in eps:  # alternate the paths episode by episode
                new += act_times(policy, seq)
                old += baseline(seq)
            rows.append({"env": env_id.split("/")[-1], "variant": variant, "hidden": hidden, "calls": len(new),
                         "act_ms": float(np.median(new) * 1e3), "baseline_act_ms": float(np.median(old) * 1e3),
                         "speedup": float(np.median(old) / np.median(new)),
                         "baseline": remote.name if remote else "eager path of this checkout"})
            r = rows[-1]
            print(f"  {r['env']} {variant} h{hidden}: {r['act_ms']:.2f} ms, baseline {r['baseline_act_ms']:.2f} ms "
                  f"({r['speedup']:.2f}x, {r['calls']} calls)", file=sys.stderr, flush=True)
        if remote is not None:
            remote.close()
    return rows


def compile_rows() -> list[dict]:
    rows = []
    for name in SYSTEMS:
        with tempfile.TemporaryDirectory() as tmp:
            env = {**os.environ, "DEQMPC_GYM_CACHE": tmp, "OMP_NUM_THREADS": "1"}
            runs = []
            for _ in range(2):  # cold (empty cache), then warm (numba's disk cache)
                t = time.perf_counter()
                out = subprocess.run([sys.executable, "-c", _COMPILE_SNIPPET.format(name=name)], env=env,
                                     capture_output=True, text=True, check=True)
                total = time.perf_counter() - t
                dyn, al_loop, implicit, newton = (float(v) for v in out.stdout.split())
                runs.append((dyn, al_loop, implicit, newton, total))
        rows.append({"system": name, "cold_dynamics_s": runs[0][0], "cold_al_loop_s": runs[0][1],
                     "cold_implicit_s": runs[0][2], "cold_newton_s": runs[0][3], "warm_dynamics_s": runs[1][0],
                     "warm_al_loop_s": runs[1][1], "warm_implicit_s": runs[1][2], "warm_newton_s": runs[1][3]})
        r = rows[-1]
        print(f"  {name}: cold {r['cold_dynamics_s']:.1f} + {r['cold_al_loop_s']:.1f} + {r['cold_implicit_s']:.1f} + "
              f"{r['cold_newton_s']:.1f} s, warm {r['warm_dynamics_s']:.2f} + {r['warm_al_loop_s']:.2f} + "
              f"{r['warm_implicit_s']:.2f} + {r['warm_newton_s']:.2f} s", file=sys.stderr, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--episodes", type=int, default=3)
    ap.add_argument("--calls", type=int, default=100, help="at least this many warm act() calls per path")
    only = ap.add_mutually_exclusive_group()
    only.add_argument("--skip-compile", action="store_true", help="keep the record's compile rows")
    only.add_argument("--compile-only", action="store_true", help="keep the record's act() rows")
    ap.add_argument("--baseline-src", metavar="DIR",
                    help="checkout whose eager act() is the baseline (default: this checkout's eager path)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="record to write (default: %(default)s)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker()
        return
    torch.set_num_threads(1)
    old = json.loads(args.out.read_text()) if args.out.exists() else {}
    acts = old.get("act", []) if args.compile_only else act_rows("DEQMPC/QPole-v0", args.hidden, args.episodes,
                                                                    args.calls, args.baseline_src)
    comp = old.get("compile", []) if args.skip_compile else compile_rows()
    print(f"Warm act() on QPole, hidden {args.hidden}, 1 thread, {platform.processor() or platform.machine()}: "
          f"medians along {args.episodes} expert episodes, compiled kernels beside the baseline "
          f"({acts[0]['baseline'] if acts else '-'}) in one run")
    print()
    print("| variant | calls | act [ms] | baseline act [ms] | speed-up |")
    print("|---|---|---|---|---|")
    for r in acts:
        print(f"| {r['variant']} | {r['calls']} | {r['act_ms']:.2f} | {r['baseline_act_ms']:.2f} | "
              f"{r['speedup']:.2f}x |")
    if comp and not args.skip_compile:
        print()
        print("Compile time per system (fresh process; cold = empty kernel cache, warm = numba's disk cache):")
        print()
        print("| system | cold: dynamics [s] | cold: AL loop [s] | cold: implicit solve [s] | cold: Newton loop [s] "
              "| cached: dynamics [s] | cached: AL loop [s] | cached: implicit solve [s] | cached: Newton loop [s] |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in comp:
            print(f"| {r['system']} | {r['cold_dynamics_s']:.1f} | {r['cold_al_loop_s']:.1f} "
                  f"| {r['cold_implicit_s']:.1f} | {r['cold_newton_s']:.1f} "
                  f"| {r['warm_dynamics_s']:.2f} | {r['warm_al_loop_s']:.2f} | {r['warm_implicit_s']:.2f} "
                  f"| {r['warm_newton_s']:.2f} |")
    atomic_write_text(args.out, json.dumps({"torch": torch.__version__, "threads": 1, "act": acts, "compile": comp},
                                           indent=2))


if __name__ == "__main__":
    main()
