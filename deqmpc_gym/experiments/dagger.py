"""DAgger for DEQ-MPC imitation (Ross et al. 2011): train on the states the policy itself visits, labelled by the
expert -- beyond the paper's protocol, for the closed-loop gap (compounding error) that imitation of expert
trajectories leaves.

Each round rolls the current policy out (batched, streaming as at run time), picks states along those rollouts,
lets the expert drive from each for ``label_steps`` steps, adds these expert trajectories to the dataset and
continues training the policy on the aggregate. Rounds are separate training runs in ``out_dir/round_<r>`` (each
resumable); ``out_dir/dagger.json`` records the rounds.

A call into a folder that holds the same DAgger run (same settings except ``rounds``, ``patience``,
``plateau_lr_factor`` and ``min_lr``, which shape only the rounds not yet run; same starting policy and dataset;
``dagger.json``'s ``run``) continues it: a round's expert labels (``round_<r>/labels.npz``, written before its
training starts, with the state of the random choices after it) are read instead of rolled out and labelled
again, and a finished round's training and closed-loop score are taken from the folder and ``dagger.json``. A
folder of another DAgger run is refused (:class:`ConfigError`), and so is a finished round trained at another
learning rate than the schedule of this call gives it (the training rate, ``plateau_lr_factor`` or ``min_lr``
changed under it).

With ``select_episodes > 0`` every round (and the starting policy) is scored in closed loop on validation episodes
(seeds ``select_seed``+, apart from the evaluation seeds 10000+ of Table 1 and the cards) against the labelling
expert's return on the same episodes, and the best-scoring policy is returned: the imitation loss of a round does
not predict its closed-loop score. With ``plateau_lr_factor < 1`` as well, a round that does not beat the best score
so far sends the next round back to the best-scoring policy, at the learning rate times that factor (a
reduce-on-plateau schedule over rounds): from a weak starting policy, rounds at the full rate climb fast and then
stall, and the lower rate from the best policy climbs further; ``min_lr`` keeps the rate from falling further
than that (a round at a tiny rate barely moves the policy).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deqmpc_gym._config import require_at_least_one
from deqmpc_gym.data import ExpertDataset
from deqmpc_gym.errors import ConfigError, DatasetError
from deqmpc_gym.io import atomic_write_text


@dataclass(frozen=True)
class DaggerConfig:
    """Settings of :func:`dagger`.

    Attributes:
        rounds: DAgger rounds.
        episodes: policy rollouts per round (seeds ``seed + 1000 r``+, apart from evaluation seeds 10000+).
        states_per_episode: visited states picked (uniformly over the steps before termination) per rollout.
        label_steps: steps of each expert trajectory from a picked state.
        train_steps: training steps per round on the aggregated dataset.
        max_steps: steps of a policy rollout.
        seed: seeds the rollouts and the choice of states.
        select_episodes: closed-loop validation episodes per round (0: return the last round's policy).
        select_seed: first seed of those episodes.
        patience: with ``select_episodes``, stop after this many rounds in a row without a better validation score
            than the best so far (0: run all ``rounds``).
        plateau_lr_factor: in (0, 1]; with ``select_episodes`` and < 1, after a round without a better score the
            next round starts from the best-scoring policy so far, at the learning rate times this factor (the
            factors compound); 1: every round continues from the previous one at the same rate.
        min_lr: with ``plateau_lr_factor < 1``, the rate never drops below this (absolute, as
            ``TrainConfig.lr``; capped at the training rate); 0: no floor.
    """

    rounds: int = 3
    episodes: int = 100
    states_per_episode: int = 4
    label_steps: int = 60
    train_steps: int = 1000
    max_steps: int = 200
    seed: int = 0
    select_episodes: int = 0
    select_seed: int = 30_000
    patience: int = 0
    plateau_lr_factor: float = 1.0
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        require_at_least_one(self, ("rounds", "episodes", "states_per_episode", "label_steps", "train_steps",
                                    "max_steps"))
        require_at_least_one(self, ("seed", "select_episodes", "select_seed", "patience"), minimum=0)
        if not 0 < self.plateau_lr_factor <= 1:
            raise ConfigError(f"DaggerConfig.plateau_lr_factor must be in (0, 1], got {self.plateau_lr_factor!r}")
        if self.plateau_lr_factor < 1 and not self.select_episodes:
            raise ConfigError(f"DaggerConfig.plateau_lr_factor {self.plateau_lr_factor} needs select_episodes > 0 "
                              "(the rounds' validation scores decide when the rate drops)")
        if not self.min_lr >= 0:
            raise ConfigError(f"DaggerConfig.min_lr must be >= 0, got {self.min_lr!r}")
        if self.min_lr and self.plateau_lr_factor == 1:
            raise ConfigError(f"DaggerConfig.min_lr {self.min_lr} needs plateau_lr_factor < 1 (the floor of the rate "
                              "that factor lowers)")
        if self.patience and not self.select_episodes:
            raise ConfigError(f"DaggerConfig.patience {self.patience} needs select_episodes > 0 (the rounds' "
                              "validation scores decide when to stop)")
        if self.select_episodes and self.select_seed < 10_200 and self.select_seed + self.select_episodes > 10_000:
            raise ConfigError(f"DaggerConfig.select_seed {self.select_seed} overlaps the evaluation seeds "
                              "10000-10199; choose validation seeds apart from them (e.g. 30000)")


def visited_states(policy: Any, env_id: str, episodes: int, seed: int, max_steps: int) -> list[np.ndarray]:
    """The float64 states of ``episodes`` batched streaming rollouts of ``policy`` (one ``(L_i, nx)`` array per
    episode, up to its termination)."""
    from deqmpc_gym.envs import make_batched_env

    env = make_batched_env(env_id, episodes, seed=seed, max_episode_steps=max_steps)
    try:
        obs, _ = env.reset(seed=seed)
        seqs: list[list[np.ndarray]] = [[] for _ in range(episodes)]
        alive = np.ones(episodes, bool)
        state, starts = None, np.ones(episodes, bool)
        for _ in range(max_steps):
            x = env.state.cpu().numpy().copy()
            for i in np.flatnonzero(alive):
                seqs[i].append(x[i])
            actions, state = policy.predict(obs, state, starts, deterministic=True)
            r = env.step_arrays(actions)
            alive &= ~r.done.cpu().numpy()
            obs, starts = r.obs.cpu().numpy(), np.zeros(episodes, bool)
            if not alive.any():
                break
    finally:
        env.close()
    return [np.asarray(s) for s in seqs]


def _validation(config: DaggerConfig) -> Any:
    """The :class:`~deqmpc_gym.evaluation.EvalConfig` of the rounds' closed-loop validation episodes."""
    from deqmpc_gym.evaluation import EvalConfig

    return EvalConfig(episodes=config.select_episodes, seed=config.select_seed, max_steps=config.max_steps)


def _expert_return(expert: Any, env_id: str, config: DaggerConfig) -> float:
    """The expert's mean return on the validation episodes (the same in every round: computed once per call)."""
    from deqmpc_gym.evaluation import rollout_batched

    return float(rollout_batched(expert, env_id, _validation(config)).mean_return)


def _closed_loop_score(policy: Any, expert: Any, env_id: str, config: DaggerConfig,
                       expert_return: float | None = None) -> float:
    """Normalized score of ``policy`` on the validation episodes, against ``expert`` on the same episodes
    (``expert_return``: its mean return there, if already measured)."""
    from deqmpc_gym.evaluation import rollout_batched

    if expert_return is None:
        expert_return = _expert_return(expert, env_id, config)
    ev = rollout_batched(policy, env_id, _validation(config),
                         reference=(float(expert.card["random_return"]), expert_return))
    return float("nan") if ev.normalized_score is None else float(ev.normalized_score)


def dagger(policy: Any, expert: Any, dataset: ExpertDataset, env_id: str, out_dir: str | Path,
           config: DaggerConfig = DaggerConfig(), train_config: Any = None,
           deadline: float | None = None) -> tuple[Any, ExpertDataset]:
    """Run ``config.rounds`` DAgger rounds from ``policy`` (trained further in place of a copy: each round continues
    from the previous round's best policy by validation loss); returns ``(policy, aggregated dataset)`` with the
    last round's policy, or with ``config.select_episodes`` the best-scoring one in closed loop (the starting
    policy included; the scores are in ``dagger.json``). With ``config.patience`` the rounds stop early once that
    many in a row have not beaten the best score.

    Args:
        policy: a :class:`~deqmpc_gym.policies.DEQMPCPolicy` (typically trained on ``dataset`` already).
        expert: the expert that labels states (``predict``), e.g. :func:`~deqmpc_gym.experts.load_expert`.
        dataset: the expert dataset to aggregate into.
        train_config: :class:`~deqmpc_gym.training.TrainConfig` of each round (its ``steps`` is replaced by
            ``config.train_steps``); default the trainer's defaults at batch 64.
        deadline: a ``time.time()`` instant: the round training when it passes stops at a checkpoint
            (``TrainingInterrupted``, ``reason="time limit"``); the same call later resumes there (the finished
            rounds and the labels of the interrupted one are read from ``out_dir``, see the module docstring).

    Raises:
        ConfigError: ``out_dir`` holds another DAgger run.
    """
    from dataclasses import replace

    from deqmpc_gym.experts.collect import collect_from_states
    from deqmpc_gym.policies import DEQMPCPolicy
    from deqmpc_gym.training import ImitationTrainer, TrainConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = train_config if train_config is not None else TrainConfig(batch_size=64, val_batches=10)
    cfg = replace(base, steps=config.train_steps)
    key = _run_key(policy, dataset, env_id, config)
    done = _finished_rounds(out / "dagger.json", key)
    log: list[dict[str, Any]] = []
    rng = np.random.default_rng(config.seed)
    best_score, best_policy, since_best = -np.inf, policy, 0
    reference: list[float] = []  # the expert's validation return, measured at the first score this call needs

    def validate(p: Any) -> float:
        if not reference:
            reference.append(_expert_return(expert, env_id, config))
        return _closed_loop_score(p, expert, env_id, config, reference[0])

    if config.select_episodes:
        best_score = done[-1]["closed_loop_score"] if -1 in done else validate(policy)
        log.append({"round": -1, "closed_loop_score": best_score})
        # round 0 trains ``policy`` in place: the kept starting policy is a copy
        best_policy = copy.deepcopy(policy)
    lr_scale = 1.0  # plateau_lr_factor ** (rounds so far without a better score)
    for r in range(config.rounds):
        run_dir = out / f"round_{r}"
        round_cfg = replace(cfg, lr=max(cfg.lr * lr_scale, min(config.min_lr, cfg.lr)))
        if r in done:  # before any rollout: a finished round trained at another rate is refused
            _check_round_rate(done[r], round_cfg.lr, run_dir)
        labels = _read_labels(run_dir / "labels.npz", env_id, key, r)
        if labels is None:
            seqs = visited_states(policy, env_id, config.episodes, config.seed + 1000 * r, config.max_steps)
            picks = [s[rng.integers(0, len(s), config.states_per_episode)] for s in seqs if len(s)]
            new = collect_from_states(expert, env_id, np.concatenate(picks), max_steps=config.label_steps)
            visited = len(seqs)
            ExpertDataset(env_id, new, expert_id=dataset.expert_id, extra={
                "dagger_run": key, "dagger_round": r, "visited_episodes": visited,
                "rng_state": rng.bit_generator.state}).save(run_dir / "labels.npz")
        else:
            new, visited = labels.trajectories, int(labels.extra["visited_episodes"])
            rng.bit_generator.state = labels.extra["rng_state"]
        dataset = ExpertDataset(env_id, dataset.trajectories + new, expert_id=dataset.expert_id, seed=dataset.seed,
                                extra={**dataset.extra, "dagger_rounds": r + 1})
        if r in done:  # trained and scored by an earlier call
            log.append(done[r])
            policy = DEQMPCPolicy.load(run_dir / "best", device=policy.device)
        else:
            res = ImitationTrainer(policy, dataset, round_cfg, run_dir, progress=False).train(
                resume=(run_dir / "checkpoint.pt").exists(), deadline=deadline)
            policy = DEQMPCPolicy.load(run_dir / "best", device=policy.device)
            log.append({"round": r, "visited_episodes": visited, "new_trajectories": len(new),
                        "dataset_trajectories": len(dataset), "best_val_loss": res.best_val_loss,
                        "lr": round_cfg.lr})
            if config.select_episodes:
                log[-1]["closed_loop_score"] = validate(policy)
        if config.select_episodes:
            score = log[-1]["closed_loop_score"]
            since_best += 1
            if score > best_score:  # a fresh copy: the next round trains ``policy`` in place
                best_score, best_policy = score, DEQMPCPolicy.load(run_dir / "best", device=policy.device)
                since_best = 0
            elif config.plateau_lr_factor < 1:  # the next round: back to the best policy, at a lower rate
                lr_scale *= config.plateau_lr_factor
                policy = copy.deepcopy(best_policy)
        if r not in done:  # (the record holds the finished rounds already)
            atomic_write_text(out / "dagger.json", json.dumps({"config": asdict(config), "run": key, "rounds": log},
                                                              indent=2))
        if config.patience and since_best >= config.patience:
            break
    return (best_policy if config.select_episodes else policy), dataset


def lineage(rounds: Sequence[dict[str, Any]], kept: int, restarts: bool) -> list[dict[str, Any]]:
    """The rounds of ``dagger.json`` (``rounds``: its entries, ``-1`` the starting policy) that the policy of round
    ``kept`` was trained through, in order, as :func:`dagger` chains them: each round continues the previous one,
    or with ``restarts`` (``plateau_lr_factor < 1``) the best-scoring policy before it when the previous round did
    not beat that. Empty for ``kept = -1``."""
    chains: dict[int, list[dict[str, Any]]] = {-1: []}
    best = next((e["closed_loop_score"] for e in rounds if e["round"] == -1), -float("inf"))
    best_round = prev = -1
    for e in sorted((e for e in rounds if e["round"] >= 0), key=lambda e: e["round"]):
        parent = best_round if restarts and prev != best_round else prev
        chains[int(e["round"])] = chains[parent] + [e]
        if e["closed_loop_score"] > best:
            best, best_round = e["closed_loop_score"], int(e["round"])
        prev = int(e["round"])
    return chains[kept]


def _run_key(policy: Any, dataset: ExpertDataset, env_id: str, config: DaggerConfig) -> str:
    """What identifies a DAgger run across calls (hex, 16 digits): the env, the settings except ``rounds``,
    ``patience``, ``plateau_lr_factor`` and ``min_lr`` (they shape only the rounds not yet run), the starting
    policy's weights and the starting dataset."""
    from deqmpc_gym.training.rundir import dataset_fingerprint

    h = hashlib.sha256(env_id.encode())
    settings = {k: v for k, v in asdict(config).items()
                if k not in ("rounds", "patience", "plateau_lr_factor", "min_lr")}
    h.update(json.dumps(settings, sort_keys=True).encode())
    state = policy.layer.state_dict()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().cpu().contiguous().numpy().tobytes())
    h.update(dataset_fingerprint(dataset).encode())
    return h.hexdigest()[:16]


def _finished_rounds(path: Path, key: str) -> dict[int, dict[str, Any]]:
    """The rounds an earlier call of the same run (``key``) finished, by round (-1: the starting policy's score),
    from its ``dagger.json``; empty for a new folder or a record without a run key (rounds are then redone from
    their folders). Raises :class:`ConfigError` for a record of another run."""
    if not path.is_file():
        return {}
    try:
        rec = json.loads(path.read_text())
        rounds = {int(e["round"]): e for e in rec.get("rounds", [])}
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise ConfigError(f"{path} is not a readable DAgger record ({e}); delete it or choose another folder") from e
    if "run" not in rec:
        return {}
    if rec["run"] != key:
        raise ConfigError(f"{path.parent} holds another DAgger run (other settings than rounds / patience, another "
                          f"starting policy or dataset): choose a new output folder, or repeat that run's call")
    return rounds


def _check_round_rate(entry: dict[str, Any], lr: float, run_dir: Path) -> None:
    """Raise :class:`ConfigError` if the finished round ``entry`` of ``dagger.json`` was trained at another rate than
    ``lr``, the one this call's schedule gives it (entries without a rate are not checked)."""
    if "lr" in entry and not math.isclose(float(entry["lr"]), lr, rel_tol=1e-9):
        raise ConfigError(f"{run_dir.name} was trained at lr {entry['lr']:.3g}, but this call's schedule gives it "
                          f"{lr:.3g} (the rate, plateau_lr_factor or min_lr differ from that run's): repeat the call "
                          f"with the run's settings, or delete {run_dir.name} and the later round folders and their "
                          f"entries in {run_dir.parent / 'dagger.json'} to train them again")


def _read_labels(path: Path, env_id: str, key: str, r: int) -> ExpertDataset | None:
    """Round ``r``'s expert labels saved by an earlier call of the run ``key``, or None if there are none.
    Raises :class:`ConfigError` for labels of another run."""
    if not path.is_file():
        return None
    try:
        labels = ExpertDataset.load(path, env_id=env_id)
    except DatasetError as e:
        raise ConfigError(f"{path} cannot be read ({e}); delete it to label round {r} again") from e
    if labels.extra.get("dagger_run") != key or labels.extra.get("dagger_round") != r:
        raise ConfigError(f"{path} holds the labels of another DAgger run: choose a new output folder, or repeat "
                          "that run's call")
    return labels
