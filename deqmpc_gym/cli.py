"""``deqmpc-gym`` command line: parses arguments and calls the library (no logic of its own).

Subcommands::

    deqmpc-gym expert train   --env ID [--steps N] [--seed S | --seeds S ...] [--out DIR] [--slices K]
                              [--launcher local|ray] [--address ADDR] [--cpus-per-run C]
    deqmpc-gym expert collect --env ID --out FILE [--num-trajectories N] [--seed S] [--expert DIR] [--kind K]
    deqmpc-gym expert filter  --env ID --out DIR [--expert DIR] [--tune | --horizon H --margin M --trigger T ...]
    deqmpc-gym train    --env ID --variant V --dataset FILE --out DIR [--steps N] [--hidden H] [--resume | --overwrite]
                        [--time-limit DURATION]
    deqmpc-gym evaluate (--policy DIR | --pretrained ID [--variant V]) [--episodes N] [--stream-iters K] [--json FILE]
    deqmpc-gym record   (--env ID [--policy DIR] | --pretrained ID [--variant V]) [--episodes N] --out DIR
    deqmpc-gym zoo list | zoo ship --from DIR --envs ID ... [--variants V ...] [--episodes N] | zoo refresh [--envs ...]
    deqmpc-gym reproduce table1|warmstart [--scale cpu|paper|paper64|zoo|tiny] [--seeds ...] [--envs ...] [--out DIR]
                        [--launcher local|ray] [--address ADDR] [--cpus-per-run C] [--gpus-per-run G]
                        [--time-limit DURATION]
    deqmpc-gym reproduce dagger [--scale ...] [--seeds ...] [--envs ...] [--variants ...] [--out DIR]
    deqmpc-gym reproduce warmstart --pretrained [--envs ...] [--episodes N] [--out DIR]
    deqmpc-gym reproduce sweep [--envs ID] [--variants V] [--hidden H ...] [--trajectories N ...] [--steps N]
    deqmpc-gym demo     [--out DIR]
    deqmpc-gym --version

``python -m deqmpc_gym`` is the same command; without a command (or ``expert`` / ``zoo`` without theirs) it prints
the help. ``deqmpc-gym COMMAND --help`` lists every option with its default (taken from the library's configs).
``train``, ``evaluate``, ``record``, ``reproduce`` and ``demo`` take ``--device`` (``cpu``, ``cuda``, ``cuda:N``,
``auto``). Output paths are checked before any work; errors print one line (exit code 2). A training stopped before
its budget checkpoints the current step, prints where it stopped and the command that resumes it: Ctrl-C (exit code
130), SIGTERM (143) or ``--time-limit`` of ``train``, ``dagger`` and ``reproduce`` (75).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import logging
import shlex
import sys
from collections.abc import Sequence
from typing import Any

from deqmpc_gym.errors import ConfigError


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends ``(default: X)`` to the help of options that default to a value (not to flags, to None or to a
    default the help text already names)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (action.option_strings and default is not None and not isinstance(default, bool)
                and default != argparse.SUPPRESS and "default" not in text):
            text += " (default: %(default)s)"
        return text


def _default(owner: Any, name: str) -> Any:
    """The library's default of ``name``: a field of the dataclass ``owner`` or a keyword parameter of the callable
    ``owner`` (so that the command line and the library cannot drift apart)."""
    if dataclasses.is_dataclass(owner):
        field = {f.name: f for f in dataclasses.fields(owner)}[name]
        if field.default is dataclasses.MISSING:
            raise TypeError(f"{owner!r}.{name} has no plain default")
        return field.default
    default = inspect.signature(owner).parameters[name].default
    if default is inspect.Parameter.empty:
        raise TypeError(f"{owner.__qualname__}() has no default for {name!r}")
    return default


def _add_launcher(parser: argparse.ArgumentParser, unit: str, note: str = "") -> None:
    """``--launcher``, ``--address`` and ``--cpus-per-run`` of a command whose jobs are ``unit``s (runs, seeds)."""
    parser.add_argument("--launcher", choices=["local", "ray"], default="local",
                        help=f"local: the {unit}s one after another in this process; ray: each {unit} a Ray task "
                             f"(pip install 'deqmpc_gym[cluster]'){note}")
    parser.add_argument("--address", default=None,
                        help="with --launcher ray: the cluster to join (e.g. auto, HOST:6379, ray://HOST:10001); "
                             "default: start a local Ray instance")
    parser.add_argument("--cpus-per-run", type=int, default=1,
                        help=f"with --launcher ray: CPUs (threads) per {unit}")


def _duration(text: str) -> float:
    """argparse type of ``--time-limit``: seconds of ``90m``, ``2.5h``, ``1h30m``, ``45s`` or ``3600``."""
    from deqmpc_gym.experiments.launch import parse_duration

    try:
        return parse_duration(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _deadline(args: argparse.Namespace) -> float | None:
    """The ``time.time()`` instant ``--time-limit`` from now (None without it)."""
    from deqmpc_gym.experiments.launch import deadline_in

    return None if args.time_limit is None else deadline_in(args.time_limit)


def _add_time_limit(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--time-limit", type=_duration, default=None, metavar="DURATION",
                        help=f"wall time of this call (e.g. 90m, 2.5h, 1h30m): {what} stop(s) at a checkpoint at the "
                             "first step boundary after it and the command exits with code 75; the same command "
                             "resumes. SIGTERM also stops at a checkpoint (exit code 143)")


def _parser(sub: Any, name: str, help: str) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help, description=help, formatter_class=_HelpFormatter)
    return parser


def _short_names(env_ids: Sequence[str]) -> str:
    return ", ".join(e.split("/")[-1].removesuffix("-v0") for e in env_ids)


def _env_help() -> str:
    from deqmpc_gym.envs.registration import ENV_IDS

    return f"env id, e.g. {ENV_IDS[0]} (built in: DEQMPC/<Env>-v0 with <Env> one of {_short_names(ENV_IDS)})"


def _variant_help(what: str) -> str:
    from deqmpc_gym.policies.config import Variant

    return f"{what}: one of {', '.join(v.value for v in Variant)}"


def _add_expert(sub: Any) -> None:
    # defaults are read from the defining modules (tests replace the package attributes the commands call)
    from deqmpc_gym.experts.collect import DEFAULT_NUM_TRAJECTORIES, collect_dataset
    from deqmpc_gym.experts.config import ExpertConfig
    from deqmpc_gym.experts.export import export_filtered
    from deqmpc_gym.experts.filtered import FilterConfig
    from deqmpc_gym.experts.loader import DATASET_EXPERT_KIND, EXPERT_KINDS

    p = _parser(sub, "expert", "train PPO experts, measure safety-filtered experts and collect datasets")
    p.set_defaults(print_help=p.print_help)
    esub = p.add_subparsers(dest="expert_cmd", metavar="{train,collect,filter}")
    t = _parser(esub, "train", "train (or resume) a PPO expert")
    t.add_argument("--env", required=True, help=_env_help())
    t.add_argument("--steps", type=int, default=None,
                   help="total env steps of PPO (default: the per-env budget, see EXPERT_DEFAULTS)")
    seed = t.add_mutually_exclusive_group()
    seed.add_argument("--seed", type=int, default=_default(ExpertConfig, "seed"), help="seed of PPO and its envs")
    seed.add_argument("--seeds", type=int, nargs="+", default=None, metavar="S",
                      help="train one expert per seed, each into OUT/s<S>/, with their records in OUT/seeds.json")
    t.add_argument("--n-envs", type=int, default=None,
                   help=f"envs per PPO rollout (default: per-env; ExpertConfig: {_default(ExpertConfig, 'n_envs')})")
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
    t.add_argument("--out", default=None, help="output dir (default: runs/experts/<Env>-v0)")
    t.add_argument("--slices", type=int, default=None,
                   help="stop after this many checkpoint slices (default: train to the end)")
    t.add_argument("--no-resume", action="store_true",
                   help="start over instead of continuing from the checkpoint in --out")
    _add_launcher(t, "seed", "; with ray, a single --seed also trains into OUT/s<S>/")
    c = _parser(esub, "collect", "roll out an expert and write a dataset (.npz)")
    c.add_argument("--env", required=True, help=_env_help())
    c.add_argument("--out", required=True, help="dataset file to write (.npz)")
    sizes = ", ".join(f"{_short_names([e])} {n}" for e, n in DEFAULT_NUM_TRAJECTORIES.items())
    c.add_argument("--num-trajectories", type=int, default=None,
                   help=f"episodes to roll out (default: the paper's dataset size: {sizes})")
    c.add_argument("--seed", type=int, default=_default(collect_dataset, "seed"),
                   help="episode i starts from the env seeded with SEED + i")
    c.add_argument("--expert", default=None, help="expert dir (default: the shipped expert of --env, see --kind)")
    filtered = ", ".join(_short_names([e]) for e in DATASET_EXPERT_KIND)
    c.add_argument("--kind", default=None, choices=EXPERT_KINDS,
                   help=f"which shipped expert of --env collects (default: filtered on {filtered}, the PPO actor with "
                        "the MPC safety filter; ppo elsewhere); with --expert: the kind that directory must hold")
    f = _parser(esub, "filter", "measure the PPO expert with the MPC safety filter and write its card.json")
    f.add_argument("--env", required=True, help=_env_help() + " (an obstacle variant)")
    f.add_argument("--out", required=True, help="output dir of the filtered expert's card.json")
    f.add_argument("--expert", default=None, help="the PPO expert's dir (default: the shipped PPO expert of --env)")
    f.add_argument("--tune", action="store_true",
                   help="choose the filter settings on the validation episodes (experts.export.FILTER_CANDIDATES) "
                        "instead of taking them from the options below")
    for name, kind in (("horizon", int), ("margin", float), ("trigger", float), ("rho_init", float), ("iters", int)):
        f.add_argument(f"--{name.replace('_', '-')}", type=kind, default=_default(FilterConfig, name),
                       help=f"FilterConfig.{name}")
    f.add_argument("--episodes", type=int, default=_default(export_filtered, "episodes"),
                   help="episodes of the validation and confirmation runs (the card's: always its 200)")
    f.add_argument("--validation-seed", type=int, default=_default(export_filtered, "validation_seed"),
                   help="first env seed of the validation episodes (tuning)")
    f.add_argument("--confirmation-seed", type=int, default=_default(export_filtered, "confirmation_seed"),
                   help="first env seed of the confirmation episodes")


DEVICE_HELP = "torch device: cpu (default), cuda, cuda:N, or auto (cuda when available, else cpu)"


def _add_device(parser: Any) -> None:
    parser.add_argument("--device", default="cpu", help=DEVICE_HELP)


def _add_train(sub: Any) -> None:
    from deqmpc_gym.evaluation import EvalConfig
    from deqmpc_gym.policies import DEQMPCPolicy, NetworkConfig, PolicyConfig
    from deqmpc_gym.training import TrainConfig

    t = _parser(sub, "train", "imitation-train a DEQ-MPC policy on a dataset")
    t.add_argument("--env", required=True, help=_env_help())
    t.add_argument("--variant", default=_default(PolicyConfig, "variant"), metavar="VARIANT",
                   help=_variant_help("policy variant"))
    t.add_argument("--dataset", required=True, help="expert dataset (.npz) of --env, e.g. from `expert collect`")
    t.add_argument("--out", required=True,
                   help="run folder (checkpoint.pt, best/, final/, progress.csv, result.json)")
    t.add_argument("--steps", type=int, default=_default(TrainConfig, "steps"), help="optimisation steps")
    t.add_argument("--hidden", type=int, default=_default(NetworkConfig, "hidden"),
                   help="network width, divisible by 4")
    t.add_argument("--batch-size", type=int, default=_default(TrainConfig, "batch_size"), help="windows per step")
    t.add_argument("--lr", type=float, default=_default(TrainConfig, "lr"), help="Adam learning rate")
    t.add_argument("--val-every", type=int, default=_default(TrainConfig, "val_every"),
                   help="validate (and checkpoint) every this many steps")
    t.add_argument("--val-batches", type=int, default=_default(TrainConfig, "val_batches"),
                   help="number of fixed validation batches")
    t.add_argument("--seed", type=int, default=_default(TrainConfig, "seed"),
                   help="seeds the data split, the window sampler and the validation batches")
    t.add_argument("--state-noise", type=float, default=_default(TrainConfig, "state_noise"),
                   help="Gaussian noise on the policy's input states during training, as a fraction of each "
                        "coordinate's standard deviation over the data (0: off, the paper's protocol)")
    t.add_argument("--init", metavar="DIR", default=None,
                   help="start from the weights of a saved policy (e.g. runs/x/best) of the same env, variant "
                        "and hidden size instead of a random initialisation (fine-tuning)")
    mode = t.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="continue the run in --out from its checkpoint (same variant, configs and dataset; "
                           "--steps may grow)")
    mode.add_argument("--overwrite", action="store_true",
                      help="delete the run in --out (checkpoint, best/, final/, progress.csv, result.json) and "
                           "start over")
    _add_time_limit(t, "training")
    _add_device(t)
    from deqmpc_gym.experiments.dagger import DaggerConfig

    dg = _parser(sub, "dagger", "continue training a saved policy on the states it visits, labelled by the env's "
                                "dataset expert (DAgger; beyond the paper's protocol)")
    dg.add_argument("--policy", required=True, help="a directory written by DEQMPCPolicy.save, e.g. RUN/best")
    dg.add_argument("--env", required=True, help=_env_help())
    dg.add_argument("--dataset", required=True, help="the expert dataset (.npz) the policy was trained on")
    dg.add_argument("--out", required=True,
                    help="folder: round_<r>/ (resumable training runs), dagger.json, best/ (the returned policy) "
                         "and data.npz (the aggregated dataset)")
    for name, help_ in (("rounds", "DAgger rounds"), ("episodes", "policy rollouts per round"),
                        ("states_per_episode", "visited states labelled per rollout"),
                        ("label_steps", "steps of the expert trajectory from each labelled state"),
                        ("train_steps", "training steps per round on the aggregated dataset"),
                        ("select_episodes", "closed-loop validation episodes per round (seeds 30000+); the "
                                            "best-scoring round is returned (0: the last round)"),
                        ("seed", "seeds the rollouts and the choice of states"),
                        ("patience", "with --select-episodes: stop after this many rounds in a row without a better "
                                     "validation score (0: run all rounds)")):
        dg.add_argument(f"--{name.replace('_', '-')}", dest=name, type=int, default=_default(DaggerConfig, name),
                        help=help_)
    dg.add_argument("--plateau-lr-factor", type=float, default=_default(DaggerConfig, "plateau_lr_factor"),
                    help="with --select-episodes, < 1: after a round without a better validation score, the next "
                         "round starts from the best policy at the rate times this factor (1: off)")
    dg.add_argument("--min-lr", type=float, default=_default(DaggerConfig, "min_lr"),
                    help="with --plateau-lr-factor < 1: the rate never drops below this (0: no floor)")
    dg.add_argument("--batch-size", type=int, default=_default(TrainConfig, "batch_size"), help="windows per step")
    dg.add_argument("--lr", type=float, default=_default(TrainConfig, "lr"),
                    help="Adam learning rate of each round (each round starts a fresh optimizer)")
    _add_time_limit(dg, "the round training")
    _add_device(dg)
    e = _parser(sub, "evaluate", "evaluate a saved or shipped policy (normalized score vs the env's dataset expert)")
    which = e.add_mutually_exclusive_group(required=True)
    which.add_argument("--policy", help="a directory written by DEQMPCPolicy.save (or deqmpc-gym train)")
    which.add_argument("--pretrained", metavar="ENV_ID", help="the shipped controller of this env (see `zoo list`)")
    e.add_argument("--variant", default=_default(DEQMPCPolicy.from_pretrained, "variant"), metavar="VARIANT",
                   help=_variant_help("variant of the --pretrained controller"))
    e.add_argument("--episodes", type=int, default=_default(EvalConfig, "episodes"),
                   help="rollouts, simulated as one batch")
    e.add_argument("--steps", type=int, default=_default(EvalConfig, "max_steps"), help="steps per rollout")
    e.add_argument("--stream-iters", type=int, default=_default(EvalConfig, "stream_iters"),
                   help="DEQ-MPC iterations per warm-started step (default: the policy's own stream_iters)")
    e.add_argument("--seed", type=int, default=_default(EvalConfig, "seed"),
                   help="episode i starts from the env seeded with SEED + i")
    e.add_argument("--json", default=None, metavar="FILE", help="also write the metrics to this JSON file")
    _add_device(e)


def _add_misc(sub: Any) -> None:
    from deqmpc_gym.experiments.demo import DEMO_STEPS, run_demo
    from deqmpc_gym.experiments.record import record_rollouts
    from deqmpc_gym.experiments.reproduce import SCALES, TABLE1_ENVS, TABLE1_VARIANTS, reproduce
    from deqmpc_gym.experiments.sweep import SweepConfig
    from deqmpc_gym.experiments.zoo import ShipConfig
    from deqmpc_gym.policies import DEQMPCPolicy

    r = _parser(sub, "record", "record rollout videos (DEQ-MPC policy or the shipped PPO expert)")
    r.add_argument("--env", default=None, help=_env_help() + "; default: the --pretrained env")
    rwhich = r.add_mutually_exclusive_group()
    rwhich.add_argument("--policy", default=None, help="a saved policy directory (default: the env's PPO expert)")
    rwhich.add_argument("--pretrained", metavar="ENV_ID", default=None, help="record the shipped controller of ENV_ID")
    r.add_argument("--variant", default=_default(DEQMPCPolicy.from_pretrained, "variant"), metavar="VARIANT",
                   help=_variant_help("variant of the --pretrained controller"))
    r.add_argument("--episodes", type=int, default=_default(record_rollouts, "episodes"),
                   help="videos to record, one per episode")
    r.add_argument("--out", required=True, help="folder for the videos")
    r.add_argument("--seed", type=int, default=_default(record_rollouts, "seed"),
                   help="episode i starts from the env seeded with SEED + i")
    r.add_argument("--no-overlay", action="store_true", help="do not draw the policy's plan and the goal")
    r.add_argument("--max-steps", type=int, default=None, help="steps per episode (default: the env's limit)")
    _add_device(r)
    rep = _parser(sub, "reproduce", "reproduce the paper's experiments")
    rep.add_argument("what", choices=["table1", "dagger", "warmstart", "sweep"],
                     help="table1: the Table 1 sweep (train and evaluate every env, variant and seed); dagger: "
                          "the DAgger rows (each finished table1 run of --scale continued by DAgger, beyond the "
                          "paper's protocol, in OUT/dagger-<scale>/); warmstart: the warm-start ablation (Fig. 7); "
                          "sweep: learning curves over network widths x dataset sizes for one env and variant "
                          "(default QPole, deq-mpc-nn)")
    rep.add_argument("--scale", choices=sorted(SCALES), default=_default(reproduce, "scale"),
                     help="budget (SCALES in deqmpc_gym.experiments.reproduce): paper (the paper's sizes), "
                          "paper64 (the paper's steps, batch and data at hidden 64), cpu "
                          "(smaller networks and runs, one seed of the table fits a 2-core CPU session), zoo "
                          "(the budgets of the shipped controllers) or tiny (a smoke test)")
    rep.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default: the scale's)")
    rep.add_argument("--envs", nargs="+", default=None, metavar="ENV_ID",
                     help=f"Table 1 envs (default: all: {', '.join(TABLE1_ENVS)})")
    rep.add_argument("--variants", nargs="+", default=None, metavar="VARIANT",
                     help=f"variants (default: the four of Table 1: {', '.join(TABLE1_VARIANTS)})")
    rep.add_argument("--out", default=_default(reproduce, "out_dir"),
                     help="results folder (table1-<scale>/ and warmstart-<scale>.* go inside)")
    rep.add_argument("--pretrained", action="store_true",
                     help="warmstart: the ablation of the shipped controllers of each --envs (default: every env "
                          "with one), on CPU in this process, written to OUT/warmstart-<Env>-pretrained.*")
    rep.add_argument("--episodes", type=int, default=None,
                     help="warmstart: evaluation episodes per K (default: the scale's; with --pretrained "
                          f"{_default(ShipConfig, 'episodes')})")
    rep.add_argument("--hidden", type=int, nargs="+", default=None,
                     help=f"sweep: network widths (default: {' '.join(map(str, _default(SweepConfig, 'hidden')))})")
    rep.add_argument("--trajectories", type=int, nargs="+", default=None,
                     help="sweep: expert dataset sizes (default: "
                          f"{' '.join(map(str, _default(SweepConfig, 'trajectories')))})")
    rep.add_argument("--steps", type=int, default=None,
                     help=f"sweep: training steps per point (default: {_default(SweepConfig, 'steps')})")
    rep.add_argument("--patience", type=int, default=None,
                     help="dagger: a labelled row whose runs stop after this many rounds in a row without a better "
                          "validation score (default: the scale's protocol), with the cap on the rounds raised in "
                          "proportion (cpu: 40 at 6), in OUT/dagger-<scale>-patience<N>/; "
                          "each run starts from a copy of the protocol row's run when OUT holds all its rounds")
    _add_launcher(rep, "run")
    rep.add_argument("--gpus-per-run", type=float, default=0.0,
                     help="with --launcher ray: GPUs per run (> 0 trains and evaluates on cuda)")
    _add_time_limit(rep, "no run starts after it and the training runs")
    _add_device(rep)
    pl = _parser(sub, "plot", "draw the learning curves of a training run or of a Table 1 sweep")
    pl.add_argument("run_dir", help="a training run folder (with progress.csv) or a `reproduce table1` folder "
                                    "(e.g. results/table1-cpu)")
    pl.add_argument("--out", default=None, help="PNG to write (default: RUN_DIR/curves.png)")
    z = _parser(sub, "zoo", "list the shipped controllers, or package trained Table 1 runs as controllers")
    z.set_defaults(print_help=z.print_help)
    zsub = z.add_subparsers(dest="zoo_cmd", metavar="{list,ship,refresh}")
    _parser(zsub, "list", "the shipped controllers with their scores")
    zs = _parser(zsub, "ship", "evaluate every trained seed of Table 1 cells and ship the best with a card")
    zs.add_argument("--from", dest="table_dir", required=True, metavar="DIR",
                    help="a `reproduce table1` output, e.g. results/table1-cpu")
    zs.add_argument("--envs", nargs="+", required=True, metavar="ENV_ID",
                    help=f"Table 1 envs to ship: any of {', '.join(TABLE1_ENVS)}")
    zs.add_argument("--variants", nargs="+", default=None, metavar="VARIANT",
                    help=f"variants (default: the four of Table 1: {', '.join(TABLE1_VARIANTS)})")
    first = _default(ShipConfig, "seed")
    zs.add_argument("--episodes", type=int, default=_default(ShipConfig, "episodes"),
                    help=f"evaluation episodes per seed (env seeds {first}, {first + 1}, ...)")
    zs.add_argument("--out", default=None, help="zoo root (default: the package's pretrained_policies/)")
    zs.add_argument("--trained-commit", default=None, help="commit of the training code, for records without one")
    zr = _parser(zsub, "refresh", "re-measure the shipped controllers' cards (score, expert reference, act latency) "
                                  "with the installed code, on each card's own episodes")
    zr.add_argument("--envs", nargs="+", default=None, metavar="ENV_ID",
                    help=f"envs (default: all of Table 1: {', '.join(TABLE1_ENVS)})")
    zr.add_argument("--variants", nargs="+", default=None, metavar="VARIANT",
                    help=f"variants (default: the four of Table 1: {', '.join(TABLE1_VARIANTS)})")
    zr.add_argument("--root", default=None, help="zoo root (default: the package's pretrained_policies/)")
    d = _parser(sub, "demo", "train a small DEQ-MPC policy on the shipped dataset, evaluate, make a video")
    d.add_argument("--out", default=_default(run_demo, "out_dir"), help="output folder")
    d.add_argument("--steps", type=int, default=None, help=f"training steps per variant (default: {DEMO_STEPS})")
    _add_device(d)


DESCRIPTION = ("DEQ-MPC for Gymnasium: train PPO experts, collect datasets, imitation-train DEQ-MPC policies, "
               "evaluate and record them, reproduce the paper's experiments.")


def version() -> str:
    """The installed distribution's version, or the package's own when it runs from a source tree."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("deqmpc-gym")
    except PackageNotFoundError:
        from deqmpc_gym import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deqmpc-gym", description=DESCRIPTION,
                                     formatter_class=_HelpFormatter,
                                     epilog="Run `deqmpc-gym COMMAND --help` for the options of a command.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the small networks and batched solver run best on one "
                             "thread, and several threads on shared cores slow everything down by 10x or more)")
    parser.set_defaults(print_help=parser.print_help)
    sub = parser.add_subparsers(dest="cmd", metavar="COMMAND")
    _add_expert(sub)
    _add_train(sub)
    _add_misc(sub)
    return parser


def _expert(args: argparse.Namespace) -> int:
    from deqmpc_gym.experts import default_expert_config, train_expert
    from deqmpc_gym.io import check_writable

    if args.expert_cmd == "collect":
        return _expert_collect(args)
    if args.expert_cmd == "filter":
        return _expert_filter(args)
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
    if args.seeds is not None or args.launcher != "local":
        return _expert_seeds(args, cfg, out)
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


def _expert_seeds(args: argparse.Namespace, cfg: Any, out: Any) -> int:
    from deqmpc_gym.experiments.expert_seeds import train_expert_seeds
    from deqmpc_gym.experiments.launch import LaunchConfig

    launch = LaunchConfig(launcher=args.launcher, address=args.address, cpus_per_run=args.cpus_per_run)
    records = train_expert_seeds(cfg, args.seeds or [args.seed], out, launch, resume=not args.no_resume,
                                 max_slices=args.slices)
    for seed, rec in records.items():
        if rec["status"] == "paused":
            print(f"seed {seed}: paused at a checkpoint in {rec['out']}; run the same command again to continue")
        else:
            print(f"seed {seed}: success {rec['success_rate']:.2%}, collisions {rec['collision_rate']:.2%}, mean "
                  f"return {rec['mean_return']:.1f}, {rec['train_steps']} steps -> {rec['out']}")
    print(f"records written to {out}/seeds.json")
    return 0


def _expert_collect(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from deqmpc_gym.experts import collect_dataset, dataset_expert_kind, load_expert
    from deqmpc_gym.io import check_writable

    check_writable(args.out, kind="file")
    if args.expert is not None:
        expert = load_expert(args.expert, env_id=args.env, kind=args.kind)
    else:
        expert = load_expert(args.env, env_id=args.env, kind=args.kind or dataset_expert_kind(args.env))
    bars: list[Any] = []  # created at the first progress report: argument errors print no bar

    def tick(done: int) -> None:
        if not bars:
            bars.append(tqdm(total=args.num_trajectories, desc="collect"))
        bars[0].update(done - bars[0].n)

    try:
        ds = collect_dataset(expert, args.env, args.num_trajectories, seed=args.seed, progress=tick)
    finally:
        for bar in bars:
            bar.close()
    ds.save(args.out)
    lengths = [len(t) for t in ds.trajectories]
    print(f"collected {len(ds)} trajectories ({sum(lengths)} steps, mean length {sum(lengths) / len(ds):.1f}, "
          f"{ds.extra['early_ends']} ended early) from {ds.expert_id} -> {args.out}")
    return 0


def _expert_filter(args: argparse.Namespace) -> int:
    from deqmpc_gym.experts.export import export_filtered
    from deqmpc_gym.experts.filtered import FilterConfig
    from deqmpc_gym.io import check_writable

    check_writable(args.out, kind="dir")
    config = None if args.tune else FilterConfig(horizon=args.horizon, margin=args.margin, trigger=args.trigger,
                                                 rho_init=args.rho_init, iters=args.iters)
    card = export_filtered(args.expert or args.env, args.out, config, episodes=args.episodes,
                           validation_seed=args.validation_seed, confirmation_seed=args.confirmation_seed,
                           log=print)
    conf = card["confirmation"]
    print(f"filtered expert {card['env_id']} {card['filter']}: success {card['success_rate']:.1%}, collisions "
          f"{card['collision_rate']:.1%}, early ends {card['early_end_rate']:.1%}, return {card['mean_return']:.1f} "
          f"± {card['std_return']:.1f}, MPC on {card['mpc_label_fraction']:.1%} of the states (card episodes); "
          f"confirmation: success {conf['success_rate']:.1%}, collisions {conf['collision_rate']:.1%} -> {args.out}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from deqmpc_gym._device import resolve_device
    from deqmpc_gym.data import ExpertDataset
    from deqmpc_gym.io import check_writable
    from deqmpc_gym.policies import DEQMPCPolicy
    from deqmpc_gym.training import ImitationTrainer, TrainConfig

    deadline = _deadline(args)
    device = resolve_device(args.device)
    check_writable(args.out, kind="dir")
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, val_every=args.val_every,
                      val_batches=args.val_batches, seed=args.seed, state_noise=args.state_noise, lr=args.lr)
    ds = ExpertDataset.load(args.dataset, env_id=args.env)
    if args.init is not None:  # fine-tuning: the saved policy's weights and config
        policy = DEQMPCPolicy.load(args.init, env=args.env, device=device)
        if (policy.config.variant, policy.config.hidden) != (args.variant, args.hidden):
            raise ConfigError(f"--init {args.init} holds a {policy.config.variant} policy of hidden "
                              f"{policy.config.hidden}; pass --variant {policy.config.variant} --hidden "
                              f"{policy.config.hidden} (or another --init)")
    else:
        policy = DEQMPCPolicy.from_env(args.env, args.variant, hidden=args.hidden, device=device)
    trainer = ImitationTrainer(policy, ds, cfg, args.out, log_formats=("stdout", "csv"))
    res = trainer.train(resume=args.resume, overwrite=args.overwrite, deadline=deadline)
    print(f"trained {args.variant} on {args.env}: best val loss {res.best_val_loss:.4f} at step {res.best_step} "
          f"({res.wall_time_s:.0f} s) -> {args.out}")
    return 0


def _dagger(args: argparse.Namespace) -> int:
    from pathlib import Path

    from deqmpc_gym._device import resolve_device
    from deqmpc_gym.data import ExpertDataset
    from deqmpc_gym.experiments.dagger import DaggerConfig, dagger
    from deqmpc_gym.experts import dataset_expert_kind, load_expert
    from deqmpc_gym.io import check_writable
    from deqmpc_gym.policies import DEQMPCPolicy
    from deqmpc_gym.training import TrainConfig

    deadline = _deadline(args)
    check_writable(args.out, kind="dir")
    cfg = DaggerConfig(rounds=args.rounds, episodes=args.episodes, states_per_episode=args.states_per_episode,
                       label_steps=args.label_steps, train_steps=args.train_steps, seed=args.seed,
                       select_episodes=args.select_episodes, patience=args.patience,
                       plateau_lr_factor=args.plateau_lr_factor, min_lr=args.min_lr)
    policy = DEQMPCPolicy.load(args.policy, env=args.env, device=resolve_device(args.device))
    data = ExpertDataset.load(args.dataset, env_id=args.env)
    expert = load_expert(args.env, kind=dataset_expert_kind(args.env))
    tuned, data = dagger(policy, expert, data, args.env, args.out, cfg,
                         TrainConfig(batch_size=args.batch_size, lr=args.lr, val_batches=10, val_every=100),
                         deadline=deadline)
    tuned.save(Path(args.out) / "best")
    data.save(Path(args.out) / "data.npz")
    ran = sum(1 for e in json.loads((Path(args.out) / "dagger.json").read_text())["rounds"] if e["round"] >= 0)
    print(f"DAgger on {args.env}: {ran} of {cfg.rounds} rounds, {len(data)} trajectories -> {args.out}/best "
          f"(rounds in {args.out}/dagger.json)")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from deqmpc_gym.evaluation import EvalConfig, rollout_batched
    from deqmpc_gym.evaluation.rollouts import protocol_stream_iters
    from deqmpc_gym.experts.reference import reference_returns
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
    k, k_protocol = getattr(policy.config, "stream_iters", 1), protocol_stream_iters(env_id)
    if eval_cfg.stream_iters is None and k != k_protocol:
        print(f"note: this policy acts with {k} warm DEQ-MPC iteration(s) per step (its stream_iters); the run "
              f"records and cards of {env_id} use {k_protocol}: pass --stream-iters {k_protocol} to compare with "
              f"them", file=sys.stderr)
    ref = reference_returns(env_id, eval_cfg.episodes, eval_cfg.seed, eval_cfg.max_steps)  # the dataset expert
    res = rollout_batched(policy, env_id, eval_cfg, reference=(ref["random_return"], ref["expert_return"]))
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
    from deqmpc_gym.experiments.launch import LaunchConfig
    from deqmpc_gym.experiments.reproduce import check_selection, reproduce
    from deqmpc_gym.io import check_writable

    if args.pretrained:
        return _warmstart_pretrained(args)
    check_selection(args.envs, args.variants, args.seeds)
    sweep_only = [f"--{k}" for k in ("hidden", "trajectories", "steps") if getattr(args, k) is not None]
    if sweep_only and args.what != "sweep":
        raise ConfigError(f"{', '.join(sweep_only)} apply to `reproduce sweep` only")
    if args.patience is not None and args.what != "dagger":
        raise ConfigError("--patience applies to `reproduce dagger` only")
    deadline = _deadline(args)
    launch = LaunchConfig(launcher=args.launcher, address=args.address, cpus_per_run=args.cpus_per_run,
                          gpus_per_run=args.gpus_per_run, deadline=deadline)
    device = resolve_device(args.device)
    check_writable(args.out, kind="dir")
    if args.what == "sweep":
        return _sweep(args, launch, device)
    if args.what == "dagger":
        from deqmpc_gym.experiments.dagger_rows import dagger_rows

        if args.episodes is not None:
            raise ConfigError("--episodes applies to warmstart; the DAgger rows are evaluated on the scale's episodes")
        out = dagger_rows(scale=args.scale, seeds=args.seeds, envs=args.envs, variants=args.variants,
                          out_dir=args.out, device=device, launch=launch, patience=args.patience)
        print(f"results written to {out}")
        return 0
    out = reproduce(args.what, scale=args.scale, seeds=args.seeds, envs=args.envs, variants=args.variants,
                    out_dir=args.out, device=device, launch=launch, episodes=args.episodes)
    print(f"results written to {out}")
    return 0


def _sweep(args: argparse.Namespace, launch: Any, device: Any) -> int:
    from deqmpc_gym.experiments.sweep import SweepConfig, learning_curve_sweep

    for flag, values in (("--envs", args.envs), ("--variants", args.variants), ("--seeds", args.seeds)):
        if values is not None and len(values) != 1:
            raise ConfigError(f"`reproduce sweep` takes one value of {flag}, got {values}")
    if args.episodes is not None:
        raise ConfigError("--episodes applies to warmstart; a sweep point is evaluated on the scale's episodes")
    given = {"env_id": args.envs and args.envs[0], "variant": args.variants and args.variants[0],
             "seed": args.seeds and args.seeds[0], "hidden": args.hidden and tuple(args.hidden),
             "trajectories": args.trajectories and tuple(args.trajectories), "steps": args.steps,
             "base_scale": args.scale}
    config = SweepConfig(**{k: v for k, v in given.items() if v is not None})
    print(f"results written to {learning_curve_sweep(config, out_dir=args.out, device=device, launch=launch)}")
    return 0


def _warmstart_pretrained(args: argparse.Namespace) -> int:
    from deqmpc_gym.experiments.reproduce import TABLE1_ENVS, check_selection
    from deqmpc_gym.experiments.zoo import ShipConfig, warmstart_pretrained
    from deqmpc_gym.io import check_writable
    from deqmpc_gym.policies import pretrained

    if args.what != "warmstart":
        raise ConfigError("--pretrained applies to `reproduce warmstart`")
    if args.launcher != "local" or args.seeds is not None or args.variants is not None or args.time_limit:
        raise ConfigError("--pretrained takes --envs, --episodes and --out (the shipped controllers of every "
                          "variant, in this process)")
    shipped = {e for e, _ in pretrained.available()}
    envs, _ = check_selection(args.envs or [e for e in TABLE1_ENVS if e in shipped], None, None)
    if args.episodes is not None and args.episodes < 1:
        raise ConfigError(f"--episodes must be >= 1, got {args.episodes}")
    config = ShipConfig() if args.episodes is None else ShipConfig(episodes=args.episodes)
    check_writable(args.out, kind="dir")
    for env_id in envs:
        print(f"results written to {warmstart_pretrained(env_id, config=config, out_dir=args.out)}")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from deqmpc_gym.experiments.reproduce import plot_run

    print(f"learning curves written to {plot_run(args.run_dir, args.out)}")
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
    from deqmpc_gym.experiments.zoo import ShipConfig, refresh, ship

    envs, variants = check_selection(args.envs, args.variants, None)
    if args.zoo_cmd == "refresh":
        refresh(envs, variants, root=args.root)
        return 0
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


COMMANDS = {"expert": _expert, "train": _train, "dagger": _dagger, "evaluate": _evaluate, "record": _record,
            "reproduce": _reproduce, "plot": _plot, "zoo": _zoo, "demo": _demo}


#: exit codes of a training stopped before its budget, by reason: 128 + the signal (SIGINT, SIGTERM), and
#: sysexits' EX_TEMPFAIL (75: try again) for a time-limited slice, so a job script can loop until it is done
EXIT_CODES = {"interrupt": 130, "terminate": 143, "time limit": 75}


def resume_command(argv: Sequence[str]) -> str:
    """The ``deqmpc-gym`` command line that resumes the interrupted run of ``argv``: ``train`` with ``--resume``
    (no ``--overwrite``); ``reproduce`` and the other commands that continue their runs by themselves as they
    were."""
    args = [a for a in argv if a != "--overwrite"]
    if build_parser().parse_args(args).cmd == "train" and "--resume" not in args:
        args.append("--resume")
    return "deqmpc-gym " + shlex.join(args)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


class _StderrHandler(logging.Handler):
    """Prints a record to the current ``sys.stderr`` (resolved at each record, so a replaced stream is followed)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stderr)


def _log_to_stderr() -> None:
    """Show the package's INFO messages (e.g. a system's first kernel compile) on stderr, once per process."""
    log = logging.getLogger("deqmpc_gym")
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("deqmpc-gym: %(message)s"))
        log.addHandler(handler)
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``deqmpc-gym`` console script; returns the exit code.

    Library errors (:class:`~deqmpc_gym.errors.DeqmpcError`) print one line to stderr and return 2; a training
    stopped before its budget first checkpoints the current step and prints the command that resumes it, and
    returns :data:`EXIT_CODES` (Ctrl-C 130, SIGTERM 143, ``--time-limit`` 75).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.cmd is None or getattr(args, f"{args.cmd}_cmd", "") is None:  # no (sub)command: the help, exit code 0
        args.print_help()
        return 0
    import torch

    from deqmpc_gym.errors import DeqmpcError, TimeLimitReached, TrainingInterrupted

    torch.set_num_threads(max(1, args.threads))
    _log_to_stderr()

    try:
        return COMMANDS[args.cmd](args)
    except DeqmpcError as exc:
        print(f"deqmpc-gym: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except TrainingInterrupted as exc:
        why = {"interrupt": "", "terminate": "SIGTERM; ", "time limit": "time limit; "}[exc.reason]
        print(f"deqmpc-gym: training stopped at step {exc.step} of {exc.total} ({why}checkpoint in {exc.out_dir}); "
              f"resume with: {resume_command(argv)}", file=sys.stderr)
        return EXIT_CODES[exc.reason]
    except TimeLimitReached as exc:
        left = "; ".join(f"{k}: {v}" for k, v in exc.unfinished.items())
        print(f"deqmpc-gym: time limit reached, {len(exc.unfinished)} run(s) unfinished ({left}); resume with: "
              f"{resume_command(argv)}", file=sys.stderr)
        return EXIT_CODES["time limit"]
    except KeyboardInterrupt:
        print(f"deqmpc-gym: {args.cmd} interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
