"""Learning-curve sweeps: the closed-loop score against training windows for a grid of network widths and dataset
sizes (one env, one variant), to choose both before long runs.

Each grid point is a Table 1 run (:func:`~deqmpc_gym.experiments.reproduce.run_one`: same training, evaluation and
learning curve) with the point's ``hidden`` and number of expert trajectories, in its own folder
``<out>/sweep-<Env>-<variant>/h<hidden>-n<trajectories>/``. The sweep is resumable like Table 1: a finished point
writes ``runs/h<hidden>-n<trajectories>.json`` and is skipped when the command runs again; an unfinished one
resumes from its checkpoint. At the end ``sweep-<Env>-<variant>.json`` (every record) and ``.png`` (score and
validation loss against windows, one line per point) are written beside the folder.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deqmpc_gym._config import require_at_least_one
from deqmpc_gym.errors import ConfigError
from deqmpc_gym.experiments.launch import Job, LaunchConfig, connection
from deqmpc_gym.experiments.reproduce import (
    SCALES,
    Scale,
    _job_device,
    _short,
    check_selection,
    run_and_record,
    run_one,
)
from deqmpc_gym.io import atomic_write, atomic_write_text

if TYPE_CHECKING:  # pragma: no cover
    import torch


@dataclass(frozen=True)
class SweepConfig:
    """A learning-curve sweep over ``hidden x trajectories`` (defaults: QPole, DEQ-MPC-NN).

    Attributes:
        env_id: a Table 1 env. variant: a Table 1 variant.
        hidden: network widths (multiples of 4). trajectories: expert dataset sizes.
        steps: training steps per point; batch_size: windows per step.
        curve_every: the closed-loop score every this many steps, over ``curve_episodes`` episodes (seeds 20000+).
        eval_episodes: final evaluation episodes (seeds 10000+). seed: training seed.
        base_scale: the :data:`~deqmpc_gym.experiments.reproduce.SCALES` entry the other settings come from
            (validation batches and interval).
    """

    env_id: str = "DEQMPC/QPole-v0"
    variant: str = "deq-mpc-nn"
    hidden: tuple[int, ...] = (64, 128)
    trajectories: tuple[int, ...] = (300, 1000)
    steps: int = 3000
    batch_size: int = 64
    curve_every: int = 500
    curve_episodes: int = 20
    eval_episodes: int = 50
    seed: int = 0
    base_scale: str = "cpu"

    def __post_init__(self) -> None:
        _, variants = check_selection([self.env_id], [self.variant], [self.seed])
        object.__setattr__(self, "variant", variants[0])
        for name in ("hidden", "trajectories"):
            values = getattr(self, name)
            if not isinstance(values, tuple) or not values or any(
                    isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
                raise ConfigError(f"SweepConfig.{name} must be a non-empty tuple of integers >= 1, got {values!r}")
            if len(set(values)) != len(values):
                raise ConfigError(f"SweepConfig.{name} repeats a value: {values!r}")
        if any(h % 4 for h in self.hidden):
            raise ConfigError(f"SweepConfig.hidden values must be divisible by 4, got {self.hidden!r}")
        require_at_least_one(self, ("steps", "batch_size", "curve_episodes", "eval_episodes"))
        require_at_least_one(self, ("curve_every",), minimum=0)
        if self.base_scale not in SCALES:
            raise ConfigError(f"unknown base_scale {self.base_scale!r}; valid: {sorted(SCALES)}")

    def points(self) -> list[tuple[int, int]]:
        """The grid's ``(hidden, trajectories)`` points, widths first."""
        return [(h, n) for h in self.hidden for n in self.trajectories]

    def scale(self, hidden: int, trajectories: int) -> Scale:
        """The :class:`~deqmpc_gym.experiments.reproduce.Scale` of one point (only this env's entries change)."""
        base, short = SCALES[self.base_scale], _short(self.env_id)
        return dataclasses.replace(
            base, hidden={**base.hidden, short: hidden}, steps={**base.steps, short: self.steps},
            batch_size={**base.batch_size, short: self.batch_size},
            num_trajectories={**base.num_trajectories, short: trajectories},
            eval_episodes={**base.eval_episodes, short: self.eval_episodes}, curve_every=self.curve_every,
            curve_episodes=self.curve_episodes)


def point_name(hidden: int, trajectories: int) -> str:
    return f"h{hidden}-n{trajectories}"


def learning_curve_sweep(config: SweepConfig = SweepConfig(), *, out_dir: str | Path = "results",
                         device: str | torch.device = "cpu", launch: LaunchConfig | None = None) -> Path:
    """Run (or resume) the sweep's points not recorded yet; returns the plot written
    (``<out_dir>/sweep-<Env>-<variant>.png``).

    Raises:
        SweepError: after every point ran, naming those that failed (the others are recorded).
    """
    launch = launch or LaunchConfig()
    stem = f"sweep-{_short(config.env_id)}-{config.variant}"
    root = Path(out_dir) / stem
    runs_dir = root / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    data_dir = Path(out_dir) / "datasets"
    todo = [(h, n) for h, n in config.points() if not (runs_dir / f"{point_name(h, n)}.json").exists()]
    jobs = [Job(point_name(h, n), run_one, (config.env_id, config.variant, config.seed, config.scale(h, n),
                                            root / point_name(h, n), data_dir),
                {"device": _job_device(device, launch), "deadline": launch.deadline})
            for h, n in todo]
    _collect(config, {n for _, n in todo}, data_dir)

    try:
        with connection(launch):
            run_and_record(jobs, launch, runs_dir)
    finally:
        records = [json.loads(p.read_text()) for p in sorted(runs_dir.glob("*.json"))]
        atomic_write_text(Path(out_dir) / f"{stem}.json", json.dumps(records, indent=2))
        sweep_plot(records, Path(out_dir) / f"{stem}.png", title=f"{_short(config.env_id)} {config.variant}")
    return Path(out_dir) / f"{stem}.png"


def _collect(config: SweepConfig, sizes: set[int], data_dir: Path) -> None:
    """The expert datasets of the points to run, collected once before jobs run in parallel."""
    from deqmpc_gym.experts import load_or_collect_dataset

    for n in sorted(sizes):
        load_or_collect_dataset(config.env_id, n, seed=0, cache_dir=data_dir)


def sweep_plot(records: Sequence[dict[str, Any]], path: Path, title: str = "") -> bool:
    """Closed-loop score (top) and validation loss (bottom) against training windows, one line per record
    (``h<hidden> n<trajectories>``, final score in the legend); False (nothing written) without records."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not records:
        return False
    fig, (a0, a1) = plt.subplots(2, 1, figsize=(5.2, 6.0), sharex=True)
    for r in sorted(records, key=lambda r: (r["hidden"], r["num_trajectories"])):
        label = f"h{r['hidden']} n{r['num_trajectories']}: {r['normalized_score']:.2f}"
        pts = [c for c in r.get("curve", []) if "score" in c]
        line = a0.plot([c["windows"] for c in pts], [c["score"] for c in pts], marker=".", label=label)[0]
        a1.plot([c["windows"] for c in r.get("curve", [])], [c["val_loss"] for c in r.get("curve", [])],
                color=line.get_color())
    a0.axhline(1.0, color="k", lw=0.6, ls="--")
    a0.set(ylabel="normalized return (curve episodes)", title=title)
    a0.legend(fontsize=7, title="hidden, trajectories: final score", title_fontsize=7)
    a1.set(yscale="log", xlabel="training windows", ylabel="validation loss")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return True
