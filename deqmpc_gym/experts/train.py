"""PPO expert training (stable-baselines3) on the natively batched envs, in resumable slices.

Training runs PPO with ``VecNormalize`` on :func:`deqmpc_gym.envs.make_sb3_vec_env` in slices of
``slice_steps`` environment steps; after every slice the model, the optimizer and the normalization
statistics are checkpointed atomically to ``out_dir/checkpoint/``, so an interrupted run resumes where it
stopped (``resume=True``). Fine-tune phases (:class:`~deqmpc_gym.experts.FinetunePhase`) switch settings at
their start step. The finished expert is exported by :func:`~deqmpc_gym.experts.export.export_expert`.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import importlib.util
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from stable_baselines3.common.logger import KVWriter

from deqmpc_gym.checkpoint import check_definition, load_checkpoint, save_checkpoint
from deqmpc_gym.errors import ConfigError
from deqmpc_gym.experts.config import ExpertConfig, FinetunePhase
from deqmpc_gym.experts.export import export_expert
from deqmpc_gym.io import atomic_write_text

#: the ``format`` of ``checkpoint/progress.json`` (:mod:`deqmpc_gym.checkpoint`)
CHECKPOINT_FORMAT = "deqmpc_gym.expert_checkpoint"
#: ExpertConfig fields that may change between a run and its resume
BUDGET_FIELDS = ("total_steps", "slice_steps", "eval_episodes")


@dataclass
class _Paths:
    root: Path
    ckpt: Path = field(init=False)

    def __post_init__(self) -> None:
        self.ckpt = self.root / "checkpoint"

    @property
    def model(self) -> Path:
        return self.ckpt / "model.zip"

    @property
    def norm(self) -> Path:
        return self.ckpt / "vecnormalize.pkl"

    @property
    def progress(self) -> Path:
        return self.ckpt / "progress.json"




def _make_venv(config: ExpertConfig, seed: int, training: bool, features: int | None = None) -> Any:
    """The ``VecNormalize``-wrapped training (or evaluation) env of ``config``; ``features``: the obstacle features
    ``k`` of the policy's input (default ``config.obstacle_features``)."""
    from stable_baselines3.common.vec_env import VecMonitor, VecNormalize

    from deqmpc_gym.envs import make_sb3_vec_env
    from deqmpc_gym.experts.shaping import with_obstacle_features, with_reward_shaping

    kw = {} if not training or config.train_obstacle_radius is None else \
        {"obstacle_radius": float(config.train_obstacle_radius)}
    venv = make_sb3_vec_env(config.env_id, config.n_envs, seed=seed, **kw)
    if training:  # episode returns (of the env's own reward) and lengths for the log (rollout/ep_rew_mean)
        venv = VecMonitor(venv)
    k = config.obstacle_features if features is None else features
    if k:
        venv = with_obstacle_features(venv, k)
    if training and (config.goal_bonus > 0.0 or config.collision_penalty > 0.0 or config.clearance_penalty > 0.0
                     or any(p.goal_bonus or p.collision_penalty or p.clearance_penalty for p in config.phases)):
        venv = with_reward_shaping(venv, config.goal_bonus, config.goal_bonus_width, config.collision_penalty,
                                   config.clearance_penalty, config.clearance_margin)
    return VecNormalize(venv, norm_obs=True, norm_reward=training, clip_obs=10.0, gamma=config.gamma,
                        training=training)


def _new_model(config: ExpertConfig, venv: Any) -> Any:
    from stable_baselines3 import PPO

    arch = list(config.net_arch)
    return PPO("MlpPolicy", venv, n_steps=config.n_steps, batch_size=config.batch_size, n_epochs=config.n_epochs,
               learning_rate=config.learning_rate, gamma=config.gamma, gae_lambda=config.gae_lambda,
               clip_range=config.clip_range, ent_coef=config.ent_coef, seed=config.seed, device="cpu", verbose=0,
               policy_kwargs=dict(net_arch=dict(pi=arch, vf=arch), activation_fn=torch.nn.Tanh,
                                  log_std_init=config.log_std_init))


def _save_checkpoint(model: Any, venv: Any, paths: _Paths, state: dict[str, Any]) -> None:
    """The model and the normalization statistics, then ``progress.json`` (:func:`deqmpc_gym.checkpoint
    .save_checkpoint`: each file atomically, the progress last)."""
    save_checkpoint(paths.progress, {**state, "format": CHECKPOINT_FORMAT},
                    files={paths.model.name: model.save, paths.norm.name: venv.save})


def train_expert(config: ExpertConfig, out_dir: str | Path, *, resume: bool = True, progress: bool = True,
                 max_slices: int | None = None, log_formats: tuple[str, ...] = ("csv",)) -> dict[str, Any] | None:
    """Train (or resume) a PPO expert and export it with its card.

    Args:
        config: :class:`ExpertConfig`.
        out_dir: output directory (``checkpoint/`` inside it holds the resumable state).
        resume: continue from ``out_dir/checkpoint`` if present; False starts over (overwriting it).
        progress: show SB3's progress bar and print the teacher's rounds.
        max_slices: stop after this many slices (for running long trainings in pieces); returns None if the
            budget is not yet exhausted, otherwise the card.
        log_formats: SB3 logger outputs: ``"csv"`` writes ``out_dir/progress.csv`` (one row per PPO iteration,
            SB3's keys: ``time/total_timesteps``, ``rollout/ep_rew_mean`` (the env's own reward), ``train/loss``,
            ``train/approx_kl``...; the rows are kept in the checkpoint, so every row survives a resume);
            ``"stdout"`` prints them; ``"tensorboard"`` (added when TensorBoard is installed) writes event files
            to ``out_dir``.

    Returns:
        The expert card (dict), also written to ``out_dir/card.json``.

    Raises:
        ResumeMismatchError: ``resume`` found a checkpoint written for another :class:`ExpertConfig`. Only the
            budget (``total_steps``, ``slice_steps``, ``eval_episodes``), the teacher and fine-tune phases that
            have not started may change (the rule of :mod:`deqmpc_gym.checkpoint`); the error names the fields.
        CheckpointError: an unreadable checkpoint.
    """
    paths = _Paths(Path(out_dir))
    model, venv, state = _start_or_resume(config, paths, resume)
    rows: list[dict[str, Any]] = state.setdefault("log_rows", [])
    logger = _logger(paths.root, log_formats, rows)
    slices = 0
    try:
        while state["steps_done"] < config.total_steps and (max_slices is None or slices < max_slices):
            model, venv = _start_due_phase(model, venv, config, state)
            n = state["phases_started"]
            chunk = min(config.slice_steps, config.total_steps - state["steps_done"])
            if n < len(config.phases):
                chunk = min(chunk, max(1, config.phases[n].start_step - state["steps_done"]))
            t0 = time.perf_counter()
            model.set_logger(logger)
            model.learn(chunk, reset_num_timesteps=False, progress_bar=progress)
            logger.dump(model.num_timesteps)  # the last iteration's train/* figures
            state["steps_done"] = int(model.num_timesteps)
            state["wall_time_s"] += time.perf_counter() - t0
            _save_checkpoint(model, venv, paths, state)
            if "csv" in log_formats:
                write_log_csv(paths.root / "progress.csv", rows)
            slices += 1
    finally:
        logger.close()
    if state["steps_done"] < config.total_steps:
        return None
    return export_expert(model, venv, config, paths.root, state, log=print if progress else None)


class _RowWriter(KVWriter):
    """An SB3 logger output that appends every dump's numeric values to ``rows`` (JSON types), each row with its
    ``time/total_timesteps``."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows

    def write(self, key_values: dict[str, Any], key_excluded: dict[str, tuple[str, ...]], step: int = 0) -> None:
        row = {k: (int(v) if isinstance(v, (int, np.integer)) else float(v)) for k, v in key_values.items()
               if isinstance(v, (int, float, np.number)) and not isinstance(v, bool)
               and "csv" not in (key_excluded.get(k) or ())}
        if row:
            row.setdefault("time/total_timesteps", int(step))  # SB3 dumps at the model's num_timesteps
            self.rows.append(row)

    def close(self) -> None:
        pass


def _logger(folder: Path, log_formats: tuple[str, ...], rows: list[dict[str, Any]]) -> Any:
    """The SB3 logger of a PPO run: the CSV rows into ``rows``, plus stdout / TensorBoard as asked (TensorBoard
    whenever it is installed)."""
    from stable_baselines3.common.logger import Logger, make_output_format

    formats = list(dict.fromkeys(log_formats))
    if "tensorboard" not in formats and importlib.util.find_spec("tensorboard") is not None:
        formats.append("tensorboard")
    unknown = sorted(set(formats) - {"csv", "stdout", "tensorboard"})
    if unknown:
        raise ConfigError(f"log_formats may hold 'csv', 'stdout' and 'tensorboard', got {unknown}")
    folder.mkdir(parents=True, exist_ok=True)
    outputs: list[KVWriter] = [_RowWriter(rows)] if "csv" in formats else []
    outputs += [make_output_format(f, str(folder)) for f in formats if f != "csv"]
    return Logger(folder=str(folder), output_formats=outputs)


def write_log_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Atomically write ``rows`` as CSV: the columns in order of first appearance, empty cells where a row has no
    value."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def _start_or_resume(config: ExpertConfig, paths: _Paths, resume: bool) -> tuple[Any, Any, dict[str, Any]]:
    """The PPO model, its training env and the progress state: new, or restored from ``paths`` (checked)."""
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import VecNormalize

    cfg_dict = json.loads(json.dumps(dataclasses.asdict(config)))
    saved = load_checkpoint(paths.progress, (CHECKPOINT_FORMAT, None), what="PPO expert") if resume else None
    if saved is None:
        venv = _make_venv(config, config.seed, training=True)
        return _new_model(config, venv), venv, {"steps_done": 0, "wall_time_s": 0.0, "config": cfg_dict,
                                                 "phases_started": 0}
    state = saved
    # checkpoints written before multi-phase runs record ``finetune_started`` (the only phase)
    state.setdefault("phases_started", int(bool(state.get("finetune_started"))))
    _check_resumable(config, cfg_dict, state, paths)
    state["config"] = cfg_dict
    venv = _make_venv(config, config.seed, training=True, features=config.features_after(state["phases_started"]))
    venv = VecNormalize.load(str(paths.norm), venv.venv)
    venv.training, venv.norm_reward = True, True
    model = PPO.load(paths.model, env=venv, device="cpu")
    for phase in config.phases[:state["phases_started"]]:
        _start_finetune(model, venv, phase, reset_log_std=False)
    return model, venv, state


def _start_due_phase(model: Any, venv: Any, config: ExpertConfig, state: dict[str, Any]) -> tuple[Any, Any]:
    """Start the next fine-tune phase if the run has reached its ``start_step`` (a phase that adds obstacle
    features replaces the model and the env); updates ``state``."""
    n, phases = state["phases_started"], config.phases
    if n < len(phases) and state["steps_done"] >= phases[n].start_step:
        if phases[n].obstacle_features is not None:
            model, venv = _add_obstacle_features(model, venv, config, phases[:n], phases[n].obstacle_features)
        _start_finetune(model, venv, phases[n], reset_log_std=True)
        state["phases_started"] = n + 1
        state["finetune_started"] = True
    return model, venv


def _definition(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """The flat definition (:mod:`deqmpc_gym.checkpoint`) of an :class:`ExpertConfig` dict, with the defaults of
    fields added after it was written: ``expert.<field>``, one ``expert.finetune[i]`` per phase; the teacher is
    left out (it runs after PPO and has its own checkpoint)."""
    defaults = {f.name: f.default for f in dataclasses.fields(ExpertConfig) if f.default is not dataclasses.MISSING}
    full = {**json.loads(json.dumps(defaults)), **cfg_dict}
    out = {f"expert.{k}": v for k, v in full.items() if k not in ("finetune", "teacher")}
    out.update({f"expert.finetune[{i}]": p for i, p in enumerate(_phase_list(full.get("finetune")))})
    return out


def _phase_list(d: Any) -> list[dict[str, Any]]:
    """The phases of a config dict's ``finetune`` entry, with the defaults of fields added after it was written."""
    phase_defaults = {f.name: f.default for f in dataclasses.fields(FinetunePhase)
                      if f.default is not dataclasses.MISSING}
    items = [] if d is None else (d if isinstance(d, list) else [d])
    return [{**phase_defaults, **p} for p in items]


def _check_resumable(config: ExpertConfig, cfg_dict: dict[str, Any], state: dict[str, Any], paths: _Paths) -> None:
    """Raise :class:`~deqmpc_gym.errors.ResumeMismatchError` unless the checkpoint with progress ``state`` may
    continue as ``config``: the same settings except the budget, the teacher, and fine-tune phases that have not
    started (nor would an uninterrupted run have started them before this checkpoint: a phase starts at the first
    checkpoint at or after its ``start_step``)."""
    saved, requested = _definition(state.get("config") or {}), _definition(cfg_dict)
    may_change = {f"expert.{k}" for k in BUDGET_FIELDS}
    old, new = _phase_list((state.get("config") or {}).get("finetune")), _phase_list(cfg_dict.get("finetune"))
    diff = next((i for i in range(max(len(old), len(new))) if i >= len(old) or i >= len(new) or old[i] != new[i]),
                None)
    if diff is not None:  # the first differing phase (and so the later ones) may change while it is not due
        due = min(lst[diff]["start_step"] for lst in (old, new) if diff < len(lst))
        if diff >= state["phases_started"] and state["steps_done"] - config.slice_steps < due:
            may_change |= {f"expert.finetune[{i}]" for i in range(diff, max(len(old), len(new)))}
    check_definition(paths.progress, saved, requested, may_change=may_change, what="PPO expert run (ExpertConfig)",
                     start_over="pass resume=False (--no-resume) to overwrite it, or use another output folder "
                                "(--out)")


def _add_obstacle_features(model: Any, venv: Any, config: ExpertConfig, earlier: tuple[FinetunePhase, ...],
                           k: int) -> tuple[Any, Any]:
    """A PPO model and training env whose observations also hold the offsets to the ``k`` nearest obstacles:
    the same weights with zero input weights for the new inputs, the same normalization statistics with mean 0
    and variance 1 for them, and the settings of the ``earlier`` phases applied (the caller then starts the phase
    that adds the features)."""
    # another seed than the run's first envs, so that the new envs do not replay the initial states of step 0
    new_venv = _make_venv(config, config.seed + 1, training=True, features=k)
    n = venv.obs_rms.mean.shape[0]
    rms = new_venv.obs_rms
    rms.mean[:n], rms.var[:n], rms.count = venv.obs_rms.mean, venv.obs_rms.var, venv.obs_rms.count
    rms.mean[n:], rms.var[n:] = 0.0, 1.0
    new_venv.ret_rms = copy.deepcopy(venv.ret_rms)
    new_model = _new_model(config, new_venv)
    widened = new_model.policy.state_dict()
    for name, value in model.policy.state_dict().items():
        if widened[name].shape == value.shape:
            widened[name] = value.clone()
        else:  # the first layers of the policy and value networks: (hidden, n) -> (hidden, n + 3k)
            widened[name] = torch.cat([value, value.new_zeros(value.shape[0], widened[name].shape[1] - n)], 1)
    new_model.policy.load_state_dict(widened)
    new_model.num_timesteps = model.num_timesteps
    for phase in earlier:
        _start_finetune(new_model, new_venv, phase, reset_log_std=False)
    venv.close()
    return new_model, new_venv


def _start_finetune(model: Any, venv: Any, phase: FinetunePhase, *, reset_log_std: bool) -> None:
    """Switch a PPO run to the settings of ``phase`` (``venv``: the training ``VecNormalize``)."""
    try:
        from stable_baselines3.common.utils import ConstantSchedule as constant  # SB3 >= 2.6
    except ImportError:  # pragma: no cover - older SB3
        from stable_baselines3.common.utils import constant_fn as constant  # type: ignore[assignment]

    wrapper = venv.venv  # the RewardShaping wrapper when shaping is configured (see _make_venv)
    if hasattr(wrapper, "set_shaping"):
        wrapper.set_shaping(wrapper.bonus if phase.goal_bonus is None else phase.goal_bonus,
                            wrapper.width if phase.goal_bonus_width is None else phase.goal_bonus_width,
                            wrapper.collision_penalty if phase.collision_penalty is None else phase.collision_penalty,
                            phase.clearance_penalty)
    if phase.obstacle_radius is not None:
        venv.unwrapped.env.set_obstacle_radius(phase.obstacle_radius)
    if phase.learning_rate is not None:
        model.learning_rate = phase.learning_rate
        model.lr_schedule = constant(phase.learning_rate)
    if reset_log_std and phase.log_std is not None:
        with torch.no_grad():
            model.policy.log_std.fill_(phase.log_std)
    if phase.freeze_normalization:
        venv.training = False


