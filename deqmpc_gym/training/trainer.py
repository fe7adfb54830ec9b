"""Imitation training of a :class:`~deqmpc_gym.policies.DEQMPCPolicy` on expert trajectories.

Loss (paper section 4.2 and appendix): for every DEQ-MPC iterate ``j`` (Diff-MPC: the final iterate only)::

    l_j = mean_b [ 1/T sum_t mask_t sum_d |x^j_{t,d} - x^exp_{t,d}|  +  deq_reg * (same for theta^j) ]

summed over iterates. With streaming (``streaming_steps = L > 0``) a window of ``T + L`` expert states is
solved cold from its first state, then warm-started ``L`` times from the next expert states (teacher forcing);
each call's iterates are supervised with their own ``T``-knot sub-window, and the total is divided by ``1 + L``.

Optimisation: Adam (lr 1e-3), gradient-norm clipping 2.0, batch 200, validation on fixed batches every
``val_every`` steps keeping the best checkpoint; checkpoints are written atomically and ``resume=True``
continues a killed run from the last one with the same result as an uninterrupted run.

The output folder belongs to one run: a live trainer holds ``train.lock`` (a second one is refused), ``resume``
refuses a checkpoint written for another run definition (variant, policy or train config, dataset) and names
the differing fields, a folder holding a run is only reused with ``resume=True`` or ``overwrite=True``, and
Ctrl-C, SIGTERM (a scheduler ending a job) or the call's ``deadline`` finish the current step, write a checkpoint
and raise :class:`~deqmpc_gym.errors.TrainingInterrupted` (``reason`` says which).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deqmpc_gym._config import check_deadline, check_field_types, config_from_dict, require_at_least_one
from deqmpc_gym.checkpoint import check_definition, load_checkpoint, save_checkpoint
from deqmpc_gym.data import ExpertDataset
from deqmpc_gym.errors import (
    CheckpointError,
    ConfigError,
    DatasetError,
    RunDirError,
    TrainingInterrupted,
)
from deqmpc_gym.io import atomic_write_text
from deqmpc_gym.policies import DEQMPCPolicy, LayerOutput
from deqmpc_gym.training.rundir import (
    ADDED_FIELDS,
    RESUMABLE_FIELDS,
    RunLock,
    existing_run_files,
    remove_run_files,
    run_definition,
    write_progress,
)
from deqmpc_gym.training.windows import WindowBatch, WindowSampler

CKPT_FORMAT = "deqmpc_gym.train_checkpoint"


@dataclass(frozen=True)
class TrainConfig:
    """Imitation-training settings (paper defaults; every field overridable).

    Attributes:
        steps: optimisation steps (paper: 20,000).
        batch_size: windows per step (paper: 200).
        lr: Adam learning rate.
        grad_clip: gradient-norm clipping threshold.
        deq_reg: weight of the L1 loss on the raw network waypoints.
        streaming_steps: L, warm-started solves per window (paper: 2; 0 disables streaming training).
        val_every: validate (and checkpoint) every this many steps.
        val_batches: number of fixed validation batches (paper: 100).
        val_fraction: share of trajectories held out for validation.
        seed: seeds the data split, the window sampler and the validation batches.
        log_every: log training metrics every this many steps.
        state_noise: standard deviation of Gaussian noise added to the states the policy is given during training
            (each window's cold and warm-started ``x0``), as a fraction of each state coordinate's standard
            deviation over the training trajectories; the targets stay the expert's. 0 (the paper's protocol)
            disables it; the reference code's observation-noise injection uses 0.05 (absolute).
        eval_every: run the trainer's ``evaluator`` (closed-loop rollouts, e.g. the normalized score) every this
            many steps, at a validation (a multiple of ``val_every``); 0 disables it. Its figures go into
            ``progress.csv`` (``eval/*``) and the history: the run's learning curve.
    """

    steps: int = 20000
    batch_size: int = 200
    lr: float = 1e-3
    grad_clip: float = 2.0
    deq_reg: float = 0.1
    streaming_steps: int = 2
    val_every: int = 100
    val_batches: int = 100
    val_fraction: float = 0.1
    seed: int = 0
    log_every: int = 10
    state_noise: float = 0.0
    eval_every: int = 0

    def __post_init__(self) -> None:
        check_field_types(self)
        require_at_least_one(self, ("steps", "batch_size", "val_every", "val_batches", "log_every"))
        if self.streaming_steps < 0:
            raise ConfigError(f"TrainConfig.streaming_steps must be >= 0, got {self.streaming_steps}")
        if self.eval_every < 0 or (self.eval_every and self.eval_every % self.val_every):
            raise ConfigError(f"TrainConfig.eval_every must be 0 or a multiple of val_every ({self.val_every}), "
                              f"got {self.eval_every}")
        for name in ("lr", "grad_clip"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0.0):
                raise ConfigError(f"TrainConfig.{name} must be a finite number > 0, got {getattr(self, name)}")
        if not (math.isfinite(self.state_noise) and self.state_noise >= 0.0):
            raise ConfigError(f"TrainConfig.state_noise must be a finite number >= 0, got {self.state_noise}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"TrainConfig.val_fraction must be in (0, 1), got {self.val_fraction}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a dict, rejecting unknown keys with a :class:`ConfigError`."""
        return config_from_dict(cls, data)


def window_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``mean_b 1/T sum_t mask_t sum_d |pred - target|`` for ``pred, target: (B, T, nx)``, ``mask: (B, T)``."""
    err = (pred - target.to(pred.dtype)).abs().sum(-1) * mask.to(pred.dtype)
    return err.mean(-1).mean()


def iterate_loss(out: LayerOutput, target: torch.Tensor, mask: torch.Tensor, deq_reg: float,
                 final_only: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over iterates of state L1 + ``deq_reg`` * waypoint L1; returns ``(loss, final-iterate state L1)``."""
    pairs = list(zip(out.states, out.thetas))
    if final_only:
        pairs = pairs[-1:]
    loss = sum(window_l1(x, target, mask) + deq_reg * window_l1(th, target, mask) for x, th in pairs)
    return loss, window_l1(out.states[-1], target, mask).detach()  # type: ignore[return-value]


def batch_loss(policy: DEQMPCPolicy, batch: WindowBatch, config: TrainConfig,
               inputs: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of one batch of windows ``(B, T + L, nx)`` (cold solve plus ``L`` warm-started solves).

    ``inputs``: ``(B, T + L, nx)`` states given to the policy as ``x0`` (e.g. noisy copies of ``batch.states``);
    default the window's own states. The targets are always ``batch.states``."""
    layer, T = policy.layer, policy.config.horizon
    final_only = layer.variant.diff_mpc
    states, mask = batch.states, batch.mask
    x_in = states if inputs is None else inputs
    n_calls = 1 + min(config.streaming_steps, states.shape[1] - T)
    out = layer(x_in[:, 0], None)
    total, end = iterate_loss(out, states[:, :T], mask[:, :T], config.deq_reg, final_only)
    stream = out.state
    for s in range(1, n_calls):
        out = layer(x_in[:, s], stream)
        loss_s, _ = iterate_loss(out, states[:, s:s + T], mask[:, s:s + T], config.deq_reg, final_only)
        total = total + loss_s
        stream = out.state
    total = total / n_calls
    return total, {"loss": float(total.detach()), "loss_end": float(end)}


@torch.no_grad()
def validation_loss(policy: DEQMPCPolicy, batches: list[WindowBatch]) -> float:
    """Mean final-iterate state L1 of cold solves over fixed validation batches (eval mode)."""
    layer, T = policy.layer, policy.config.horizon
    was = layer.training
    layer.eval()
    try:
        vals = [float(window_l1(layer(b.states[:, 0], None).states[-1], b.states[:, :T], b.mask[:, :T]))
                for b in batches]
    finally:
        layer.train(was)
    return float(np.mean(vals))


@dataclass
class TrainResult:
    """Outcome of :meth:`ImitationTrainer.train`."""

    steps: int
    best_val_loss: float
    best_step: int
    final_val_loss: float
    wall_time_s: float
    history: list[dict[str, float]]


class ImitationTrainer:
    """Train ``policy`` on ``dataset`` with :class:`TrainConfig`; files go to ``out_dir``.

    Files: ``checkpoint.pt`` (last state, for ``resume``), ``best/`` (best policy by validation loss),
    ``final/`` (policy at the end), ``progress.csv`` (one row per validation, fixed columns
    :data:`~deqmpc_gym.training.rundir.PROGRESS_COLUMNS`, every row kept across resumes), ``result.json`` and,
    while training, ``train.lock``.

    Args:
        callbacks: run after every validation, in order; one callback or a sequence of them, each either

            * a callable ``fn(trainer, step, metrics) -> None`` (``metrics``: the validation record), or
            * a stable-baselines3 ``BaseCallback`` (e.g. ``EvalCallback``), passed as it is. It sees a model
              (:class:`~deqmpc_gym.policies.sb3.SB3ModelShim`) whose ``predict`` is the policy's, whose
              ``num_timesteps`` is the optimisation step (the x-axis of every log of the trainer) and whose
              ``logger`` is the trainer's SB3 logger; ``on_step()`` runs at every validation (so ``n_calls``
              counts validations: ``EvalCallback(eval_freq=1)`` evaluates at each one), with
              ``locals = {"trainer", "step", "windows_seen" (step * batch_size), "metrics"}``;
              ``on_training_start`` / ``on_training_end`` frame the run. ``on_step()`` returning False stops
              training after that validation, like SB3's ``learn``: the run ends as finished at that step
              (``final/``, ``result.json``), and ``resume`` with a larger budget continues it.
        evaluator: ``fn(policy) -> {"score": ..., ...}`` run every ``config.eval_every`` steps (closed-loop
            figures of the current policy, e.g. :func:`deqmpc_gym.experiments.reproduce.score_evaluator`); its
            values are recorded as ``eval/<key>``. It must leave the policy as it found it.
        progress: show a tqdm progress bar with loss and ETA.
        log_formats: ``"csv"`` writes ``progress.csv``; ``"stdout"`` (and ``"tensorboard"``, added when
            TensorBoard is installed) go through SB3's logger.
    """

    def __init__(self, policy: DEQMPCPolicy, dataset: ExpertDataset, config: TrainConfig, out_dir: str | Path,
                 callbacks: Any = (), progress: bool = True,
                 log_formats: tuple[str, ...] = ("csv",),
                 evaluator: Callable[[DEQMPCPolicy], dict[str, float]] | None = None) -> None:
        if policy.env_id is not None and dataset.env_id != policy.env_id:
            raise DatasetError(f"dataset was collected on {dataset.env_id!r} but the policy controls "
                               f"{policy.env_id!r}; collect a dataset for {policy.env_id!r}")
        if not isinstance(config, TrainConfig):
            raise ConfigError(f"config must be a TrainConfig, got {type(config).__name__}")
        self.policy, self.config, self.out_dir = policy, config, Path(out_dir)
        self.callbacks, self.sb3_callback = _split_callbacks(callbacks)
        self.progress, self.evaluator = progress, evaluator
        self._shim: Any = None
        self._stop_by_callback = False
        window = policy.config.horizon + config.streaming_steps
        train, val = dataset.split(config.val_fraction, seed=config.seed)
        self.sampler = WindowSampler(train, policy.system, window, seed=config.seed)
        obs = np.concatenate([t.obs for t in train.trajectories])
        self._state_std = torch.as_tensor(obs.std(0), dtype=torch.float64, device=policy.device)
        val_sampler = WindowSampler(val, policy.system, policy.config.horizon, seed=config.seed + 1)
        self.val_batches = val_sampler.fixed_batches(config.val_batches, config.batch_size, seed=config.seed + 1,
                                                     device=policy.device)
        self.optimizer = torch.optim.Adam(policy.layer.net.parameters(), lr=config.lr)
        self.step, self.best_val, self.best_step = 0, math.inf, 0
        self.history: list[dict[str, float]] = []
        self.progress_rows: list[dict[str, Any]] = []
        self._pending: dict[str, float] = {}
        self.log_formats = tuple(log_formats)
        if "tensorboard" not in self.log_formats and importlib.util.find_spec("tensorboard") is not None:
            self.log_formats += ("tensorboard",)  # SB3's logger writes TensorBoard events when it is installed
        self.definition = run_definition(policy.config, policy.env_id, config, dataset)
        self._elapsed = 0.0
        self._saved_step: int | None = None

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / "checkpoint.pt"

    def save_checkpoint(self) -> None:
        """Atomically write the full training state (weights, optimizer, RNG, bookkeeping, run definition)."""
        payload = {
            "format": CKPT_FORMAT, "step": self.step, "best_val": self.best_val, "best_step": self.best_step,
            "elapsed": self._elapsed,
            "model": {k: v.detach().cpu() for k, v in self.policy.layer.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "rng_json": json.dumps(self.sampler.rng.bit_generator.state),
            "history_json": json.dumps(self.history),
            "config_json": json.dumps(dataclasses.asdict(self.config)),
            "run_json": json.dumps(self.definition),
            "progress_json": json.dumps({"rows": self.progress_rows, "pending": self._pending}),
        }
        save_checkpoint(self.checkpoint_path, payload)
        self._saved_step = self.step

    def load_checkpoint(self) -> None:
        """Restore the state written by :meth:`save_checkpoint` (weights_only load).

        Raises :class:`~deqmpc_gym.errors.ResumeMismatchError` (a ``CheckpointError``) naming the fields when the
        checkpoint was written for another run definition; only ``steps`` (and the inference-only
        ``compiled_solver``, and ``eval_every``) may change.
        """
        payload = self._read_checkpoint()
        self._check_definition(payload)
        try:
            self.policy.layer.load_state_dict(payload["model"])
        except RuntimeError as exc:
            raise CheckpointError(f"checkpoint weights do not fit this policy: {exc}") from exc
        try:
            self.optimizer.load_state_dict(payload["optimizer"])
            self.sampler.rng.bit_generator.state = json.loads(payload["rng_json"])
            self.history = json.loads(payload["history_json"])
            self.step, self.best_val = int(payload["step"]), float(payload["best_val"])
            self.best_step, self._elapsed = int(payload["best_step"]), float(payload["elapsed"])
            self._restore_progress(payload.get("progress_json"))
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{self.checkpoint_path} is damaged ({type(exc).__name__}: {exc}); delete it "
                                  "(or pass overwrite=True / --overwrite) to start over") from exc
        self._saved_step = self.step

    def _read_checkpoint(self) -> dict[str, Any]:
        payload = load_checkpoint(self.checkpoint_path, (CKPT_FORMAT,), what="deqmpc_gym training",
                                  map_location=self.policy.device)
        if payload is None:
            raise CheckpointError(f"no training checkpoint at {self.checkpoint_path}")
        return payload

    def _check_definition(self, payload: dict[str, Any]) -> None:
        """Compare the stored run definition (or, for older checkpoints, the TrainConfig) with this run's
        (:func:`deqmpc_gym.checkpoint.check_definition`)."""
        if "run_json" in payload:
            saved = json.loads(payload["run_json"])
        else:  # written before run definitions were stored: only the TrainConfig can be compared
            saved = {f"train.{k}": v for k, v in json.loads(payload["config_json"]).items()}
            saved.update({k: v for k, v in self.definition.items() if not k.startswith("train.")})
        check_definition(self.checkpoint_path, saved, self.definition, may_change=RESUMABLE_FIELDS,
                         added=ADDED_FIELDS, what="training run (policy config, TrainConfig or dataset)",
                         start_over="pass overwrite=True (--overwrite), or use another output folder")

    def _restore_progress(self, progress_json: str | None) -> None:
        """The ``progress.csv`` rows (and not yet written train metrics) stored in a checkpoint."""
        if progress_json is None:  # older checkpoints: rebuild the rows from the validation history
            self.progress_rows = [{"time/steps": int(h["step"]), "time/elapsed_s": h.get("time_s"),
                                   "train/loss": h.get("train_loss"), "val/loss_end": h.get("val_loss")}
                                  for h in self.history]
            self._pending = {}
            return
        data = json.loads(progress_json)
        self.progress_rows, self._pending = list(data["rows"]), dict(data["pending"])

    # ------------------------------------------------------------------ loop
    def train_step(self) -> dict[str, float]:
        """One optimisation step on a freshly sampled batch."""
        self.policy.layer.train()
        batch = self.sampler.sample(self.config.batch_size, device=self.policy.device)
        inputs = None
        if self.config.state_noise > 0.0:  # drawn from the sampler's generator: resumes reproduce it
            noise = torch.as_tensor(self.sampler.rng.standard_normal(tuple(batch.states.shape)),
                                    device=batch.states.device)
            inputs = batch.states + (self.config.state_noise * self._state_std * noise).to(batch.states.dtype)
        loss, metrics = batch_loss(self.policy, batch, self.config, inputs)
        self.optimizer.zero_grad(set_to_none=True)
        if torch.isfinite(loss):
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(self.policy.layer.net.parameters(), self.config.grad_clip)
            if torch.isfinite(norm):
                self.optimizer.step()
            metrics["grad_norm"] = float(norm)
        else:
            metrics["skipped_nonfinite"] = 1.0
        return metrics

    def train(self, resume: bool = False, overwrite: bool = False, deadline: float | None = None) -> TrainResult:
        """Run training to ``config.steps`` in ``out_dir``.

        Args:
            resume: continue the run in ``out_dir`` from its checkpoint (a finished run is extended to a larger
                ``steps`` or returned as is). The checkpoint must have been written for the same run definition.
            overwrite: delete the run files in ``out_dir`` (``checkpoint.pt``, ``best/``, ``final/``,
                ``progress.csv``, ``result.json``) and start over.
            deadline: a ``time.time()`` instant [s since the epoch]; the first step that ends after it is the
                last of this call (checkpointed, ``TrainingInterrupted`` with ``reason="time limit"``), so a run
                can be trained in slices of a fixed wall time. None: no limit.

        Raises:
            RunDirError: another live trainer uses ``out_dir``, or ``out_dir`` holds a run and neither ``resume``
                nor ``overwrite`` is set.
            ResumeMismatchError: ``resume`` found a checkpoint of another run definition.
            TrainingInterrupted: Ctrl-C (SIGINT), SIGTERM, the ``deadline`` or a ``KeyboardInterrupt`` from a
                callback; the current step was finished and checkpointed first (a second signal stops at once,
                keeping the last checkpoint).
        """
        if resume and overwrite:
            raise ConfigError("resume and overwrite exclude each other: resume continues the run in the output "
                              "folder, overwrite deletes it")
        deadline = check_deadline(deadline)
        with RunLock(self.out_dir):
            self._prepare_folder(resume, overwrite)
            return self._run(deadline)

    def _prepare_folder(self, resume: bool, overwrite: bool) -> None:
        """Start over, resume, or refuse to touch a folder that holds another run."""
        if overwrite:
            remove_run_files(self.out_dir)
            return
        if resume and self.checkpoint_path.exists():
            self.load_checkpoint()
            return
        found = existing_run_files(self.out_dir)
        if found:
            hint = ("pass resume=True (--resume) to continue it, " if "checkpoint.pt" in found else "")
            raise RunDirError(f"output folder {self.out_dir} already holds a training run ({', '.join(found)}); "
                              f"{hint}pass overwrite=True (--overwrite) to delete it and start over, or choose "
                              "another output folder")

    def _run(self, deadline: float | None = None) -> TrainResult:
        """The training loop (the folder is locked and prepared), up to ``deadline`` (see :meth:`train`)."""
        from stable_baselines3.common.logger import configure

        sb3_formats = [f for f in self.log_formats if f != "csv"]
        logger = configure(str(self.out_dir), sb3_formats)
        self._write_progress()
        bar = _progress(self.config.steps, self.step, self.progress)
        t0 = time.perf_counter() - self._elapsed
        stop = _DeferredInterrupt()
        at_boundary = True
        self._start_sb3_callback(logger)
        try:
            with stop:
                while self.step < self.config.steps and not stop.requested and not self._stop_by_callback:
                    if deadline is not None and time.time() >= deadline:
                        stop.request("time limit")
                        break
                    at_boundary = False
                    self._one_step(logger, bar, t0)
                    at_boundary = True
            if self.sb3_callback is not None and not stop.requested:
                self.sb3_callback.on_training_end()
        except KeyboardInterrupt:
            self._interrupted(at_boundary, t0, stop.reason or "interrupt")
        finally:
            bar.close()
            logger.close()
        if stop.requested and self.step < self.config.steps:
            self._interrupted(True, t0, stop.reason or "interrupt")
        final_val = self.history[-1]["val_loss"] if self.history else math.nan
        self.policy.save(self.out_dir / "final")
        result = TrainResult(self.step, self.best_val, self.best_step, final_val, self._elapsed, self.history)
        atomic_write_text(self.out_dir / "result.json", json.dumps(dataclasses.asdict(result), indent=2))
        return result

    def _one_step(self, logger: Any, bar: Any, t0: float) -> None:
        """One optimisation step, its logging, and the validation (with checkpoint) when it is due."""
        metrics = self.train_step()
        self.step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.4f}")
        if self.step % self.config.log_every == 0:
            for k, v in metrics.items():
                logger.record(f"train/{k}", v)
                self._pending[f"train/{k}"] = v
        if self.step % self.config.val_every == 0 or self.step == self.config.steps:
            self._elapsed = time.perf_counter() - t0
            self._validate(logger, metrics)

    def _interrupted(self, consistent: bool, t0: float, reason: str) -> None:
        """Checkpoint the last completed step (when the state is consistent) and raise TrainingInterrupted."""
        if consistent:
            self._elapsed = time.perf_counter() - t0
            self.save_checkpoint()
            self._write_progress()
        if self._saved_step is None:
            raise KeyboardInterrupt
        raise TrainingInterrupted(self._saved_step, self.config.steps, str(self.out_dir), reason)

    def _validate(self, logger: Any, metrics: dict[str, float]) -> None:
        val = validation_loss(self.policy, self.val_batches)
        record = {"step": float(self.step), "val_loss": val, "train_loss": metrics.get("loss", math.nan),
                  "time_s": self._elapsed}
        row = {"time/steps": self.step, "time/elapsed_s": self._elapsed, **self._pending, "val/loss_end": val}
        if self.evaluator is not None and self.config.eval_every and self.step % self.config.eval_every == 0:
            was = self.policy.layer.training
            try:
                figures = self.evaluator(self.policy)
            finally:
                self.policy.layer.train(was)
            for k, v in figures.items():
                record[f"eval_{k}"] = float(v)
                row[f"eval/{k}"] = float(v)
                logger.record(f"eval/{k}", float(v))
        self.history.append(record)
        self.progress_rows.append(row)
        self._pending = {}
        logger.record("val/loss_end", val)
        logger.record("time/steps", self.step)
        logger.dump(self.step)
        if val < self.best_val:
            self.best_val, self.best_step = val, self.step
            self.policy.save(self.out_dir / "best")
        self.save_checkpoint()
        self._write_progress()
        for cb in self.callbacks:
            cb(self, self.step, record)
        if self.sb3_callback is not None:
            self._shim.num_timesteps = self.step
            self.sb3_callback.update_locals(self._callback_locals(record))
            if self.sb3_callback.on_step() is False:
                self._stop_by_callback = True

    def _callback_locals(self, metrics: dict[str, float] | None = None) -> dict[str, Any]:
        """What an SB3 callback finds in ``self.locals`` (see the class docstring)."""
        return {"trainer": self, "step": self.step, "windows_seen": self.step * self.config.batch_size,
                "metrics": metrics or {}}

    def _start_sb3_callback(self, logger: Any) -> None:
        """Initialise the SB3 callback (if any) on a model shim of the policy and call ``on_training_start``."""
        if self.sb3_callback is None:
            return
        from deqmpc_gym.policies.sb3 import SB3ModelShim

        callbacks = getattr(self.sb3_callback, "callbacks", [self.sb3_callback])  # a CallbackList holds several
        env = next((c.eval_env for c in callbacks if getattr(c, "eval_env", None) is not None), None)
        self._shim = SB3ModelShim(self.policy, env=env, logger=logger)
        self._shim.num_timesteps = self.step
        self._stop_by_callback = False
        self.sb3_callback.init_callback(self._shim)
        self.sb3_callback.on_training_start(self._callback_locals(), {})

    def _write_progress(self) -> None:
        if "csv" in self.log_formats:
            write_progress(self.out_dir / "progress.csv", self.progress_rows)


def _split_callbacks(callbacks: Any) -> tuple[tuple[Callable[..., None], ...], Any]:
    """``(plain callables, one SB3 callback or None)`` from one callback or a sequence of them (several SB3
    callbacks are joined in a ``CallbackList``, in order)."""
    from stable_baselines3.common.callbacks import BaseCallback, CallbackList

    try:
        items = [callbacks] if isinstance(callbacks, BaseCallback) or callable(callbacks) else list(callbacks)
    except TypeError:
        raise ConfigError(f"callbacks must be a callback or a sequence of them, got {type(callbacks).__name__}") \
            from None
    sb3 = [c for c in items if isinstance(c, BaseCallback)]
    plain = tuple(c for c in items if not isinstance(c, BaseCallback))
    bad = [type(c).__name__ for c in plain if not callable(c)]
    if bad:
        raise ConfigError(f"callbacks must be callables fn(trainer, step, metrics) or stable-baselines3 "
                          f"BaseCallbacks, got {', '.join(bad)}")
    return plain, (None if not sb3 else sb3[0] if len(sb3) == 1 else CallbackList(sb3))


#: the signals that stop a training after its current step, and the reason each gives
_STOP_SIGNALS = {signal.SIGINT: "interrupt", **({signal.SIGTERM: "terminate"} if hasattr(signal, "SIGTERM") else {})}


class _DeferredInterrupt:
    """While active (in the main thread), the first SIGINT or SIGTERM only sets :attr:`requested` (and
    :attr:`reason`); the training loop stops after the current step. A second one raises ``KeyboardInterrupt`` at
    once. :meth:`request` stops the loop the same way from the loop itself (the deadline)."""

    def __init__(self) -> None:
        self.requested = False
        self.reason: str | None = None
        self._previous: dict[int, Any] = {}

    def request(self, reason: str) -> None:
        self.requested, self.reason = True, self.reason or reason

    def __enter__(self) -> _DeferredInterrupt:
        if threading.current_thread() is threading.main_thread():
            for sig in _STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self._previous.items():
            if previous is None:  # installed outside Python: restore the defaults
                previous = signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
            signal.signal(sig, previous)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and self.reason != "time limit":
            raise KeyboardInterrupt
        self.request(_STOP_SIGNALS.get(signal.Signals(signum), "interrupt"))


def _progress(total: int, initial: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", dynamic_ncols=True)
