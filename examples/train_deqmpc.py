"""Train a DEQ-MPC policy by imitation and evaluate it with normalized scores.

Loads an expert dataset (default: the Pendulum dataset shipped with the package), trains a fresh
``DEQMPCPolicy`` with ``ImitationTrainer`` (L1 loss on every DEQ-MPC iterate, streaming warm starts,
validation + best checkpoint every ``--val-every`` steps; ``--resume`` continues a killed run), then
evaluates the best checkpoint with ``rollout_batched`` on batched rollouts. The D4RL-normalized score uses
the expert card's reference returns (expert = 1, uniform-random policy = 0).

The defaults are a minutes-scale CPU run (like ``make demo``); the paper trains 20,000 steps with batch 200
and hidden 256 on Pendulum (``--steps 20000 --batch-size 200 --hidden 256``).

Run::

    python examples/train_deqmpc.py                                   # shipped Pendulum data, 1000 steps
    python examples/train_deqmpc.py --variant diff-mpc-nn             # a baseline variant
    python examples/train_deqmpc.py --dataset runs/expert/dataset.npz --expert runs/expert
    python examples/train_deqmpc.py --quick                           # tiny smoke run (used by the tests)

The trained policy lands in ``OUT/best`` (load with ``DEQMPCPolicy.load``; try it with
``examples/gym_loop.py --policy OUT/best`` or ``examples/record_video.py --policy OUT/best``).
"""

from __future__ import annotations

import argparse
import json
from importlib import resources
from pathlib import Path

import torch

import deqmpc_gym  # noqa: F401  (registers the DEQMPC/* ids)
from deqmpc_gym.data import ExpertDataset
from deqmpc_gym.evaluation import EvalConfig, rollout_batched
from deqmpc_gym.experts import load_expert
from deqmpc_gym.policies import DEQMPCPolicy, Variant
from deqmpc_gym.training import ImitationTrainer, TrainConfig

SHIPPED_DATASET = resources.files("deqmpc_gym") / "datasets" / "Pendulum-v0-300.npz"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default=str(SHIPPED_DATASET), help="ExpertDataset .npz (its env id is used)")
    p.add_argument("--expert", default=None,
                   help="expert directory for the reference returns (default: the shipped expert of the env)")
    p.add_argument("--out", default="runs/train_deqmpc", help="output directory")
    p.add_argument("--variant", default="deq-mpc-deq", choices=[v.value for v in Variant])
    p.add_argument("--hidden", type=int, default=64, help="network width (paper: 256 for Pendulum)")
    p.add_argument("--steps", type=int, default=1000, help="training steps (paper: 20,000)")
    p.add_argument("--batch-size", type=int, default=64, help="windows per step (paper: 200)")
    p.add_argument("--val-every", type=int, default=100)
    p.add_argument("--val-batches", type=int, default=4, help="fixed validation batches (paper: 100)")
    p.add_argument("--trajectories", type=int, default=None, help="use only the first N trajectories")
    p.add_argument("--episodes", type=int, default=50, help="evaluation rollouts (paper: 200)")
    p.add_argument("--max-steps", type=int, default=200, help="steps per evaluation rollout (paper: 200)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--quick", action="store_true", help="tiny budget: 3 steps, 4 rollouts of 10 steps")
    args = p.parse_args()
    if args.quick:
        args.hidden, args.steps, args.batch_size, args.val_every, args.val_batches = 32, 3, 8, 2, 1
        args.trajectories, args.episodes, args.max_steps = 20, 4, 10
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)

    # 1. data: an ExpertDataset of physical state trajectories (its env id selects the env)
    dataset = ExpertDataset.load(args.dataset)
    if args.trajectories:
        dataset = dataset.subset(args.trajectories)
    env_id = dataset.env_id
    print(f"dataset: {len(dataset)} trajectories of {env_id} (nx={dataset.nx}, nu={dataset.nu})")

    # 2. a fresh policy for that env
    policy = DEQMPCPolicy.from_env(env_id, variant=args.variant, hidden=args.hidden)
    print(f"policy: {policy.config.variant}, hidden={policy.config.hidden}, horizon={policy.config.horizon}, "
          f"{sum(p.numel() for p in policy.layer.parameters()):,} parameters")

    # 3. imitation training (writes OUT/best, OUT/final, OUT/checkpoint.pt, OUT/progress.csv, OUT/result.json)
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, val_every=args.val_every,
                         val_batches=args.val_batches, log_every=max(1, min(10, args.steps)), seed=args.seed)
    trainer = ImitationTrainer(policy, dataset, config, out, progress=not args.quick)
    result = trainer.train(resume=args.resume)
    print(f"trained {result.steps} steps in {result.wall_time_s:.1f} s: best val loss {result.best_val_loss:.4f} "
          f"at step {result.best_step} (final {result.final_val_loss:.4f})")
    for rec in result.history:
        print(f"  step {int(rec['step']):>6}: train loss {rec['train_loss']:.4f}, val loss {rec['val_loss']:.4f}")

    # 4. evaluate the best checkpoint on batched rollouts, normalized by the expert card
    best = DEQMPCPolicy.load(out / "best")
    card = load_expert(args.expert or env_id).card
    reference = (card["random_return"], card["mean_return"])
    ev_cfg = EvalConfig(episodes=args.episodes, max_steps=args.max_steps, seed=10_000, stream_iters=1)
    ev = rollout_batched(best, env_id, ev_cfg, reference=reference)
    note = "" if args.max_steps == 200 else " (card references are for 200-step episodes: score not comparable)"
    print(f"evaluation over {ev.episodes} rollouts x {ev.max_steps} steps: return {ev.mean_return:.1f} "
          f"+- {ev.std_return:.1f}, normalized score {ev.normalized_score:.3f}{note}")
    iters = "n/a" if ev.mean_solver_iters is None else f"{ev.mean_solver_iters:.2f}"
    print(f"  success rate {ev.success_rate:.0%}, cost rate {ev.cost_rate:.3f}, "
          f"solver iters/step {iters}, act latency {ev.act_latency_ms:.1f} ms per batched call")
    print(f"  expert card: return {card['mean_return']:.1f}, random {card['random_return']:.1f}")
    (out / "eval.json").write_text(json.dumps(ev.to_dict(), indent=2))
    print(f"wrote {out / 'eval.json'}; policy in {out / 'best'}")


if __name__ == "__main__":
    main()
