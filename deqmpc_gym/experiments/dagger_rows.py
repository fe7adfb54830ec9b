"""DAgger rows of Table 1 (beyond the paper's protocol): every finished Table 1 run of a scale continued by DAgger
under one fixed protocol, recorded and tabulated like the Table 1 runs, so that each "+ DAgger" cell has its seeds
and its spread.

``dagger_rows(scale="paper64", envs=..., variants=..., seeds=...)`` starts from the best policy of each run
``<out>/table1-<scale>/train/<run>/best`` (trained by ``reproduce table1`` first) and its 300- or 2000-trajectory
dataset, runs :func:`~deqmpc_gym.experiments.dagger.dagger` with :data:`PROTOCOLS` (the DAgger seed is the run's
seed) in ``<out>/dagger-<scale>/train/<run>/`` (resumable: round folders, ``dagger.json``, the returned policy in
``best/``), evaluates the returned policy as Table 1 evaluates its runs (200 episodes, seeds 10000+, the dataset
expert on the same episodes) and writes the run record ``<out>/dagger-<scale>/runs/<run>.json`` with the fields of
a Table 1 record plus ``protocol``, ``command``, ``windows_seen`` and the per-round validation scores. At the end
``<out>/dagger-<scale>.{json,md,png}`` and ``-curves.png`` summarise every recorded run; ``deqmpc-gym zoo ship
--from <out>/dagger-<scale>`` packages the best seed of each cell with its card.

``patience=N`` makes another labelled row, ``<out>/dagger-<scale>-patience<N>/``: the same protocol stopping after
``N`` rounds in a row without a better score (and, for a longer patience, a cap on the rounds raised in
proportion, :func:`protocol`). A run of it starts from a copy of the protocol row's run folder when
that folder holds every finished round (``dagger.json`` leaves ``patience`` out of a run's identity), so a longer
patience costs only the rounds it adds.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deqmpc_gym.errors import ConfigError
from deqmpc_gym.experiments.dagger import DaggerConfig, lineage
from deqmpc_gym.experiments.launch import Job, LaunchConfig, connection
from deqmpc_gym.experiments.reproduce import (
    SCALES,
    _collect_datasets,
    _job_device,
    _short,
    _write_table,
    check_selection,
    final_evaluation,
    git_commit,
    run_and_record,
    run_name,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["DaggerProtocol", "PROTOCOLS", "protocol", "row_name", "dagger_run", "dagger_rows"]


@dataclass(frozen=True)
class DaggerProtocol:
    """How a DAgger row continues a Table 1 run.

    Attributes:
        dagger: the rounds (its ``seed`` is replaced by the run's seed): up to 8 rounds of 1,000 steps, 100 policy
            rollouts x 8 visited states per round labelled by 60 expert steps, each round scored in closed loop on
            100 validation episodes (seeds 30000+), the best-scoring round kept, stop after 3 rounds in a row
            without a better score.
        batch_size, lr, val_batches, val_every: each round's training.
    """

    dagger: DaggerConfig = field(default_factory=lambda: DaggerConfig(rounds=8, states_per_episode=8,
                                                                      select_episodes=100, patience=3))
    batch_size: int = 64
    lr: float = 1e-3
    val_batches: int = 10
    val_every: int = 100


#: The protocol per scale (others: ``DaggerProtocol()``); ``tiny`` is a smoke test. The ``cpu`` scale's runs start far
#: lower on the pole tasks (QPole 0.1-0.2), where rounds at lr 1e-3 climb to about 0.65 in 4 rounds and stall (QPole
#: DEQ-MPC-NN seed 0); its rows go on until 3 rounds in a row bring no better score (at most 20 rounds), each such
#: round sending the next back to the best policy at 0.3 x the rate (``plateau_lr_factor``) but never below 3e-4
#: (``min_lr``; 1e-3, then 3e-4). The floor: on the pole tasks the rounds at 3e-4 made the climbs (QPole DEQ-MPC-NN
#: 0.65 -> 0.93 in 3 rounds; by hand, QPoleObs DEQ-MPC-NN 0.73 -> 0.95 and DEQ-MPC-DEQ 0.70 -> 0.95 in 5-6 rounds),
#: while rounds at 9e-5 and below moved the validation score within its noise. The cap of 20: at a cap of 12, three of
#: the first four runs kept one of their last three rounds, and QPoleObs DEQ-MPC-NN seed 0 was still climbing (0.835 /
#: 0.858 / 0.906 / 0.915 in rounds 9-12).
PROTOCOLS: dict[str, DaggerProtocol] = {
    "cpu": DaggerProtocol(DaggerConfig(rounds=20, states_per_episode=8, select_episodes=100, patience=3,
                                       plateau_lr_factor=0.3, min_lr=3e-4)),
    "tiny": DaggerProtocol(DaggerConfig(rounds=2, episodes=2, states_per_episode=1, label_steps=4, train_steps=2,
                                        max_steps=8, select_episodes=2), batch_size=8, val_batches=1, val_every=1),
}


def protocol(scale: str, patience: int | None = None) -> DaggerProtocol:
    """The DAgger protocol of the rows of ``scale``, stopping after ``patience`` rounds without a better score
    instead of the protocol's own (``None``: the protocol's).

    A longer patience raises the cap on the rounds in proportion (``cpu``: 20 rounds at patience 3, 40 at
    patience 6), so that the patience, not the cap, ends the runs: at patience 6 and a cap of 20, six of the
    twelve QPoleObs runs reached the cap, one of them with its best score in its last round."""
    proto = PROTOCOLS.get(scale, DaggerProtocol())
    if patience is None or patience == proto.dagger.patience:
        return proto
    rounds = proto.dagger.rounds
    if proto.dagger.patience and patience > proto.dagger.patience:
        rounds = -(-rounds * patience // proto.dagger.patience)  # ceil
    return replace(proto, dagger=replace(proto.dagger, patience=patience, rounds=rounds))


def row_name(scale: str, patience: int | None = None) -> str:
    """The folder of the DAgger rows of ``scale`` (``dagger-<scale>``; with a ``patience`` other than the
    protocol's ``dagger-<scale>-patience<N>``)."""
    if patience is None or patience == protocol(scale).dagger.patience:
        return f"dagger-{scale}"
    return f"dagger-{scale}-patience{patience}"


def _seed_from_protocol_row(source: Path, run_dir: Path) -> bool:
    """Start ``run_dir`` (a run of a longer-patience row) as a copy of ``source``, the same run of the protocol's
    row, if ``run_dir`` does not exist yet and ``source`` holds ``dagger.json`` with every finished round's folder
    (its policy ``best/``; a run packed for a fresh clone keeps only the finished rounds' ``best/``, which is
    enough: the labels are rolled out again). Returns whether it copied; an unreadable ``dagger.json`` copies
    nothing (the run then starts from its Table 1 policy)."""
    import shutil

    record = source / "dagger.json"
    if run_dir.exists() or not record.is_file():
        return False
    try:
        rounds = [int(e["round"]) for e in json.loads(record.read_text()).get("rounds", []) if int(e["round"]) >= 0]
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return False
    if not all((source / f"round_{r}" / "best" / "policy.pt").is_file() for r in rounds):
        return False
    tmp = run_dir.with_name(run_dir.name + ".copying")
    if tmp.exists():
        shutil.rmtree(tmp)
    # not the top-level best/: the protocol row's returned policy
    shutil.copytree(source, tmp, ignore=lambda folder, names: ["best"] if Path(folder) == source else [])
    tmp.rename(run_dir)
    return True


def _kept_round(rounds: Sequence[dict[str, Any]]) -> int:
    """The round :func:`~deqmpc_gym.experiments.dagger.dagger` returned: the first with the highest closed-loop
    score (-1: the starting policy)."""
    best, kept = -float("inf"), -1
    for e in rounds:
        if e["closed_loop_score"] > best:
            best, kept = e["closed_loop_score"], int(e["round"])
    return kept


def _protocol_text(base: dict[str, Any], scale: str, proto: DaggerProtocol, rounds: Sequence[dict[str, Any]],
                   kept: int) -> str:
    d = proto.dagger
    scores = " / ".join(f"{e['closed_loop_score']:.3f}" for e in rounds if e["round"] >= 0)
    start = next(e["closed_loop_score"] for e in rounds if e["round"] == -1)
    return (f"DAgger: the {scale}-scale Table 1 policy of seed {base['seed']} ({base['train_steps']:,} steps at batch "
            f"{base['batch_size']} on {base['num_trajectories']} expert trajectories, score "
            f"{base['normalized_score']:.2f}), then up to {d.rounds} DAgger rounds of {d.train_steps:,} steps at batch "
            f"{proto.batch_size} on the policy's own states labelled by the expert ({d.episodes} rollouts x "
            f"{d.states_per_episode} states, {d.label_steps}-step labels), the round kept by its closed-loop score on "
            f"{d.select_episodes} validation episodes, seeds {d.select_seed}+, "
            + (f"a round without a better score sending the next back to the best policy at {d.plateau_lr_factor} x "
               f"the rate (from {proto.lr:g}" + (f", never below {d.min_lr:g}" if d.min_lr else "") + "), "
               if d.plateau_lr_factor < 1 else "")
            + f"stopping after {d.patience} rounds without a better score: {start:.3f} before, {scores} after rounds "
            f"1-{len(rounds) - 1}; "
            + ("the starting policy kept" if kept < 0 else f"round {kept + 1} kept"))


def _record_is_final(record: Path, proto: DaggerProtocol) -> bool:
    """Whether the run record ``record`` is a finished run of ``proto``: its rounds ended by the patience or by the
    cap on the rounds. A record whose rounds stopped at a lower cap (a row whose cap was raised since) is not: its
    run goes on from its folder. An unreadable record counts as final (it is not overwritten)."""
    try:
        rounds = json.loads(record.read_text())["dagger_rounds"]
        done = [e for e in rounds if int(e["round"]) >= 0]
    except (OSError, ValueError, TypeError, KeyError):
        return True
    d = proto.dagger
    if len(done) >= d.rounds:
        return True
    return bool(d.patience) and len(done) - 1 - _kept_round(rounds) >= d.patience


def dagger_run(env_id: str, variant: str, seed: int, scale: str, out_dir: str | Path,
               device: str | torch.device = "cpu", deadline: float | None = None,
               patience: int | None = None) -> dict[str, Any]:
    """Continue the finished Table 1 run ``(env_id, variant, seed)`` of ``scale`` in ``out_dir`` by the DAgger
    protocol of the scale (with ``patience``: stopping after that many rounds without a better score, in the row
    :func:`row_name`), evaluate the returned policy and return its run record (resumes an interrupted call).

    ``deadline`` (a ``time.time()`` instant): the round training stops at a checkpoint after it and raises
    :class:`~deqmpc_gym.errors.TrainingInterrupted` (``reason="time limit"``); the same call later resumes it.

    Raises:
        ConfigError: the Table 1 run is not finished (no record or no ``best/`` policy).
    """
    from deqmpc_gym.experiments.dagger import dagger
    from deqmpc_gym.experts import dataset_expert_kind, load_expert, load_or_collect_dataset
    from deqmpc_gym.policies import DEQMPCPolicy
    from deqmpc_gym.training import TrainConfig

    out = Path(out_dir)
    name, short, proto = run_name(env_id, variant, seed), _short(env_id), protocol(scale, patience)
    table = out / f"table1-{scale}"
    base_file, base_best = table / "runs" / f"{name}.json", table / "train" / name / "best"
    if not base_file.is_file() or not (base_best / "policy.pt").is_file():
        raise ConfigError(f"DAgger continues the Table 1 run {name}, which is not finished in {table} (its record "
                          f"and best/ policy); train it first: deqmpc-gym reproduce table1 --scale {scale} --envs "
                          f"{env_id} --variants {variant} --seeds {seed} --out {out}")
    base = json.loads(base_file.read_text())
    data = load_or_collect_dataset(env_id, SCALES[scale].num_trajectories[short], seed=0, cache_dir=out / "datasets")
    expert = load_expert(env_id, kind=dataset_expert_kind(env_id))
    policy = DEQMPCPolicy.load(base_best, env=env_id, device=device)
    row = row_name(scale, patience)
    labelled = row != f"dagger-{scale}"  # a longer-patience row: its runs start from the protocol row's
    run_dir = out / row / "train" / name
    if labelled:
        _seed_from_protocol_row(out / f"dagger-{scale}" / "train" / name, run_dir)
    t0 = time.perf_counter()
    train = TrainConfig(batch_size=proto.batch_size, lr=proto.lr, val_batches=proto.val_batches,
                        val_every=proto.val_every)
    tuned, _ = dagger(policy, expert, data, env_id, run_dir, replace(proto.dagger, seed=seed), train,
                      deadline=deadline)
    tuned.save(run_dir / "best")
    rounds = json.loads((run_dir / "dagger.json").read_text())["rounds"]
    kept = _kept_round(rounds)
    steps = proto.dagger.train_steps
    trained = lineage(rounds, kept, proto.dagger.plateau_lr_factor < 1)  # the rounds the kept policy went through
    round_time = sum(float(json.loads((run_dir / f"round_{e['round']}" / "result.json").read_text())["wall_time_s"])
                     for e in trained)
    base_windows = base["train_steps"] * base["batch_size"]
    curve = list(base.get("curve", [])) + [
        {"step": base["train_steps"] + (e["round"] + 1) * steps,
         "windows": base_windows + (e["round"] + 1) * steps * proto.batch_size,
         "val_loss": e["best_val_loss"], "score": e["closed_loop_score"]} for e in rounds if e["round"] >= 0]
    return {"env_id": env_id, "variant": variant, "seed": seed,
            **final_evaluation(tuned, env_id, SCALES[scale].eval_episodes[short]),
            "best_val_loss": trained[-1]["best_val_loss"] if trained else base["best_val_loss"],
            "train_steps": base["train_steps"] + len(trained) * steps, "hidden": base["hidden"],
            "wall_time_s": time.perf_counter() - t0,
            # the base run's training plus the DAgger rounds the kept policy went through (rollouts excluded)
            "train_time_s": base.get("train_time_s", base["wall_time_s"]) + round_time,
            "batch_size": proto.batch_size, "windows_seen": base_windows + len(trained) * steps * proto.batch_size,
            "num_trajectories": base["num_trajectories"],
            "dagger_trajectories": next((e["dataset_trajectories"] for e in trained[-1:]), base["num_trajectories"]),
            "dagger_rounds": rounds, "dagger_kept_round": kept, "base_score": base["normalized_score"],
            "curve": curve, "commit": git_commit(), "base_commit": base.get("commit"),
            "protocol": _protocol_text(base, scale, proto, rounds, kept),
            "command": (f"deqmpc-gym reproduce table1 --scale {scale} --envs {env_id} --variants {variant} --seeds "
                        f"{seed}; deqmpc-gym reproduce dagger --scale {scale} --envs {env_id} --variants {variant} "
                        f"--seeds {seed}" + (f" --patience {patience}" if labelled else ""))}


def dagger_rows(*, scale: str = "paper64", seeds: Sequence[int] | None = None, envs: Sequence[str] | None = None,
                variants: Sequence[str] | None = None, out_dir: str | Path = "results",
                device: str | torch.device = "cpu", launch: LaunchConfig | None = None,
                patience: int | None = None) -> Path:
    """Run (or resume) the DAgger rows of ``scale`` for a Table 1 selection whose runs are finished in
    ``out_dir/table1-<scale>``; returns ``out_dir/dagger-<scale>`` (with a ``patience`` other than the protocol's,
    the labelled row ``out_dir/dagger-<scale>-patience<N>``, see the module docstring). Recorded runs are skipped;
    each finished run's record is written as it completes. A recorded run that stopped at a lower cap on the rounds
    than the protocol's goes on from its folder and its record is replaced.

    Raises:
        ConfigError: an unknown scale, env, variant or seed; ``patience`` < 1.
        SweepError: a run failed (e.g. its Table 1 run is not finished; named, the others went on).
        TimeLimitReached: ``launch.deadline`` passed first (the unfinished runs resume in a later call).
    """
    launch = launch or LaunchConfig()
    if scale not in SCALES:
        raise ConfigError(f"unknown scale {scale!r}; valid: {sorted(SCALES)}")
    if patience is not None and (isinstance(patience, bool) or not isinstance(patience, int) or patience < 1):
        raise ConfigError(f"patience must be an integer >= 1 (rounds in a row without a better score), got "
                          f"{patience!r}")
    envs, variants = check_selection(envs, variants, seeds)
    sc = SCALES[scale]
    row = row_name(scale, patience)
    root = Path(out_dir) / row
    runs_dir = root / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    proto = protocol(scale, patience)

    def final(record: Path) -> bool:
        return record.exists() and _record_is_final(record, proto)

    jobs = [Job(run_name(e, v, s), dagger_run, (e, v, s, scale, str(out_dir)),
                {"device": _job_device(device, launch), "deadline": launch.deadline, "patience": patience})
            for e in envs for s in (seeds if seeds is not None else sc.seeds[_short(e)]) for v in variants
            if not final(runs_dir / f"{run_name(e, v, s)}.json")]
    _collect_datasets({j.args[0] for j in jobs}, sc, Path(out_dir) / "datasets")

    try:
        with connection(launch):
            run_and_record(jobs, launch, runs_dir, detail="Table 1 run: {base_score:.3f}")
    finally:
        # a run being continued (its record made at a lower cap) is left out until its new record replaces it
        _write_table(runs_dir, out_dir, row.removeprefix("dagger-"), envs, variants, prefix="dagger", final=final)
    return root
