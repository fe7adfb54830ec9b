"""``make demo``: DEQ-MPC vs Diff-MPC on the shipped Pendulum dataset, end to end, in a few minutes on a CPU.

Steps: load the expert dataset shipped with the package (300 PPO-expert trajectories), imitation-train a small
DEQ-MPC-DEQ and a small Diff-MPC-NN policy, evaluate both on batched rollouts (normalized against the shipped
expert's card), print and write the comparison table, and record a video of the DEQ-MPC policy with its plan
drawn in. Re-running resumes finished training from its checkpoints.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deqmpc_gym.data import shipped_dataset
from deqmpc_gym.io import atomic_write_text

if TYPE_CHECKING:  # pragma: no cover
    import torch

DEMO_ENV = "DEQMPC/Pendulum-v0"
DEMO_DATASET = shipped_dataset(DEMO_ENV)
DEMO_VARIANTS = ("deq-mpc-deq", "diff-mpc-nn")
#: training steps per variant when :func:`run_demo` gets ``steps=None``.
DEMO_STEPS = 1000


def run_demo(out_dir: str | Path = "results/demo", *, steps: int | None = None, episodes: int = 50,
             hidden: int = 64, batch_size: int = 64, video: bool = True,
             device: str | torch.device = "cpu") -> dict[str, Any]:
    """Run the demo on ``device``; returns ``{variant: metrics}`` and writes ``results.md``, ``results.json`` and
    a video."""
    import torch

    from deqmpc_gym.data import ExpertDataset
    from deqmpc_gym.evaluation import EvalConfig, rollout_batched
    from deqmpc_gym.experiments.record import record_rollouts
    from deqmpc_gym.experts import load_expert
    from deqmpc_gym.policies import DEQMPCPolicy
    from deqmpc_gym.training import ImitationTrainer, TrainConfig

    out = Path(out_dir)
    n_steps = int(steps or DEMO_STEPS)
    ds = ExpertDataset.load(DEMO_DATASET, env_id=DEMO_ENV)
    card = load_expert(DEMO_ENV).card
    ref = (card["random_return"], card["mean_return"])
    print(f"dataset: {len(ds)} expert trajectories of {DEMO_ENV}; expert return {ref[1]:.1f}, random {ref[0]:.1f}")
    results: dict[str, Any] = {}
    for variant in DEMO_VARIANTS:
        torch.manual_seed(0)
        policy = DEQMPCPolicy.from_env(DEMO_ENV, variant, hidden=hidden, device=device)
        cfg = TrainConfig(steps=n_steps, batch_size=batch_size, val_every=100, val_batches=4, seed=0)
        t0 = time.perf_counter()
        res = ImitationTrainer(policy, ds, cfg, out / "train" / variant).train(resume=True)
        best = DEQMPCPolicy.load(out / "train" / variant / "best", device=device)
        ev = rollout_batched(best, DEMO_ENV, EvalConfig(episodes=episodes, stream_iters=1), reference=ref)
        results[variant] = {"normalized_score": ev.normalized_score, "mean_return": ev.mean_return,
                            "std_return": ev.std_return, "success_rate": ev.success_rate,
                            "best_val_loss": res.best_val_loss, "train_steps": res.steps,
                            "act_latency_ms": ev.act_latency_ms, "wall_time_s": time.perf_counter() - t0}
        print(f"{variant}: normalized score {ev.normalized_score:.3f}, success {ev.success_rate:.0%}")
    table = _table(results, episodes)
    print(table)
    atomic_write_text(out / "results.md", table + "\n")
    atomic_write_text(out / "results.json", json.dumps(results, indent=2))
    if video:
        paths = record_rollouts(DEMO_ENV, out / "videos", policy_path=out / "train" / "deq-mpc-deq" / "best",
                                episodes=1, seed=7, device=device)
        print("video:", ", ".join(str(p) for p in paths))
    return results


def _table(results: dict[str, Any], episodes: int) -> str:
    lines = [f"Pendulum swing-up, {episodes} rollouts x 200 steps (normalized return: expert = 1, random = 0)", "",
             "| variant | normalized return | success rate | mean return | act latency [ms] | train steps |",
             "|---|---|---|---|---|---|"]
    for v, r in results.items():
        lines.append(f"| {v} | {r['normalized_score']:.3f} | {r['success_rate']:.0%} | {r['mean_return']:.1f} "
                     f"± {r['std_return']:.1f} | {r['act_latency_ms']:.1f} | {r['train_steps']} |")
    return "\n".join(lines)
