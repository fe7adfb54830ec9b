"""``deqmpc-gym`` command line: parses arguments and calls the library (no logic of its own).

Subcommands::

    deqmpc-gym expert train   --env ID [--steps N] [--seed S] [--out DIR] [--slices K]
    deqmpc-gym expert collect --env ID --out FILE [--num-trajectories N] [--seed S] [--expert DIR]
    deqmpc-gym train    --env ID --variant V --dataset FILE --out DIR [--steps N] [--hidden H] [--resume | --overwrite]
    deqmpc-gym evaluate (--policy DIR | --pretrained ID [--variant V]) [--episodes N] [--stream-iters K] [--json FILE]
    deqmpc-gym record   (--env ID [--policy DIR] | --pretrained ID [--variant V]) [--episodes N] --out DIR
    deqmpc-gym zoo list | zoo ship --from DIR --envs ID ... [--variants V ...] [--episodes N]
    deqmpc-gym reproduce table1 [--scale cpu|paper] [--seeds ...] [--envs ...] [--out DIR]
    deqmpc-gym demo     [--out DIR]

``train``, ``evaluate``, ``record``, ``reproduce`` and ``demo`` take ``--device`` (``cpu``, ``cuda``, ``cuda:N``,
``auto``). Output paths are checked before any work; errors print one line (exit code 2), Ctrl-C prints where it
stopped (exit code 130; ``train`` checkpoints the current step and names the command that resumes).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from typing import Any

from deqmpc_gym.errors import ConfigError


def _add_expert(sub: Any) -> None:
    p = sub.add_parser("expert", help="train PPO experts and collect datasets")
    esub = p.add_subparsers(dest="expert_cmd", required=True)
    t = esub.add_parser("train", help="train (or resume) a PPO expert")
    t.add_argument("--env", required=True)
    t.add_argument("--steps", type=int, default=None, help="total env steps (default: per-env budget)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--n-envs", type=int, default=None)
    t.add_argument("--goal-bonus", type=float, default=None,
                   help="training-only reward bonus near the goal (default: per-env; see ExpertConfig)")
    t.add_argument("--goal-bonus-width", type=float, default=None,
                   help="width of the goal bonus in success tolerances (default: per-env)")
    t.add_argument("--collision-penalty", type=float, default=None,
                   help="training-only reward penalty on a step that ends in a collision (default: per-env)")
    t.add_argument("--train-obstacle-radius", type=float, default=None,
                   help="training-only obstacle radius [m] for the obstacle variants, a safety margin "
                        "(default: per-env; evaluation uses the env's own 0.5 m)")
    t.add_argument("--no-teacher", action="store_true",
                   help="skip the MPC-teacher refinement after PPO (default on for the obstacle variants)")
    t.add_argument("--out", default=None, help="output dir (default: runs/experts/<env>)")
    t.add_argument("--slices", type=int, default=None, help="stop after this many checkpoint slices")
    t.add_argument("--no-resume", action="store_true")
    c = esub.add_parser("collect", help="roll out an expert and write a dataset (.npz)")
    c.add_argument("--env", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--num-trajectories", type=int, default=None)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--expert", default=None, help="expert dir (default: the shipped expert of --env)")


DEVICE_HELP = "torch device: cpu (default), cuda, cuda:N, or auto (cuda when available, else cpu)"


def _add_device(parser: Any) -> None:
    parser.add_argument("--device", default="cpu", help=DEVICE_HELP)


def _add_train(sub: Any) -> None:
    t = sub.add_parser("train", help="imitation-train a DEQ-MPC policy on a dataset")
    t.add_argument("--env", required=True)
    t.add_argument("--variant", default="deq-mpc-deq")
    t.add_argument("--dataset", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--steps", type=int, default=20000)
    t.add_argument("--hidden", type=int, default=128)
    t.add_argument("--batch-size", type=int, default=200)
    t.add_argument("--val-every", type=int, default=100)
    t.add_argument("--val-batches", type=int, default=100)
    t.add_argument("--seed", type=int, default=0)
    mode = t.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="continue the run in --out from its checkpoint (same variant, configs and dataset; "
                           "--steps may grow)")
    mode.add_argument("--overwrite", action="store_true",
                      help="delete the run in --out (checkpoint, best/, final/, progress.csv, result.json) and "
                           "start over")
    _add_device(t)
    e = sub.add_parser("evaluate", help="evaluate a saved or shipped policy (normalized score vs the expert card)")
    which = e.add_mutually_exclusive_group(required=True)
    which.add_argument("--policy", help="a directory written by DEQMPCPolicy.save (or deqmpc-gym train)")
    which.add_argument("--pretrained", metavar="ENV_ID", help="the shipped controller of this env (see `zoo list`)")
    e.add_argument("--variant", default="deq-mpc-deq", help="variant of the --pretrained controller")
    e.add_argument("--episodes", type=int, default=200)
    e.add_argument("--steps", type=int, default=200)
    e.add_argument("--stream-iters", type=int, default=None)
    e.add_argument("--seed", type=int, default=10_000)
    e.add_argument("--json", default=None)
    _add_device(e)


def _add_misc(sub: Any) -> None:
    r = sub.add_parser("record", help="record rollout videos (DEQ-MPC policy or the shipped PPO expert)")
    r.add_argument("--env", default=None, help="env id (default: the --pretrained env)")
    rwhich = r.add_mutually_exclusive_group()
    rwhich.add_argument("--policy", default=None, help="a saved policy directory (default: the env's PPO expert)")
    rwhich.add_argument("--pretrained", metavar="ENV_ID", default=None, help="record the shipped controller of ENV_ID")
    r.add_argument("--variant", default="deq-mpc-deq", help="variant of the --pretrained controller")
    r.add_argument("--episodes", type=int, default=1)
    r.add_argument("--out", required=True)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--no-overlay", action="store_true")
    r.add_argument("--max-steps", type=int, default=None, help="steps per episode (default: the env's limit)")
    _add_device(r)
    rep = sub.add_parser("reproduce", help="reproduce the paper's experiments")
    rep.add_argument("what", choices=["table1", "warmstart"])
    rep.add_argument("--scale", choices=["cpu", "paper", "tiny"], default="cpu")
    rep.add_argument("--seeds", type=int, nargs="+", default=None)
    rep.add_argument("--envs", nargs="+", default=None)
    rep.add_argument("--variants", nargs="+", default=None)
    rep.add_argument("--out", default="results")
    _add_device(rep)
    z = sub.add_parser("zoo", help="list the shipped controllers, or package trained Table 1 runs as controllers")
    zsub = z.add_subparsers(dest="zoo_cmd", required=True)
    zsub.add_parser("list", help="the shipped controllers with their scores")
    zs = zsub.add_parser("ship", help="evaluate every trained seed of Table 1 cells and ship the best with a card")
    zs.add_argument("--from", dest="table_dir", required=True, help="a `reproduce table1` output, e.g. "
                    "results/table1-cpu")
    zs.add_argument("--envs", nargs="+", required=True)
    zs.add_argument("--variants", nargs="+", default=None, help="default: the four Table 1 variants")
    zs.add_argument("--episodes", type=int, default=200, help="evaluation episodes (seeds 10000, 10001, ...)")
    zs.add_argument("--out", default=None, help="zoo root (default: the package's pretrained_policies/)")
    zs.add_argument("--trained-commit", default=None, help="commit of the training code, for records without one")
    d = sub.add_parser("demo", help="train a small DEQ-MPC policy on the shipped dataset, evaluate, make a video")
    d.add_argument("--out", default="results/demo")
    d.add_argument("--steps", type=int, default=None)
    _add_device(d)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deqmpc-gym", description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the small networks and batched solver run best on one "
                             "thread, and several threads on shared cores slow everything down by 10x or more)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    _add_expert(sub)
    _add_train(sub)
    _add_misc(sub)
    return parser


def _expert(args: argparse.Namespace) -> int:
    from deqmpc_gym.experts import default_expert_config, train_expert
    from deqmpc_gym.io import check_writable

    if args.expert_cmd == "collect":
        return _expert_collect(args)
    overrides: dict[str, Any] = {"seed": args.seed}
    if args.steps:
        overrides["total_steps"] = args.steps
    if args.n_envs:
        overrides["n_envs"] = args.n_envs
    for key in ("goal_bonus", "goal_bonus_width", "collision_penalty", "train_obstacle_radius"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    if args.no_teacher:
        overrides["teacher"] = None
    cfg = default_expert_config(args.env, **overrides)
    out = check_writable(args.out or f"runs/experts/{args.env.split('/')[-1]}", kind="dir")
    card = train_expert(cfg, out, resume=not args.no_resume, max_slices=args.slices)
    if card is None:
        print(f"expert training paused at a checkpoint in {out}; run the same command again to continue")
        return 0
    if "ppo_only" in card:
        print(f"PPO alone: success {card['ppo_only']['success_rate']:.2%}, collisions "
              f"{card['ppo_only']['collision_rate']:.2%}; MPC-teacher round kept: {card['teacher']['kept_round']}")
    print(f"expert {args.env}: success {card['success_rate']:.2%}, collisions {card['collision_rate']:.2%}, "
          f"mean return {card['mean_return']:.1f} "
          f"(random {card['random_return']:.1f}), {card['train_steps']} steps in {card['wall_time_s']:.0f} s "
          f"-> {out}")
    return 0


def _expert_collect(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from deqmpc_gym.experts import collect_dataset, load_expert
    from deqmpc_gym.io import check_writable

    check_writable(args.out, kind="file")
    expert = load_expert(args.expert or args.env, env_id=args.env)
    bars: list[Any] = []  # created at the first progress report: argument errors print no bar

    def tick(done: int) -> None:
        if not bars:
            bars.append(tqdm(total=args.num_trajectories, desc="collect"))
        bars[0].update(done - bars[0].n)

    try:
        ds = collect_dataset(expert, args.env, args.num_trajectories, seed=args.seed,
                             expert_id=str(args.expert or args.env), progress=tick)
    finally:
        for bar in bars:
            bar.close()
    ds.save(args.out)
    lengths = [len(t) for t in ds.trajectories]
    print(f"collected {len(ds)} trajectories ({sum(lengths)} steps, mean length {sum(lengths) / len(ds):.1f}) "
          f"-> {args.out}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from deqmpc_gym._device import resolve_device
    from deqmpc_gym.data import ExpertDataset
    from deqmpc_gym.io import check_writable
    from deqmpc_gym.policies import DEQMPCPolicy
    from deqmpc_gym.training import ImitationTrainer, TrainConfig

    device = resolve_device(args.device)
    check_writable(args.out, kind="dir")
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, val_every=args.val_every,
                      val_batches=args.val_batches, seed=args.seed)
    ds = ExpertDataset.load(args.dataset, env_id=args.env)
    policy = DEQMPCPolicy.from_env(args.env, args.variant, hidden=args.hidden, device=device)
    trainer = ImitationTrainer(policy, ds, cfg, args.out, log_formats=("stdout", "csv"))
    res = trainer.train(resume=args.resume, overwrite=args.overwrite)
    print(f"trained {args.variant} on {args.env}: best val loss {res.best_val_loss:.4f} at step {res.best_step} "
          f"({res.wall_time_s:.0f} s) -> {args.out}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from deqmpc_gym.evaluation import EvalConfig, rollout_batched
    from deqmpc_gym.experts import load_expert
    from deqmpc_gym.io import atomic_write_text, check_writable
    from deqmpc_gym.policies import DEQMPCPolicy

    if args.json:
        check_writable(args.json, kind="file")
    eval_cfg = EvalConfig(args.episodes, args.steps, args.seed, args.stream_iters)
    if args.pretrained is not None:
        policy = DEQMPCPolicy.from_pretrained(args.pretrained, args.variant, device=args.device)
    else:
        policy = DEQMPCPolicy.load(args.policy, device=args.device)
    env_id = policy.env_id
    if env_id is None:
        raise ConfigError("the policy names no env id (built from a System, not an env); evaluate it in Python with "
                          "deqmpc_gym.evaluation.rollout_batched")
    card = load_expert(env_id, env_id=env_id).card
    res = rollout_batched(policy, env_id, eval_cfg, reference=(card["random_return"], card["mean_return"]))
    print(f"{policy.env_id} {policy.config.variant}: normalized score {res.normalized_score:.3f}, "
          f"return {res.mean_return:.1f} ± {res.std_return:.1f}, success {res.success_rate:.2%}, "
          f"collisions {res.collision_rate:.2%}, act latency {res.act_latency_ms:.1f} ms")
    if args.json:
        atomic_write_text(args.json, json.dumps(res.to_dict(), indent=2))
    return 0


def _record(args: argparse.Namespace) -> int:
    from deqmpc_gym._device import resolve_device
    from deqmpc_gym.experiments.record import record_rollouts
    from deqmpc_gym.io import check_writable

    device = resolve_device(args.device)
    env_id, policy_path = args.env, args.policy
    if args.pretrained is not None:
        from deqmpc_gym.policies.pretrained import pretrained_dir

        if env_id is not None and env_id != args.pretrained:
            raise ConfigError(f"--env {env_id} and --pretrained {args.pretrained} name different envs; give one")
        env_id, policy_path = args.pretrained, pretrained_dir(args.pretrained, args.variant)
    if env_id is None:
        raise ConfigError("record needs --env ENV_ID (or --pretrained ENV_ID)")
    check_writable(args.out, kind="dir")
    paths = record_rollouts(env_id, args.out, policy_path=policy_path, episodes=args.episodes, seed=args.seed,
                            overlay=not args.no_overlay, max_steps=args.max_steps, device=device)
    for p in paths:
        print(p)
    return 0


def _reproduce(args: argparse.Namespace) -> int:
    from deqmpc_gym._device import resolve_device
    from deqmpc_gym.experiments.reproduce import check_selection, reproduce
    from deqmpc_gym.io import check_writable

    check_selection(args.envs, args.variants, args.seeds)
    device = resolve_device(args.device)
    check_writable(args.out, kind="dir")
    out = reproduce(args.what, scale=args.scale, seeds=args.seeds, envs=args.envs, variants=args.variants,
                    out_dir=args.out, device=device)
    print(f"results written to {out}")
    return 0


def _zoo(args: argparse.Namespace) -> int:
    from deqmpc_gym.policies import pretrained

    if args.zoo_cmd == "list":
        items = pretrained.available()
        if not items:
            print("no pretrained controller ships with this installation")
        for env_id, variant in items:
            ev = pretrained.card(env_id, variant)["evaluation"]
            print(f"{env_id:24s} {variant:13s} normalized score {ev['normalized_score']:.3f} "
                  f"(success {ev['success_rate']:.0%}, {ev['episodes']} episodes)")
        return 0
    from deqmpc_gym.experiments.reproduce import check_selection
    from deqmpc_gym.experiments.zoo import ShipConfig, ship

    envs, variants = check_selection(args.envs, args.variants, None)
    if args.episodes < 1:
        raise ConfigError(f"--episodes must be >= 1, got {args.episodes}")
    ship(args.table_dir, envs, variants, config=ShipConfig(episodes=args.episodes), out_root=args.out,
         trained_commit=args.trained_commit)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from deqmpc_gym._device import resolve_device
    from deqmpc_gym.experiments.demo import run_demo
    from deqmpc_gym.io import check_writable

    device = resolve_device(args.device)
    check_writable(args.out, kind="dir")
    run_demo(args.out, steps=args.steps, device=device)
    return 0


COMMANDS = {"expert": _expert, "train": _train, "evaluate": _evaluate, "record": _record, "reproduce": _reproduce,
            "zoo": _zoo, "demo": _demo}


def resume_command(argv: Sequence[str]) -> str:
    """The ``deqmpc-gym`` command line that resumes the ``train`` run of ``argv`` (``--resume``, no
    ``--overwrite``)."""
    args = [a for a in argv if a != "--overwrite"]
    if "--resume" not in args:
        args.append("--resume")
    return "deqmpc-gym " + shlex.join(args)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``deqmpc-gym`` console script; returns the exit code.

    Library errors (:class:`~deqmpc_gym.errors.DeqmpcError`) print one line to stderr and return 2; Ctrl-C
    returns 130 (``train`` first checkpoints the current step and prints the command that resumes it).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    import torch

    from deqmpc_gym.errors import DeqmpcError, TrainingInterrupted

    torch.set_num_threads(max(1, args.threads))

    try:
        return COMMANDS[args.cmd](args)
    except DeqmpcError as exc:
        print(f"deqmpc-gym: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except TrainingInterrupted as exc:
        print(f"deqmpc-gym: training stopped at step {exc.step} of {exc.total} (checkpoint in {exc.out_dir}); "
              f"resume with: {resume_command(argv)}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"deqmpc-gym: {args.cmd} interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
