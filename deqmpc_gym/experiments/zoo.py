"""Package trained Table 1 runs as shipped controllers (:mod:`deqmpc_gym.policies.pretrained`) with their cards.

For one (env, variant) cell, every trained seed of a ``deqmpc-gym reproduce table1`` output is evaluated on the
same ``episodes`` episodes (initial-state seeds ``seed, seed + 1, ...``), the expert's return on exactly those
episodes is the reference (its card's on the card's episodes, else a rollout), and the best seed is written to the
zoo with a ``card.json``::

    deqmpc-gym zoo ship --from results/table1-cpu --envs DEQMPC/Pendulum-v0

Episodes that end early (a crash, or leaving the flight volume) keep the return collected until then: the
remaining steps earn nothing, which the normalized score counts against the policy.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deqmpc_gym.errors import CheckpointError, ConfigError
from deqmpc_gym.evaluation.rollouts import EvalConfig, protocol_stream_iters, rollout_batched, set_stream_iters
from deqmpc_gym.experiments.reproduce import SCALES, git_commit, run_name
from deqmpc_gym.io import atomic_write, atomic_write_text
from deqmpc_gym.policies.pretrained import CARD_FORMAT, ZOO_DIR


@dataclass(frozen=True)
class ShipConfig:
    """Settings of :func:`ship_cell`.

    Attributes:
        episodes: evaluation episodes per seed (the paper: 200).
        seed: initial-state seed of the first episode (episode ``i`` uses ``seed + i``).
        latency_calls: warm single-env ``act()`` calls timed for the card's latency (median).
    """

    episodes: int = 200
    seed: int = 10_000
    latency_calls: int = 100


def warm_act_latency_ms(policy: Any, env_id: str, calls: int = 100, seed: int = 0) -> float:
    """Median wall time [ms] of warm-started single-env ``policy.act(obs)`` calls along the policy's own
    episodes (the first, cold call of each episode excluded)."""
    import gymnasium as gym

    env = gym.make(env_id)
    times: list[float] = []
    episode = 0
    try:
        while len(times) < calls:
            obs, _ = env.reset(seed=seed + episode)
            policy.reset()
            policy.act(obs)  # cold
            done = False
            while not done and len(times) < calls:
                t = time.perf_counter()
                action = policy.act(obs)
                times.append(time.perf_counter() - t)
                obs, _, terminated, truncated, _ = env.step(action)
                done = terminated or truncated
            episode += 1
    finally:
        env.close()
    return float(np.median(times) * 1e3)


def _normalized(returns: np.ndarray, random_return: float, expert_return: float) -> np.ndarray:
    return (returns - random_return) / (expert_return - random_return)


def _evaluate(policy: Any, env_id: str, cfg: ShipConfig, reference: tuple[float, float]) -> dict[str, Any]:
    k = protocol_stream_iters(env_id)
    ev = rollout_batched(policy, env_id, EvalConfig(episodes=cfg.episodes, seed=cfg.seed, stream_iters=k),
                         reference=reference)
    per_episode = _normalized(ev.returns, *reference)
    return {"normalized_score": float(ev.normalized_score), "normalized_std": float(per_episode.std()),
            "mean_return": ev.mean_return, "std_return": ev.std_return, "success_rate": ev.success_rate,
            "early_end_rate": ev.collision_rate, "cost_rate": ev.cost_rate, "stream_iters": k,
            "batched_act_latency_ms": ev.act_latency_ms}


def _expert_reference(env_id: str, cfg: ShipConfig) -> dict[str, Any]:
    """The return of the shipped expert that makes the env's datasets (``experts.dataset_expert_kind``: the
    safety-filtered expert on the obstacle tasks) on exactly the evaluation episodes, with the card's random
    return; ``expert_measured`` says where the return comes from (as ``reference_returns``' ``measured``).

    On the expert card's own evaluation episodes (200 episodes from seed 10000, the default) the return and rates
    are the card's: the reference of :func:`~deqmpc_gym.experts.reference.reference_returns`, which the run records
    and ``deqmpc-gym evaluate`` normalize by, so a card's score is the one they give on any machine (a rollout of
    the filtered expert differs in the last digits between CPU kinds). On other episodes the expert is rolled out.
    """
    from deqmpc_gym.experts import dataset_expert_kind, load_expert

    expert = load_expert(env_id, kind=dataset_expert_kind(env_id))
    card = expert.card
    out = {"random_return": float(card["random_return"]), "expert_card_return": float(card["mean_return"]),
           "expert_id": expert.expert_id}
    card_episodes = (cfg.episodes == int(card.get("eval_episodes", -1))
                     and cfg.seed == int(card.get("eval_seed", EvalConfig().seed)))
    if card_episodes:
        from deqmpc_gym.experts.reference import reference_returns

        ref = reference_returns(env_id, cfg.episodes, cfg.seed)
        early = card.get("early_end_rate", card.get("collision_rate"))
        return {**out, "expert_return": ref["expert_return"], "expert_success_rate": float(card["success_rate"]),
                "expert_early_end_rate": float(early), "expert_measured": ref["measured"]}
    ev = rollout_batched(expert, env_id, EvalConfig(episodes=cfg.episodes, seed=cfg.seed))
    return {**out, "expert_return": ev.mean_return, "expert_success_rate": ev.success_rate,
            "expert_early_end_rate": ev.collision_rate, "expert_measured": "rollout"}


def ship_cell(table_dir: str | Path, env_id: str, variant: str, *, config: ShipConfig = ShipConfig(),
              out_root: str | Path | None = None, reference: dict[str, Any] | None = None,
              batch_size: int | None = None, num_trajectories: int | None = None,
              trained_commit: str | None = None) -> dict[str, Any]:
    """Evaluate every trained seed of one cell of ``table_dir`` (a ``reproduce table1`` or ``reproduce dagger``
    output such as ``results/table1-cpu``) and write the best one to ``out_root/<Env>/<variant>/`` with its
    ``card.json``.

    Args:
        reference: :func:`_expert_reference` of ``env_id`` if already measured (one expert rollout per env).
        batch_size, num_trajectories: the training batch and dataset size (default: the run record's).
        trained_commit: the commit of the code that trained the runs, for records that do not hold it.

    Returns:
        The card (a dict).

    Raises:
        ConfigError: no finished run of the cell in ``table_dir``.
    """
    from deqmpc_gym.policies import DEQMPCPolicy

    table_dir = Path(table_dir)
    records = []
    for f in sorted((table_dir / "runs").glob(f"{run_name(env_id, variant, 0).rsplit('__s', 1)[0]}__s*.json")):
        rec = json.loads(f.read_text())
        best = table_dir / "train" / run_name(env_id, variant, rec["seed"]) / "best"
        if (best / "policy.pt").is_file():
            records.append((rec, best))
    if not records:
        raise ConfigError(f"no finished {variant!r} run of {env_id!r} in {table_dir}; train it with "
                          f"`deqmpc-gym reproduce table1 --envs {env_id} --variants {variant}`")
    ref = reference or _expert_reference(env_id, config)
    pair = (ref["random_return"], ref["expert_return"])
    seeds = []
    for rec, best in records:
        policy = DEQMPCPolicy.load(best)
        seeds.append({"seed": rec["seed"], "dir": best, "policy": policy, **_evaluate(policy, env_id, config, pair)})
    chosen = max(seeds, key=lambda s: s["normalized_score"])
    rec = next(r for r, _ in records if r["seed"] == chosen["seed"])
    out = Path(out_root or ZOO_DIR) / env_id.split("/")[-1] / variant
    policy = chosen["policy"]
    set_stream_iters(policy, chosen["stream_iters"])  # ship it acting as it was evaluated (QPoleObs: K = 2)
    policy.save(out)
    scores = [s["normalized_score"] for s in seeds]
    batch = batch_size or rec.get("batch_size") or _scale_value(rec, "batch_size")
    card = {
        "format": CARD_FORMAT, "env_id": env_id, "variant": variant, "hidden": rec["hidden"],
        "batch_size": batch, "train_steps": rec["train_steps"],
        "windows_seen": rec.get("windows_seen", rec["train_steps"] * batch),
        "wall_time_s": rec.get("train_time_s", rec["wall_time_s"]), "best_val_loss": rec["best_val_loss"],
        "dataset": {"expert": rec.get("expert_id") or f"shipped PPO expert of {env_id}",
                    "num_trajectories": (num_trajectories or rec.get("num_trajectories")
                                         or _scale_value(rec, "num_trajectories"))},
        "evaluation": {"episodes": config.episodes, "seeds": f"{config.seed}..{config.seed + config.episodes - 1}",
                       **{k: v for k, v in chosen.items() if k not in ("seed", "dir", "policy")}, **ref},
        "warm_act_latency_ms": warm_act_latency_ms(policy, env_id, config.latency_calls),
        "selection": {"trained_seeds": [s["seed"] for s in seeds], "chosen_seed": chosen["seed"],
                      "seed_scores": scores, "seed_mean": float(np.mean(scores)), "seed_std": float(np.std(scores)),
                      "rule": "best normalized score of the trained seeds on the evaluation episodes"},
        "commit": {"trained": rec.get("commit") or trained_commit, "evaluated": git_commit(),
                   # a run continued from another (a DAgger row): the commit that trained its starting policy
                   **({"base_trained": rec["base_commit"]} if rec.get("base_commit") else {})},
        # a record of a run beyond the paper's protocol (e.g. DAgger) says so and how it was made
        "protocol": rec.get("protocol", "paper: imitation of the expert's trajectories"),
        "command": (rec.get("command") or
                    f"deqmpc-gym reproduce table1 --scale {_scale_name(table_dir)} --envs {env_id} "
                    f"--variants {variant} --seeds {' '.join(str(s['seed']) for s in seeds)}")
        + f"; deqmpc-gym zoo ship --from {table_dir} --envs {env_id} --variants {variant}",
    }
    atomic_write_text(out / "card.json", json.dumps(card, indent=2))
    return card


def _scale_name(table_dir: Path) -> str:
    """The ``reproduce`` scale of an output folder named ``table1-<scale>`` (``cpu`` otherwise)."""
    name = table_dir.name
    return name.split("-", 1)[1] if name.startswith("table1-") else "cpu"


def _scale_value(record: dict[str, Any], field: str) -> int:
    """A field of the CPU scale of ``reproduce`` for the record's env (for records that predate the field)."""
    short = record["env_id"].split("/")[-1].rsplit("-v", 1)[0]
    return int(getattr(SCALES["cpu"], field)[short])


def ship(table_dir: str | Path, envs: Sequence[str], variants: Sequence[str], *, config: ShipConfig = ShipConfig(),
         out_root: str | Path | None = None, trained_commit: str | None = None) -> list[dict[str, Any]]:
    """:func:`ship_cell` for every (env, variant); cells without a finished run are skipped with a message."""
    cards = []
    for env_id in envs:
        ref = None
        for variant in variants:
            try:
                ref = ref or _expert_reference(env_id, config)
                cards.append(ship_cell(table_dir, env_id, variant, config=config, out_root=out_root, reference=ref,
                                       trained_commit=trained_commit))
            except ConfigError as exc:
                print(f"skipped: {exc}", flush=True)
                continue
            c = cards[-1]["evaluation"]
            print(f"{env_id} {variant}: {c['normalized_score']:.3f} (± {c['normalized_std']:.3f} over episodes; "
                  f"success {c['success_rate']:.2f}, early end {c['early_end_rate']:.2f})", flush=True)
    return cards


def _card_config(card: dict[str, Any], config: ShipConfig) -> ShipConfig:
    """``config`` with the episodes of a card's evaluation (``episodes`` and the seed range ``"first..last"``).

    Raises:
        CheckpointError: the card has no readable ``evaluation.episodes`` / ``evaluation.seeds``.
    """
    try:
        ev = card["evaluation"]
        first, episodes = int(str(ev["seeds"]).split("..", 1)[0]), int(ev["episodes"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"the card of {card.get('env_id')!r} / {card.get('variant')!r} has no readable "
                              f"evaluation episodes and seed range ('episodes', 'seeds': 'first..last'): {exc!r}; "
                              "ship the cell again with `deqmpc-gym zoo ship`") from exc
    if episodes < 1:
        raise CheckpointError(f"the card of {card.get('env_id')!r} / {card.get('variant')!r} names {episodes} "
                              "evaluation episodes; ship the cell again with `deqmpc-gym zoo ship`")
    return ShipConfig(episodes=episodes, seed=first, latency_calls=config.latency_calls)


def refresh_card(env_id: str, variant: str, *, config: ShipConfig = ShipConfig(), root: str | Path | None = None,
                 reference: dict[str, Any] | None = None) -> dict[str, Any]:
    """Re-measure a shipped controller's card with the code that runs now and rewrite it in place.

    The controller is evaluated on the card's own episodes (its ``evaluation.episodes`` and seed range) against
    the expert's return on exactly those episodes (:func:`_expert_reference`), and the warm ``act()`` latency is
    timed again (``config.latency_calls`` calls); ``evaluation``, ``warm_act_latency_ms`` and ``commit.evaluated`` are
    replaced. The weights, the training fields, the protocol and the ``selection`` stay: the seed scores of the
    selection were measured when the cell shipped, by the commit now kept as ``commit.selected``.

    Args:
        reference: :func:`_expert_reference` of ``env_id`` on the card's episodes, if already measured.

    Returns:
        The rewritten card (a dict).

    Raises:
        ConfigError: ``(env_id, variant)`` does not ship in ``root`` (default: the package's zoo).
    """
    from deqmpc_gym.policies import DEQMPCPolicy, pretrained

    zoo_root = None if root is None else Path(root)
    card = pretrained.card(env_id, variant, zoo_root)  # raises the typed error naming what ships
    cfg = _card_config(card, config)
    ref = reference or _expert_reference(env_id, cfg)
    folder = pretrained.pretrained_dir(env_id, variant, zoo_root)
    policy = DEQMPCPolicy.load(folder)
    evaluation = _evaluate(policy, env_id, cfg, (ref["random_return"], ref["expert_return"]))
    commit = dict(card.get("commit") or {})
    commit.setdefault("selected", commit.get("evaluated"))
    commit.pop("latency", None)  # the latency is re-timed below, by this commit
    commit["evaluated"] = git_commit()
    card = {**card, "evaluation": {"episodes": cfg.episodes, "seeds": card["evaluation"]["seeds"], **evaluation,
                                   **ref},
            "warm_act_latency_ms": warm_act_latency_ms(policy, env_id, config.latency_calls), "commit": commit}
    atomic_write_text(folder / "card.json", json.dumps(card, indent=2))
    return card


def refresh(envs: Sequence[str], variants: Sequence[str], *, config: ShipConfig = ShipConfig(),
            root: str | Path | None = None) -> list[dict[str, Any]]:
    """:func:`refresh_card` for every shipped (env, variant) of the selection (cells that do not ship are skipped
    with a message); one expert rollout per env and episode range."""
    from deqmpc_gym.policies import pretrained

    shipped = set(pretrained.available(None if root is None else Path(root)))
    cards = []
    for env_id in envs:
        refs: dict[tuple[int, int], dict[str, Any]] = {}
        for variant in variants:
            if (env_id, variant) not in shipped:
                print(f"skipped: {env_id} {variant} does not ship", flush=True)
                continue
            cfg = _card_config(pretrained.card(env_id, variant, None if root is None else Path(root)), config)
            key = (cfg.seed, cfg.episodes)
            refs[key] = refs.get(key) or _expert_reference(env_id, cfg)
            cards.append(refresh_card(env_id, variant, config=config, root=root, reference=refs[key]))
            ev = cards[-1]["evaluation"]
            print(f"{env_id} {variant}: {ev['normalized_score']:.3f} (± {ev['normalized_std']:.3f} over episodes; "
                  f"success {ev['success_rate']:.2f}, early end {ev['early_end_rate']:.2f}; warm act "
                  f"{cards[-1]['warm_act_latency_ms']:.1f} ms)", flush=True)
    return cards


def warmstart_pretrained(env_id: str, *, ks: Sequence[int] = (1, 2, 3, 4), config: ShipConfig = ShipConfig(),
                         out_dir: str | Path = "results", root: str | Path | None = None) -> Path:
    """Paper Fig. 7 with the shipped controllers of ``env_id``: normalized score and warm ``act()`` latency against
    the warm-started DEQ-MPC iterations per control step K (Diff-MPC: 2K AL iterations), for every variant that
    ships.

    Every K is scored on the same ``config.episodes`` episodes (seeds ``config.seed``+) against the expert's
    return on exactly those episodes. Writes ``warmstart-<Env>-pretrained.json`` and ``.png`` to ``out_dir``;
    returns the png's path.

    Raises:
        ConfigError: no controller of ``env_id`` ships (in ``root``, default the package's zoo).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from deqmpc_gym.policies import DEQMPCPolicy, pretrained

    zoo_root = None if root is None else Path(root)
    variants = [v for e, v in pretrained.available(zoo_root) if e == env_id]
    if not variants:
        raise ConfigError(f"no controller of {env_id!r} ships; shipped: "
                          f"{sorted({e for e, _ in pretrained.available(zoo_root)})}")
    ref = _expert_reference(env_id, config)
    pair = (ref["random_return"], ref["expert_return"])
    record: dict[str, Any] = {"env_id": env_id, "ks": list(ks), "episodes": config.episodes, "reference": ref,
                              "variants": {}, "commit": git_commit()}
    for variant in variants:
        policy = DEQMPCPolicy.load(pretrained.pretrained_dir(env_id, variant, zoo_root))
        rows = []
        for k in ks:
            set_stream_iters(policy, k)
            ev = rollout_batched(policy, env_id, EvalConfig(episodes=config.episodes, seed=config.seed,
                                                            stream_iters=k), reference=pair)
            rows.append({"k": k, "normalized_score": float(ev.normalized_score), "success_rate": ev.success_rate,
                         "early_end_rate": ev.collision_rate,
                         "warm_act_latency_ms": warm_act_latency_ms(policy, env_id, config.latency_calls)})
            print(f"{env_id} {variant} K={k}: {rows[-1]['normalized_score']:.3f}, "
                  f"act {rows[-1]['warm_act_latency_ms']:.1f} ms", flush=True)
        record["variants"][variant] = rows
    fig, axes = plt.subplots(1, 2, figsize=(8.5, 3.4))
    for variant, rows in record["variants"].items():
        axes[0].plot(list(ks), [r["normalized_score"] for r in rows], marker="o", label=variant)
        axes[1].plot(list(ks), [r["warm_act_latency_ms"] for r in rows], marker="o", label=variant)
    axes[0].set_ylabel("normalized return")
    axes[1].set_ylabel("warm act() [ms], median")
    for ax in axes:
        ax.set_xlabel("warm-started DEQ-MPC iterations K (Diff-MPC: 2K AL)")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Warm-start ablation, shipped {env_id.split('/')[-1]} controllers")
    fig.tight_layout()
    out = Path(out_dir)
    stem = f"warmstart-{env_id.split('/')[-1].rsplit('-v', 1)[0]}-pretrained"
    png = out / f"{stem}.png"
    atomic_write(png, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
    atomic_write_text(out / f"{stem}.json", json.dumps(record, indent=2))
    return png


def markdown_table(root: str | Path | None = None) -> str:
    """The shipped controllers as a markdown table (one row per card of the zoo at ``root``, default the
    package's): normalized score over the evaluation episodes, success and early-end rates, seeds, budget; a
    controller trained beyond the paper's protocol has its protocol after the variant (e.g. "+ DAgger")."""
    from deqmpc_gym.policies import pretrained

    lines = ["| env | variant | normalized score | success | early end | seeds (mean ± std) | hidden | training "
             "windows | warm act() |", "|---|---|---|---|---|---|---|---|---|"]
    for env_id, variant in pretrained.available(None if root is None else Path(root)):
        c = pretrained.card(env_id, variant, None if root is None else Path(root))
        ev, sel = c["evaluation"], c["selection"]
        extra = "" if c.get("protocol", "paper").startswith("paper") else f" + {c['protocol'].split(':')[0]}"
        lines.append(f"| {env_id.split('/')[-1]} | {variant}{extra} | {ev['normalized_score']:.2f} "
                     f"(± {ev['normalized_std']:.2f}) | {ev['success_rate']:.0%} | {ev['early_end_rate']:.0%} | "
                     f"{sel['seed_mean']:.2f} ± {sel['seed_std']:.2f} (n = {len(sel['trained_seeds'])}) | "
                     f"{c['hidden']} | {c['windows_seen']:,} | {c['warm_act_latency_ms']:.1f} ms |")
    return "\n".join(lines)


__all__ = ["ShipConfig", "markdown_table", "refresh", "refresh_card", "ship", "ship_cell", "warm_act_latency_ms",
           "warmstart_pretrained"]
