"""SB3 ``EvalCallback`` inside a DEQ-MPC imitation-training loop.

``EvalCallback`` normally runs inside ``model.learn()`` of an SB3 algorithm. DEQ-MPC is trained by
imitation instead (``ImitationTrainer``), so ``attach_eval_callback`` wraps the policy in a small shim that
provides what ``EvalCallback`` uses (``predict``, ``get_env``, ``num_timesteps``, ``logger``, ``save``).
A trainer callback -- run after every validation -- sets ``shim.num_timesteps = step`` and calls
``callback.on_step()``: SB3 then rolls the policy out on its vectorized eval env, logs
``eval/mean_reward`` and saves the best policy (a ``DEQMPCPolicy.save`` directory) to
``OUT/best_model``. The trainer itself keeps the best policy *by validation loss* in ``OUT/train/best``.

Training data: the Pendulum dataset shipped with the package (300 PPO-expert trajectories).

Run::

    python examples/eval_callback.py                # 500 steps, evaluation every 100 (minutes on a CPU)
    python examples/eval_callback.py --quick        # tiny smoke run (used by the tests)
"""

from __future__ import annotations

import argparse
import time
from importlib import resources
from pathlib import Path

import torch
from stable_baselines3.common.callbacks import EvalCallback
from stable_baselines3.common.env_util import make_vec_env

import deqmpc_gym  # noqa: F401  (registers the DEQMPC/* ids)
from deqmpc_gym.data import ExpertDataset
from deqmpc_gym.policies import DEQMPCPolicy, attach_eval_callback
from deqmpc_gym.training import ImitationTrainer, TrainConfig

ENV_ID = "DEQMPC/Pendulum-v0"
SHIPPED_DATASET = resources.files("deqmpc_gym") / "datasets" / "Pendulum-v0-300.npz"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default=str(SHIPPED_DATASET), help="ExpertDataset .npz of DEQMPC/Pendulum-v0")
    p.add_argument("--out", default="runs/eval_callback", help="output directory")
    p.add_argument("--steps", type=int, default=500, help="training steps (paper: 20,000)")
    p.add_argument("--batch-size", type=int, default=64, help="windows per step (paper: 200)")
    p.add_argument("--hidden", type=int, default=64, help="network width (paper: 256 for Pendulum)")
    p.add_argument("--eval-every", type=int, default=100, help="validate + run EvalCallback every N steps")
    p.add_argument("--eval-episodes", type=int, default=4)
    p.add_argument("--eval-max-steps", type=int, default=200, help="episode length of the eval env")
    p.add_argument("--trajectories", type=int, default=None, help="use only the first N trajectories")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--quick", action="store_true", help="tiny budget: 2 steps, 2 short eval episodes")
    args = p.parse_args()
    if args.quick:
        args.steps, args.batch_size, args.hidden, args.eval_every = 2, 8, 32, 1
        args.eval_episodes, args.eval_max_steps, args.trajectories = 2, 10, 20
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)

    # 1. data and a fresh policy
    dataset = ExpertDataset.load(args.dataset, env_id=ENV_ID)
    if args.trajectories:
        dataset = dataset.subset(args.trajectories)
    policy = DEQMPCPolicy.from_env(ENV_ID, variant="deq-mpc-deq", hidden=args.hidden)
    print(f"{len(dataset)} trajectories of {dataset.env_id}; policy {policy.config.variant}, "
          f"hidden={policy.config.hidden}")

    # 2. SB3's EvalCallback on a vectorized eval env, attached to the policy through a shim.
    #    eval_freq=1: the callback evaluates on *every* on_step() call; we decide when to call it.
    eval_env = make_vec_env(ENV_ID, n_envs=2, seed=args.seed + 1000,
                            env_kwargs={"max_episode_steps": args.eval_max_steps})
    callback = EvalCallback(eval_env, n_eval_episodes=args.eval_episodes, eval_freq=1, deterministic=True,
                            best_model_save_path=str(out), log_path=str(out / "eval"),
                            verbose=1)
    shim = attach_eval_callback(callback, policy)

    # 3. the trainer callback: run after every validation (every `val_every` steps)
    def run_eval_callback(trainer: ImitationTrainer, step: int, record: dict) -> None:
        shim.num_timesteps = step
        t0 = time.perf_counter()
        callback.on_step()
        print(f"step {step}: val loss {record['val_loss']:.4f}, eval reward {callback.last_mean_reward:.2f} "
              f"(best {callback.best_mean_reward:.2f}, eval {time.perf_counter() - t0:.1f} s)")

    # 4. train
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, val_every=args.eval_every,
                         val_batches=2 if args.quick else 20, log_every=max(1, min(10, args.steps)),
                         seed=args.seed)
    trainer = ImitationTrainer(policy, dataset, config, out / "train", callbacks=(run_eval_callback,),
                               progress=not args.quick)
    result = trainer.train()
    eval_env.close()

    # 5. what EvalCallback left behind
    print(f"trained {result.steps} steps in {result.wall_time_s:.1f} s; best val loss {result.best_val_loss:.4f} "
          f"at step {result.best_step}")
    print(f"EvalCallback: best mean reward {callback.best_mean_reward:.2f}; "
          f"evaluations at timesteps {list(callback.evaluations_timesteps)}")
    best = out / "best_model"
    if (best / "policy.pt").exists():
        reloaded = DEQMPCPolicy.load(best)
        print(f"best policy by eval reward saved at {best} ({reloaded.config.variant}, env {reloaded.env_id})")


if __name__ == "__main__":
    main()
