"""PPO experts over several seeds, one job per seed, in this process or as Ray tasks
(:mod:`deqmpc_gym.experiments.launch`).

Seed ``s`` trains into ``out_dir/s<s>/`` (its checkpoint, ``progress.csv``, ``actor.pt`` and ``card.json``, as
:func:`~deqmpc_gym.experts.train_expert` writes them; an interrupted seed resumes from its checkpoint). As each seed
finishes, the calling process adds its record to ``out_dir/seeds.json`` (atomically): the card's quality figures,
or ``"paused"`` for a seed stopped at ``max_slices``. The records do not depend on the launcher.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from deqmpc_gym.errors import ConfigError
from deqmpc_gym.experiments.launch import Job, LaunchConfig, run_jobs
from deqmpc_gym.experts import ExpertConfig, train_expert
from deqmpc_gym.io import atomic_write_text

#: the card entries a seed's record keeps
RECORD_KEYS = ("train_steps", "wall_time_s", "mean_return", "std_return", "success_rate", "collision_rate",
               "random_return", "eval_episodes")


def seed_dir(out_dir: str | Path, seed: int) -> Path:
    """The output folder of ``seed`` inside ``out_dir`` (``out_dir/s<seed>``)."""
    return Path(out_dir) / f"s{seed}"


def train_seed(config: ExpertConfig, out_dir: str, resume: bool, max_slices: int | None) -> dict[str, Any] | None:
    """One seed's job (importable by Ray workers): :func:`~deqmpc_gym.experts.train_expert` without progress
    output; returns the card, or None when paused at ``max_slices``."""
    return train_expert(config, out_dir, resume=resume, progress=False, max_slices=max_slices)


def train_expert_seeds(config: ExpertConfig, seeds: Sequence[int], out_dir: str | Path,
                       launch: LaunchConfig | None = None, *, resume: bool = True,
                       max_slices: int | None = None) -> dict[int, dict[str, Any]]:
    """Train ``config`` once per seed (``dataclasses.replace(config, seed=s)``) with ``launch``.

    Args:
        config: the expert settings; its ``seed`` is replaced by each of ``seeds``.
        seeds: distinct seeds.
        out_dir: the parent folder (see the module docstring).
        launch: :class:`~deqmpc_gym.experiments.launch.LaunchConfig` (None: in this process, one after another).
        resume, max_slices: as :func:`~deqmpc_gym.experts.train_expert`.

    Returns:
        ``{seed: record}`` of the seeds that finished or paused (also in ``out_dir/seeds.json``).

    Raises:
        ConfigError: no seeds, or a seed given twice.
        SweepError: some seeds failed (the others finished and were recorded); names them.
    """
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds must be distinct and at least one, got {seeds}")
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    record_file = root / "seeds.json"
    records: dict[int, dict[str, Any]] = {}
    if record_file.exists():
        records = {int(k): v for k, v in json.loads(record_file.read_text()).get("seeds", {}).items()}
    jobs = [Job(f"{config.env_id.split('/')[-1]}-s{s}", train_seed,
                (dataclasses.replace(config, seed=s), str(seed_dir(root, s)), resume, max_slices)) for s in seeds]
    by_name = {job.name: s for job, s in zip(jobs, seeds)}

    def on_done(name: str, card: dict[str, Any] | None) -> None:
        s = by_name[name]
        records[s] = {"seed": s, "out": str(seed_dir(root, s)), "status": "paused" if card is None else "done",
                      **({} if card is None else {k: card[k] for k in RECORD_KEYS if k in card})}
        atomic_write_text(record_file, json.dumps({"env_id": config.env_id, "seeds": {
            str(k): records[k] for k in sorted(records)}}, indent=2))

    run_jobs(jobs, launch or LaunchConfig(), on_done)
    return {s: records[s] for s in seeds if s in records}
