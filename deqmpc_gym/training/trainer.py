"""Imitation training of a :class:`~deqmpc_gym.policies.DEQMPCPolicy` on expert trajectories.

Loss (paper section 4.2 and appendix): for every DEQ-MPC iterate ``j`` (Diff-MPC: the final iterate only)::

    l_j = mean_b [ 1/T sum_t mask_t sum_d |x^j_{t,d} - x^exp_{t,d}|  +  deq_reg * (same for theta^j) ]

summed over iterates. With streaming (``streaming_steps = L > 0``) a window of ``T + L`` expert states is
solved cold from its first state, then warm-started ``L`` times from the next expert states (teacher forcing);
each call's iterates are supervised with their own ``T``-knot sub-window, and the total is divided by ``1 + L``.

Optimisation: Adam (lr 1e-3), gradient-norm clipping 2.0, batch 200, validation on fixed batches every
``val_every`` steps keeping the best checkpoint; checkpoints are written atomically and ``resume=True``
continues a killed run from the last one with the same result as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from deqmpc_gym._config import config_from_dict, require_at_least_one
from deqmpc_gym.data import ExpertDataset
from deqmpc_gym.errors import CheckpointError, ConfigError, DatasetError
from deqmpc_gym.io import atomic_write, atomic_write_text
from deqmpc_gym.policies import DEQMPCPolicy, LayerOutput
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

    def __post_init__(self) -> None:
        require_at_least_one(self, ("steps", "batch_size", "val_every", "val_batches", "log_every"))
        if self.streaming_steps < 0:
            raise ConfigError(f"TrainConfig.streaming_steps must be >= 0, got {self.streaming_steps}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"TrainConfig.val_fraction must be in (0, 1), got {self.val_fraction}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
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


def batch_loss(policy: DEQMPCPolicy, batch: WindowBatch, config: TrainConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of one batch of windows ``(B, T + L, nx)`` (cold solve plus ``L`` warm-started solves)."""
    layer, T = policy.layer, policy.config.horizon
    final_only = layer.variant.diff_mpc
    states, mask = batch.states, batch.mask
    n_calls = 1 + min(config.streaming_steps, states.shape[1] - T)
    out = layer(states[:, 0], None)
    total, end = iterate_loss(out, states[:, :T], mask[:, :T], config.deq_reg, final_only)
    stream = out.state
    for s in range(1, n_calls):
        out = layer(states[:, s], stream)
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
    ``final/`` (policy at the end), ``progress.csv`` (SB3 logger) and ``result.json``.

    Args:
        callbacks: callables ``fn(trainer, step, metrics) -> None`` run after every validation.
        progress: show a tqdm progress bar with loss and ETA.
        log_formats: SB3 logger formats (``"stdout"``, ``"csv"``); ``"tensorboard"`` is added when TensorBoard is
            installed.
    """

    def __init__(self, policy: DEQMPCPolicy, dataset: ExpertDataset, config: TrainConfig, out_dir: str | Path,
                 callbacks: tuple[Callable[..., None], ...] = (), progress: bool = True,
                 log_formats: tuple[str, ...] = ("csv",)) -> None:
        if policy.env_id is not None and dataset.env_id != policy.env_id:
            raise DatasetError(f"dataset was collected on {dataset.env_id!r} but the policy controls "
                               f"{policy.env_id!r}; collect a dataset for {policy.env_id!r}")
        self.policy, self.config, self.out_dir = policy, config, Path(out_dir)
        self.callbacks, self.progress = callbacks, progress
        window = policy.config.horizon + config.streaming_steps
        train, val = dataset.split(config.val_fraction, seed=config.seed)
        self.sampler = WindowSampler(train, policy.system, window, seed=config.seed)
        val_sampler = WindowSampler(val, policy.system, policy.config.horizon, seed=config.seed + 1)
        self.val_batches = val_sampler.fixed_batches(config.val_batches, config.batch_size, seed=config.seed + 1,
                                                     device=policy.device)
        self.optimizer = torch.optim.Adam(policy.layer.net.parameters(), lr=config.lr)
        self.step, self.best_val, self.best_step = 0, math.inf, 0
        self.history: list[dict[str, float]] = []
        self.log_formats = tuple(log_formats)
        if "tensorboard" not in self.log_formats and importlib.util.find_spec("tensorboard") is not None:
            self.log_formats += ("tensorboard",)  # SB3's logger writes TensorBoard events when it is installed
        self._elapsed = 0.0

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / "checkpoint.pt"

    def save_checkpoint(self) -> None:
        """Atomically write the full training state (weights, optimizer, RNG, bookkeeping)."""
        payload = {
            "format": CKPT_FORMAT, "step": self.step, "best_val": self.best_val, "best_step": self.best_step,
            "elapsed": self._elapsed,
            "model": {k: v.detach().cpu() for k, v in self.policy.layer.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "rng_json": json.dumps(self.sampler.rng.bit_generator.state),
            "history_json": json.dumps(self.history),
            "config_json": json.dumps(dataclasses.asdict(self.config)),
        }
        atomic_write(self.checkpoint_path, lambda f: torch.save(payload, f))

    def load_checkpoint(self) -> None:
        """Restore the state written by :meth:`save_checkpoint` (weights_only load)."""
        try:
            payload = torch.load(self.checkpoint_path, map_location=self.policy.device, weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"cannot read training checkpoint {self.checkpoint_path} "
                                  f"({type(exc).__name__}: {exc}); delete it to start over") from exc
        if not isinstance(payload, dict) or payload.get("format") != CKPT_FORMAT:
            raise CheckpointError(f"{self.checkpoint_path} is not a deqmpc_gym training checkpoint")
        saved = json.loads(payload["config_json"])
        # the step budget may grow between resumed runs (nothing else depends on it): extending a finished run
        # gives the weights of an uninterrupted run with the larger budget
        if {k: v for k, v in saved.items() if k != "steps"} != \
                {k: v for k, v in dataclasses.asdict(self.config).items() if k != "steps"}:
            raise CheckpointError(f"{self.checkpoint_path} was written with another TrainConfig {saved}; "
                                  "resume with the same settings (only `steps` may change) or use a new output "
                                  "directory")
        try:
            self.policy.layer.load_state_dict(payload["model"])
        except RuntimeError as exc:
            raise CheckpointError(f"checkpoint weights do not fit this policy: {exc}") from exc
        self.optimizer.load_state_dict(payload["optimizer"])
        self.sampler.rng.bit_generator.state = json.loads(payload["rng_json"])
        self.history = json.loads(payload["history_json"])
        self.step, self.best_val, self.best_step = int(payload["step"]), float(payload["best_val"]), int(payload["best_step"])
        self._elapsed = float(payload["elapsed"])

    # ------------------------------------------------------------------ loop
    def train_step(self) -> dict[str, float]:
        """One optimisation step on a freshly sampled batch."""
        self.policy.layer.train()
        batch = self.sampler.sample(self.config.batch_size, device=self.policy.device)
        loss, metrics = batch_loss(self.policy, batch, self.config)
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

    def train(self, resume: bool = False) -> TrainResult:
        """Run (or, with ``resume=True`` and an existing checkpoint, continue) training to ``config.steps``."""
        from stable_baselines3.common.logger import configure

        self.out_dir.mkdir(parents=True, exist_ok=True)
        if resume and self.checkpoint_path.exists():
            self.load_checkpoint()
        logger = configure(str(self.out_dir), list(self.log_formats))
        bar = _progress(self.config.steps, self.step, self.progress)
        t0 = time.perf_counter() - self._elapsed
        try:
            while self.step < self.config.steps:
                metrics = self.train_step()
                self.step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.4f}")
                if self.step % self.config.log_every == 0:
                    for k, v in metrics.items():
                        logger.record(f"train/{k}", v)
                if self.step % self.config.val_every == 0 or self.step == self.config.steps:
                    self._elapsed = time.perf_counter() - t0
                    self._validate(logger, metrics)
        finally:
            bar.close()
            logger.close()
        final_val = self.history[-1]["val_loss"] if self.history else math.nan
        self.policy.save(self.out_dir / "final")
        result = TrainResult(self.step, self.best_val, self.best_step, final_val, self._elapsed, self.history)
        atomic_write_text(self.out_dir / "result.json", json.dumps(dataclasses.asdict(result), indent=2))
        return result

    def _validate(self, logger: Any, metrics: dict[str, float]) -> None:
        val = validation_loss(self.policy, self.val_batches)
        record = {"step": float(self.step), "val_loss": val, "train_loss": metrics.get("loss", math.nan),
                  "time_s": self._elapsed}
        self.history.append(record)
        logger.record("val/loss_end", val)
        logger.record("time/steps", self.step)
        logger.dump(self.step)
        if val < self.best_val:
            self.best_val, self.best_step = val, self.step
            self.policy.save(self.out_dir / "best")
        self.save_checkpoint()
        for cb in self.callbacks:
            cb(self, self.step, record)


def _progress(total: int, initial: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", dynamic_ncols=True)
