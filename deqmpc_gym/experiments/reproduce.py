"""Reproduction of the paper's Table 1 (four variants x five envs x seeds) and the warm-start ablation (Fig. 7).

The sweep is resumable: each finished run writes ``<out>/table1-<scale>/runs/<env>__<variant>__s<seed>.json``
and is skipped when the command is run again; training itself resumes from its checkpoint. At the end the
markdown table (mean ± std of normalized scores), a JSON of every run (``<out>/table1-<scale>.json``) and a bar
plot are written.
"""

from __future__ import annotations

import json
import math
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from deqmpc_gym.errors import ConfigError
from deqmpc_gym.evaluation.rollouts import protocol_stream_iters
from deqmpc_gym.experiments.launch import Job, LaunchConfig, connection, run_jobs
from deqmpc_gym.io import atomic_write, atomic_write_text

if TYPE_CHECKING:  # pragma: no cover
    import torch

TABLE1_ENVS = ("DEQMPC/Pendulum-v0", "DEQMPC/Cartpole-v0", "DEQMPC/Quadrotor-v0", "DEQMPC/QPole-v0",
               "DEQMPC/QPoleObs-v0")
TABLE1_VARIANTS = ("diff-mpc-nn", "diff-mpc-deq", "deq-mpc-nn", "deq-mpc-deq")

#: The paper's Table 1 (normalized return, mean and std over 3 seeds).
PAPER_TABLE1: dict[str, dict[str, tuple[float, float]]] = {
    "diff-mpc-nn": {"Pendulum": (0.77, 0.04), "Cartpole": (0.93, 0.05), "Quadrotor": (0.96, 0.02),
                    "QPole": (0.76, 0.05), "QPoleObs": (0.83, 0.02)},
    "diff-mpc-deq": {"Pendulum": (0.78, 0.04), "Cartpole": (0.97, 0.06), "Quadrotor": (0.88, 0.01),
                     "QPole": (0.72, 0.03), "QPoleObs": (0.71, 0.05)},
    "deq-mpc-nn": {"Pendulum": (0.94, 0.02), "Cartpole": (1.00, 0.09), "Quadrotor": (1.00, 0.01),
                   "QPole": (0.87, 0.02), "QPoleObs": (0.94, 0.03)},
    "deq-mpc-deq": {"Pendulum": (0.94, 0.04), "Cartpole": (1.13, 0.01), "Quadrotor": (0.98, 0.01),
                    "QPole": (0.85, 0.03), "QPoleObs": (0.90, 0.03)},
}


@dataclass(frozen=True)
class Scale:
    """Sizes of one reproduction scale.

    Attributes:
        hidden, steps, batch_size, num_trajectories, eval_episodes, seeds: per env (short name);
        val_batches / val_every: validation.
        curve_every / curve_episodes: the learning curve's closed-loop score every this many steps, over this
            many episodes (seeds 20000+, apart from the final evaluation's); ``curve_every = 0`` disables it.
    """

    hidden: dict[str, int]
    steps: dict[str, int]
    batch_size: dict[str, int]
    val_batches: int
    val_every: int
    num_trajectories: dict[str, int]
    eval_episodes: dict[str, int]
    seeds: dict[str, tuple[int, ...]]
    curve_every: int = 0
    curve_episodes: int = 20


_PAPER_HIDDEN = {"Pendulum": 256, "Cartpole": 512, "Quadrotor": 512, "QPole": 1024, "QPoleObs": 1024}
_ALL = tuple(_PAPER_HIDDEN)
_QUADS = ("Quadrotor", "QPole", "QPoleObs")


def _per_env(small: int, quad: int) -> dict[str, int]:
    return {k: (quad if k in _QUADS else small) for k in _ALL}


# "cpu": sized so that one seed of the table fits a 2-core CPU session; 3 seeds per cell and 200 evaluation
# episodes (seeds 10000+) per run, as the paper (the quadrotor solver is ~10x more
# expensive per step than the pendulum's, hence smaller steps there). The Quadrotor gets 3600 steps (at 600 its
# DEQ-MPC-DEQ policy scored 0.12, at 1800 0.68: same run extended), QPole and QPoleObs 1800 (at 600 their variants
# scored 0.02-0.06; a QPole step costs about twice a Quadrotor step).
SCALES: dict[str, Scale] = {
    "paper": Scale(hidden=_PAPER_HIDDEN, steps=_per_env(20000, 20000), batch_size=_per_env(200, 200),
                   val_batches=100, val_every=100,
                   num_trajectories={"Pendulum": 300, "Cartpole": 300, "Quadrotor": 2000, "QPole": 2000,
                                     "QPoleObs": 2000},
                   eval_episodes=_per_env(200, 200), seeds={k: (0, 1, 2) for k in _ALL}),
    "cpu": Scale(hidden={k: 64 for k in _ALL},
                 steps={**_per_env(1000, 600), "Cartpole": 4000, "Quadrotor": 3600, "QPole": 1800, "QPoleObs": 1800},
                 batch_size=_per_env(64, 32),
                 val_batches=10, val_every=100, num_trajectories={k: 300 for k in _ALL},
                 eval_episodes=_per_env(200, 200), seeds={k: (0, 1, 2) for k in _ALL}, curve_every=500),
    # "zoo": the budgets of the shipped controllers that go beyond "cpu" (deqmpc_gym/pretrained_policies): on
    # Cartpole and the quadrotor-with-pole tasks the "cpu" runs stall at 0.2-0.7 while the validation loss still
    # falls, so these grow data (1000 expert trajectories) and capacity (hidden 128) with the budget. Pendulum and
    # Quadrotor keep the "cpu" sizes (their controllers ship from those runs).
    "zoo": Scale(hidden={**{k: 64 for k in _ALL}, "Cartpole": 128, "QPole": 128, "QPoleObs": 128},
                 steps={"Pendulum": 1000, "Cartpole": 10000, "Quadrotor": 3600, "QPole": 20000, "QPoleObs": 20000},
                 batch_size={**_per_env(64, 32), "QPole": 64, "QPoleObs": 64}, val_batches=10, val_every=200,
                 num_trajectories={**{k: 300 for k in _ALL}, "Cartpole": 1000, "QPole": 1000, "QPoleObs": 1000},
                 eval_episodes=_per_env(100, 100), seeds={k: (0, 1, 2) for k in _ALL}, curve_every=1000),
    # "paper64": the paper's training budget -- 20,000 steps of batch 200 (4 M windows), its dataset sizes -- at
    # hidden 64, what one CPU thread trains in hours rather than days (the paper's hidden 256-1024 cost 20-80 s per
    # step here). Its records: results/table1-paper64.md (scores against the "cpu" scale's in docs/results.md).
    "paper64": Scale(hidden={k: 64 for k in _ALL}, steps=_per_env(20000, 20000), batch_size=_per_env(200, 200),
                     val_batches=10, val_every=500,
                     num_trajectories={"Pendulum": 300, "Cartpole": 300, "Quadrotor": 2000, "QPole": 2000,
                                       "QPoleObs": 2000},
                     eval_episodes=_per_env(200, 200), seeds={k: (0, 1, 2) for k in _ALL}, curve_every=2000),
    "tiny": Scale(hidden={k: 16 for k in _ALL}, steps=_per_env(4, 4), batch_size=_per_env(8, 8), val_batches=1,
                  val_every=2, num_trajectories={k: 4 for k in _ALL}, eval_episodes=_per_env(2, 2),
                  seeds={k: (0,) for k in _ALL}, curve_every=2, curve_episodes=2),
}


def _short(env_id: str) -> str:
    return env_id.split("/")[-1].rsplit("-v", 1)[0]


def git_commit(package: str | Path | None = None) -> str | None:
    """The commit of the package's checkout (``git describe --always``, the code that made a record), with
    ``-dirty`` when the package's Python sources (under ``package``, default this package's folder) differ from
    it; None outside a git checkout. Other files -- the ``results/`` a reproduction writes, the controllers and
    cards ``zoo ship`` writes into the package -- do not make it dirty."""
    package = Path(__file__).resolve().parents[1] if package is None else Path(package)
    try:
        out = subprocess.run(["git", "describe", "--always", "--abbrev=12"], capture_output=True, text=True,
                             timeout=10, cwd=package)
        if out.returncode != 0 or not out.stdout.strip():
            return None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":(glob)**/*.py"],
                                capture_output=True, text=True, timeout=10, cwd=package)
    except (OSError, subprocess.SubprocessError):
        return None
    dirty = status.returncode != 0 or bool(status.stdout.strip())
    return out.stdout.strip() + ("-dirty" if dirty else "")


def run_name(env_id: str, variant: str, seed: int) -> str:
    return f"{_short(env_id)}__{variant}__s{seed}"


def run_one(env_id: str, variant: str, seed: int, scale: Scale, out_dir: Path, data_dir: Path,
            device: str | torch.device = "cpu", deadline: float | None = None) -> dict[str, Any]:
    """Train and evaluate one (env, variant, seed) on ``device``; returns the run record.

    ``deadline`` (a ``time.time()`` instant): training stops at a checkpoint at the first step boundary after it
    and raises :class:`~deqmpc_gym.errors.TrainingInterrupted` (``reason="time limit"``); a later call resumes it.
    A run whose training ends before the deadline is evaluated whatever the time."""
    from deqmpc_gym.experts import load_expert, load_or_collect_dataset
    from deqmpc_gym.experts.reference import reference_returns
    from deqmpc_gym.policies import DEQMPCPolicy
    from deqmpc_gym.training import ImitationTrainer, TrainConfig

    short = _short(env_id)
    # collected once from the env's dataset expert (experts.dataset_expert_kind: the safety-filtered expert on the
    # obstacle tasks, PPO elsewhere) and cached; a cached file of another expert version is re-collected
    ds = load_or_collect_dataset(env_id, scale.num_trajectories[short], seed=0, cache_dir=data_dir)
    run_dir = out_dir / "train" / run_name(env_id, variant, seed)
    import torch

    torch.manual_seed(seed)
    policy = DEQMPCPolicy.from_env(env_id, variant, hidden=scale.hidden[short], device=device)
    cfg = TrainConfig(steps=scale.steps[short], batch_size=scale.batch_size[short], val_batches=scale.val_batches,
                      val_every=scale.val_every, seed=seed, eval_every=scale.curve_every)
    # scores are normalized by the expert that made the dataset, on the evaluated episodes
    ref = reference_returns(env_id, scale.eval_episodes[short])
    if ds.expert_id != ref["expert_id"]:
        raise ConfigError(f"the dataset of {env_id} was collected by {ds.expert_id!r}, but scores are normalized by "
                          f"{ref['expert_id']!r}; delete {data_dir} to collect it again")
    card = load_expert(env_id, kind=ref["expert_kind"]).card
    # the learning curve's episodes (seeds 20000+) are not the card's: the card's mean return is its reference
    evaluator = score_evaluator(env_id, scale.curve_episodes, (card["random_return"], card["mean_return"]),
                                protocol_stream_iters(env_id))
    t0 = time.perf_counter()
    trainer = ImitationTrainer(policy, ds, cfg, run_dir, progress=False, evaluator=evaluator)
    res = trainer.train(resume=True, deadline=deadline)
    best = DEQMPCPolicy.load(run_dir / "best", device=device)
    return {"env_id": env_id, "variant": variant, "seed": seed,
            **final_evaluation(best, env_id, scale.eval_episodes[short]), "best_val_loss": res.best_val_loss,
            "train_steps": res.steps, "hidden": scale.hidden[short], "wall_time_s": time.perf_counter() - t0,
            # training time of the whole run, over every resumed slice (wall_time_s: this call only)
            "train_time_s": res.history[-1]["time_s"] if res.history else res.wall_time_s,
            "batch_size": scale.batch_size[short], "num_trajectories": scale.num_trajectories[short],
            "curve": learning_curve(res.history, scale.batch_size[short]), "commit": git_commit()}


def final_evaluation(policy: Any, env_id: str, episodes: int) -> dict[str, Any]:
    """The evaluation fields of a run record: ``policy`` streamed over ``episodes`` episodes (seeds 10000+; QPoleObs
    with K = 2 warm iterations per step) and normalized by the env's dataset expert on the same episodes."""
    from deqmpc_gym.evaluation.rollouts import EvalConfig, rollout_batched
    from deqmpc_gym.experts.reference import reference_returns

    eval_cfg = EvalConfig(episodes=episodes, stream_iters=protocol_stream_iters(env_id))
    ref = reference_returns(env_id, eval_cfg.episodes, eval_cfg.seed, eval_cfg.max_steps)
    ev = rollout_batched(policy, env_id, eval_cfg, reference=(ref["random_return"], ref["expert_return"]))
    return {"normalized_score": ev.normalized_score, "mean_return": ev.mean_return, "std_return": ev.std_return,
            "success_rate": ev.success_rate, "collision_rate": ev.collision_rate, "cost_rate": ev.cost_rate,
            "stream_iters": eval_cfg.stream_iters, "expert_return": ref["expert_return"],
            "random_return": ref["random_return"], "expert_id": ref["expert_id"], "expert_kind": ref["expert_kind"],
            "reference": ref["measured"], "act_latency_ms": ev.act_latency_ms}


def score_evaluator(env_id: str, episodes: int, reference: tuple[float, float], stream_iters: int = 1,
                    seed: int = 20_000):
    """``fn(policy) -> {"score", "success_rate"}``: the normalized score over ``episodes`` batched rollouts (seeds
    ``seed``+, apart from the final evaluation's 10000+), for :class:`~deqmpc_gym.training.ImitationTrainer`'s
    ``evaluator`` (the learning curve)."""
    from deqmpc_gym.evaluation.rollouts import EvalConfig, rollout_batched

    def evaluate(policy: Any) -> dict[str, float]:
        ev = rollout_batched(policy, env_id, EvalConfig(episodes=episodes, seed=seed, stream_iters=stream_iters),
                             reference=reference)
        score = ev.normalized_score if ev.normalized_score is not None else math.nan  # always set: reference given
        return {"score": score, "success_rate": ev.success_rate}

    return evaluate


def learning_curve(history: Sequence[dict[str, float]], batch_size: int) -> list[dict[str, float]]:
    """The run's validation (and, where measured, closed-loop) figures against training windows seen."""
    return [{"step": int(h["step"]), "windows": int(h["step"]) * batch_size, "val_loss": h["val_loss"],
             **({"score": h["eval_score"]} if "eval_score" in h else {})} for h in history]


def curves_plot(records: Sequence[dict[str, Any]], envs: Sequence[str], path: Path) -> bool:
    """Learning curves (closed-loop score and validation loss against windows seen), one column per env; False
    (nothing written) when no record holds a curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_curve = [r for r in records if r.get("curve")]
    if not with_curve:
        return False
    envs = [e for e in envs if any(r["env_id"] == e for r in with_curve)]
    fig, axes = plt.subplots(2, len(envs), figsize=(3.2 * len(envs), 5.2), squeeze=False)
    for j, e in enumerate(envs):
        for r in (r for r in with_curve if r["env_id"] == e):
            label = f"{r['variant']} s{r['seed']}"
            pts = [c for c in r["curve"] if "score" in c]
            if pts:
                axes[0, j].plot([c["windows"] for c in pts], [c["score"] for c in pts], marker=".", label=label)
            axes[1, j].plot([c["windows"] for c in r["curve"]], [c["val_loss"] for c in r["curve"]], label=label)
        axes[0, j].set_title(_short(e))
        axes[0, j].axhline(1.0, color="k", lw=0.6, ls="--")
        axes[1, j].set_yscale("log")
        axes[1, j].set_xlabel("training windows")
    axes[0, 0].set_ylabel("normalized return")
    axes[1, 0].set_ylabel("validation loss")
    axes[0, 0].legend(fontsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return True


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Learning curves of a training run folder (its ``progress.csv``: validation loss and, where measured, the
    closed-loop score against steps) or of a Table 1 folder (``runs/*.json`` records with curves); returns the
    PNG written (default ``<run_dir>/curves.png``).

    Raises:
        ConfigError: ``run_dir`` holds neither a ``progress.csv`` nor run records with learning curves.
    """
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root = Path(run_dir)
    path = Path(out) if out is not None else root / "curves.png"
    records = [json.loads(f.read_text()) for f in sorted((root / "runs").glob("*.json"))]
    if records and curves_plot(records, TABLE1_ENVS, path):
        return path
    progress = root / "progress.csv"
    if not progress.is_file():
        raise ConfigError(f"{root} holds no progress.csv (a training run folder) and no runs/*.json with learning "
                          "curves (a `reproduce table1` folder such as results/table1-cpu)")
    with progress.open() as f:
        rows = list(csv.DictReader(f))
    fig, (a0, a1) = plt.subplots(1, 2, figsize=(8, 3.2))
    val = [(int(r["time/steps"]), float(r["val/loss_end"])) for r in rows if r.get("val/loss_end")]
    score = [(int(r["time/steps"]), float(r["eval/score"])) for r in rows if r.get("eval/score")]
    a0.plot(*zip(*val) if val else ([], []))
    a0.set_yscale("log")
    a0.set(xlabel="step", ylabel="validation loss", title=root.name)
    a1.plot(*zip(*score) if score else ([], []), marker=".")
    a1.axhline(1.0, color="k", lw=0.6, ls="--")
    a1.set(xlabel="step", ylabel="normalized return", title="closed loop" if score else "closed loop (not measured)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return path


def markdown_table(records: Sequence[dict[str, Any]], envs: Sequence[str], variants: Sequence[str]) -> str:
    """Mean ± std of normalized scores per (variant, env), with the paper's numbers beside them."""
    names = [_short(e) for e in envs]
    lines = ["| Method | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for v in variants:
        cells = []
        for e in envs:
            s = [r["normalized_score"] for r in records if r["env_id"] == e and r["variant"] == v]
            paper = PAPER_TABLE1.get(v, {}).get(_short(e))
            ours = f"{np.mean(s):.2f} (±{np.std(s):.2f}, n={len(s)})" if s else "—"
            cells.append(ours + (f" · paper {paper[0]:.2f}" if paper else ""))
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bar_plot(records: Sequence[dict[str, Any]], envs: Sequence[str], variants: Sequence[str], path: Path) -> None:
    """Grouped bar plot of normalized scores (mean ± std) per env and variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.6))
    width = 0.8 / len(variants)
    for j, v in enumerate(variants):
        means, stds = [], []
        for e in envs:
            s = [r["normalized_score"] for r in records if r["env_id"] == e and r["variant"] == v]
            means.append(np.mean(s) if s else np.nan)
            stds.append(np.std(s) if s else 0.0)
        ax.bar(np.arange(len(envs)) + j * width, means, width, yerr=stds, label=v, capsize=2)
    ax.set_xticks(np.arange(len(envs)) + 0.4 - width / 2, [_short(e) for e in envs])
    ax.set_ylabel("normalized return")
    ax.axhline(1.0, color="k", lw=0.6, ls="--")
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


def check_selection(envs: Sequence[str] | None, variants: Sequence[str] | None,
                    seeds: Sequence[int] | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Validate a Table 1 selection (``None`` = all); returns ``(envs, variants)`` with canonical variant names.

    Raises :class:`ConfigError` naming the valid values for an env outside Table 1, an unknown variant or a seed
    that is not an integer >= 0.
    """
    from deqmpc_gym.policies.config import Variant

    envs = tuple(envs or TABLE1_ENVS)
    unknown = [e for e in envs if e not in TABLE1_ENVS]
    if unknown:
        raise ConfigError(f"unknown Table 1 env(s) {unknown}; valid: {list(TABLE1_ENVS)}")
    variants = tuple(Variant.resolve(v).value for v in (variants or TABLE1_VARIANTS))
    for s in seeds or ():
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ConfigError(f"seeds must be integers >= 0, got {s!r}")
    return envs, variants


def reproduce(what: str, *, scale: str = "cpu", seeds: Sequence[int] | None = None, envs: Sequence[str] | None = None,
              variants: Sequence[str] | None = None, out_dir: str | Path = "results",
              device: str | torch.device = "cpu", launch: LaunchConfig | None = None,
              episodes: int | None = None) -> Path:
    """Run (or resume) a reproduction on ``device``; returns the directory of its results (``table1``) or the plot
    written (``warmstart``).

    ``launch``: how the runs are launched (:class:`~deqmpc_gym.experiments.launch.LaunchConfig`; default: in this
    process, one after another). Each finished run's record is written as it completes; a failed run is reported
    and the others go on (:class:`~deqmpc_gym.experiments.launch.SweepError` at the end). ``warmstart`` takes at
    most one env (default Pendulum) and one seed (default 0), and ``episodes`` (default: the scale's evaluation
    episodes); see :func:`warmstart_ablation`.
    """
    launch = launch or LaunchConfig()
    if scale not in SCALES:
        raise ConfigError(f"unknown scale {scale!r}; valid: {sorted(SCALES)}")
    if what == "warmstart":
        envs, variants = check_selection(envs or (_WARMSTART_ENV,), variants, seeds)
        if len(envs) != 1 or len(seeds or ()) > 1:
            raise ConfigError(f"warmstart takes one env and one seed, got envs {list(envs)} and seeds {seeds}")
        return warmstart_ablation(scale=scale, out_dir=out_dir, env_id=envs[0], seed=(seeds or (0,))[0],
                                  variants=variants, device=device, launch=launch, episodes=episodes)
    if what != "table1":
        raise ConfigError(f"unknown reproduction {what!r}; valid: 'table1', 'warmstart'")
    if episodes is not None:
        raise ConfigError("episodes applies to warmstart; the Table 1 evaluation episodes come from the scale")
    envs, variants = check_selection(envs, variants, seeds)
    with connection(launch):
        return _table1(SCALES[scale], scale, envs, variants, seeds, out_dir, device, launch)


def _job_device(device: str | torch.device, launch: LaunchConfig) -> str | torch.device:
    """The device of a job: ``cuda`` when the launcher reserves GPUs for it (Ray sets its visible devices)."""
    return "cuda" if launch.gpus_per_run else device


def _table1(sc: Scale, scale: str, envs: tuple[str, ...], variants: tuple[str, ...], seeds: Sequence[int] | None,
            out_dir: str | Path, device: str | torch.device, launch: LaunchConfig, need_policy: bool = False) -> Path:
    """The Table 1 runs of a checked selection not recorded yet (with ``need_policy``, also those recorded whose
    ``best/`` policy is missing, e.g. a results folder without its ``train/`` runs), launched with ``launch``;
    returns the folder."""
    root = Path(out_dir) / f"table1-{scale}"
    runs_dir = root / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    data_dir = Path(out_dir) / "datasets"
    jobs = []
    for env_id in envs:
        for seed in (seeds if seeds is not None else sc.seeds[_short(env_id)]):
            for variant in variants:
                name = run_name(env_id, variant, seed)
                f = runs_dir / f"{name}.json"
                if f.exists():
                    if not _made_with_shipped_expert(json.loads(f.read_text())):
                        _set_aside(root, name)
                    elif not need_policy or (root / "train" / name / "best").exists():
                        continue
                jobs.append(Job(name, run_one, (env_id, variant, seed, sc, root, data_dir),
                                {"device": _job_device(device, launch), "deadline": launch.deadline}))
    _collect_datasets({j.args[0] for j in jobs}, sc, data_dir)  # once, here, before jobs run in parallel

    try:
        run_and_record(jobs, launch, runs_dir)
    finally:
        _write_table(runs_dir, out_dir, scale, envs, variants)
    return root


def run_and_record(jobs: Sequence[Job], launch: LaunchConfig, runs_dir: Path,
                   detail: str = "{wall_time_s:.0f} s") -> None:
    """:func:`~deqmpc_gym.experiments.launch.run_jobs` whose jobs return run records: each finished job's record is
    written to ``runs_dir/<job name>.json`` as it completes and announced as ``name: score S (detail)``, with
    ``detail`` formatted from the record."""

    def done(name: str, rec: dict[str, Any]) -> None:
        atomic_write_text(runs_dir / f"{name}.json", json.dumps(rec, indent=2))
        print(f"{name}: score {rec['normalized_score']:.3f} ({detail.format(**rec)})", flush=True)

    run_jobs(jobs, launch, done)


def _collect_datasets(env_ids: set[str], sc: Scale, data_dir: Path) -> None:
    from deqmpc_gym.experts import load_or_collect_dataset

    for env_id in sorted(env_ids):
        load_or_collect_dataset(env_id, sc.num_trajectories[_short(env_id)], seed=0, cache_dir=data_dir)


def _write_table(runs_dir: Path, out_dir: str | Path, scale: str, envs: tuple[str, ...],
                 variants: tuple[str, ...], prefix: str = "table1",
                 final: Callable[[Path], bool] | None = None) -> None:
    """``<prefix>-<scale>.{json,md,png}`` and the learning curves (``-curves.png``) from every run recorded so
    far (``final``: which record files count, e.g. not those of runs being continued; default all)."""
    records = [json.loads(p.read_text()) for p in sorted(runs_dir.glob("*.json")) if final is None or final(p)]
    stem = Path(out_dir) / f"{prefix}-{scale}"
    atomic_write_text(stem.with_suffix(".json"), json.dumps(records, indent=2))
    # the table covers every run recorded so far (earlier invocations may have run other envs)
    envs = tuple(e for e in TABLE1_ENVS if any(r["env_id"] == e for r in records)) or envs
    variants = tuple(v for v in TABLE1_VARIANTS if any(r["variant"] == v for r in records)) or variants
    table = markdown_table(records, envs, variants)
    atomic_write_text(stem.with_suffix(".md"), table + "\n")
    bar_plot(records, envs, variants, stem.with_suffix(".png"))
    curves_plot(records, envs, stem.parent / f"{stem.name}-curves.png")
    print(table)


def _made_with_shipped_expert(record: dict[str, Any]) -> bool:
    """Whether a run record was trained on the data of, and normalized by, the current dataset expert of its env
    (:func:`~deqmpc_gym.experts.dataset_expert_kind`): its ``expert_id`` names that expert's current version.
    Records without ``expert_id`` were normalized by the PPO expert: current on the envs whose dataset expert
    is PPO when their ``expert_return`` is the PPO card's (records without it count as current), stale on the
    obstacle tasks."""
    from deqmpc_gym.experts import dataset_expert_kind, load_expert, pretrained_expert_id

    env_id = record["env_id"]
    kind = dataset_expert_kind(env_id)
    if record.get("expert_id"):
        return bool(record["expert_id"] == pretrained_expert_id(env_id, kind))
    if kind != "ppo":
        return False
    ref = record.get("expert_return")
    return ref is None or math.isclose(ref, load_expert(env_id).card["mean_return"], rel_tol=1e-9)


def _set_aside(root: Path, name: str) -> None:
    """Move the record and the training run ``name`` of a reproduction into ``root/stale/`` (kept, not deleted),
    so that the run is trained again from scratch."""
    stale = root / "stale"
    stale.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for src in (root / "runs" / f"{name}.json", root / "train" / name):
        if src.exists():
            src.rename(stale / f"{src.name}.{stamp}")
    print(f"{name}: its record was made with another expert (or expert version) than its env's dataset expert; "
          f"moved to {stale} and training it again", flush=True)


_WARMSTART_ENV = "DEQMPC/Pendulum-v0"


def warmstart_scores(best_dir: str | Path, env_id: str, ks: Sequence[int], episodes: int, stream_seed: int,
                     reference: tuple[float, float], device: str | torch.device = "cpu") -> list[float]:
    """Normalized scores of the policy saved in ``best_dir`` with K = each of ``ks`` warm-started iterations per
    control step, each over the same ``episodes`` batched rollouts (env seeds ``stream_seed``+); one job of
    :func:`warmstart_ablation` (importable by Ray workers)."""
    from deqmpc_gym.evaluation.rollouts import EvalConfig, rollout_batched
    from deqmpc_gym.policies import DEQMPCPolicy

    policy = DEQMPCPolicy.load(best_dir, device=device)
    return [float(rollout_batched(policy, env_id, EvalConfig(episodes=episodes, seed=stream_seed, stream_iters=k),
                                  reference=reference).normalized_score) for k in ks]


def warmstart_ablation(*, scale: str = "cpu", out_dir: str | Path = "results", env_id: str = _WARMSTART_ENV,
                       ks: Sequence[int] = (1, 2, 3, 4), seed: int = 0, variants: Sequence[str] | None = None,
                       device: str | torch.device = "cpu", launch: LaunchConfig | None = None,
                       episodes: int | None = None) -> Path:
    """Paper Fig. 7: normalized return vs warm-started DEQ-MPC iterations K (Diff-MPC: 2K AL iterations).

    Uses the Table 1 policies of ``env_id`` and ``seed`` (default: the four variants): runs not recorded yet are
    trained and recorded as by ``reproduce("table1", ...)``, then each variant is scored over ``episodes``
    (default: the scale's evaluation episodes) for every K, one job per variant. Both steps go through ``launch``
    (default: in this process). Writes ``warmstart-<scale>.{json,png}`` to ``out_dir``; returns the png's path.

    Raises:
        ConfigError: an env, variant or seed outside Table 1, or ``episodes`` < 1.
        SweepError: a run or an evaluation failed (named; the others finished).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from deqmpc_gym.evaluation.rollouts import EvalConfig
    from deqmpc_gym.experts.reference import reference_returns

    launch = launch or LaunchConfig()
    if scale not in SCALES:
        raise ConfigError(f"unknown scale {scale!r}; valid: {sorted(SCALES)}")
    (env_id,), variants = check_selection((env_id,), variants, (seed,))
    sc = SCALES[scale]
    n = sc.eval_episodes[_short(env_id)] if episodes is None else episodes
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"episodes must be an int >= 1, got {episodes!r}")
    ref = reference_returns(env_id, n, EvalConfig().seed)  # the dataset expert on the same episodes
    reference = (ref["random_return"], ref["expert_return"])
    curves: dict[str, list[float]] = {}
    with connection(launch):
        root = _table1(sc, scale, (env_id,), variants, (seed,), out_dir, device, launch, need_policy=True)
        jobs = [Job(run_name(env_id, v, seed), warmstart_scores,
                    (str(root / "train" / run_name(env_id, v, seed) / "best"), env_id, tuple(ks), n,
                     EvalConfig().seed, reference), {"device": _job_device(device, launch)}) for v in variants]
        by_name = {j.name: v for j, v in zip(jobs, variants)}
        run_jobs(jobs, launch, lambda name, scores: curves.__setitem__(by_name[name], scores))
    curves = {v: curves[v] for v in variants}  # the variants' order, whatever order the jobs finished in
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for v, ys in curves.items():
        ax.plot(list(ks), ys, marker="o", label=v)
    ax.set_xlabel("warm-started DEQ-MPC iterations K (Diff-MPC: 2K AL)")
    ax.set_ylabel("normalized return")
    ax.set_title(f"Warm-start ablation, {_short(env_id)}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    png = Path(out_dir) / f"warmstart-{scale}.png"
    atomic_write(png, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
    atomic_write_text(Path(out_dir) / f"warmstart-{scale}.json",
                      json.dumps({"env_id": env_id, "seed": seed, "episodes": n, "ks": list(ks), "scores": curves},
                                 indent=2))
    return png


__all__ = ["reproduce", "warmstart_ablation", "warmstart_scores", "check_selection", "SCALES", "Scale", "TABLE1_ENVS",
           "TABLE1_VARIANTS", "PAPER_TABLE1", "markdown_table", "run_one"]
