"""Launchers for the independent jobs of a sweep: in this process, one after another (``"local"``), or as Ray
tasks (``"ray"``) on a local Ray instance or an existing cluster.

A job is a function and its arguments; :func:`run_jobs` calls ``on_done(name, result)`` in the calling process as
each job finishes (so records are written by one process, as jobs complete), reports a failed job with its name
and goes on with the others, and raises :class:`SweepError` naming the failed jobs at the end.

Ray is optional (``pip install 'deqmpc_gym[cluster]'``). On a cluster every node needs this package installed
(the same version) and a shared file system for the results folder (the jobs write their checkpoints there).
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from deqmpc_gym.errors import ConfigError, DependencyNotInstalled, DeqmpcError

LAUNCHERS = ("local", "ray")


class SweepError(DeqmpcError, RuntimeError):
    """Some jobs of a sweep failed (the others finished); ``failed`` maps their names to the error text."""

    def __init__(self, failed: dict[str, str]) -> None:
        self.failed = dict(failed)
        super().__init__(f"{len(failed)} job(s) failed: " + "; ".join(f"{k}: {v}" for k, v in failed.items()))


@dataclass(frozen=True)
class LaunchConfig:
    """Where and how the jobs run.

    Attributes:
        launcher: ``"local"`` (this process, in order) or ``"ray"``.
        address: Ray cluster address (``"auto"``, ``"ray://host:10001"``, ``"host:6379"``); None starts a local
            Ray instance with this machine's CPUs.
        cpus_per_run: CPUs reserved per job (also its torch / OpenMP threads).
        gpus_per_run: GPUs reserved per job (> 0 runs the job on ``cuda``).
        env_vars: extra environment variables of the Ray workers (``OMP_NUM_THREADS`` is set to
            ``cpus_per_run``); ignored by the local launcher.
    """

    launcher: str = "local"
    address: str | None = None
    cpus_per_run: int = 1
    gpus_per_run: float = 0.0
    env_vars: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.launcher not in LAUNCHERS:
            raise ConfigError(f"launcher must be one of {LAUNCHERS}, got {self.launcher!r}")
        if isinstance(self.cpus_per_run, bool) or not isinstance(self.cpus_per_run, int) or self.cpus_per_run < 1:
            raise ConfigError(f"cpus_per_run must be an int >= 1, got {self.cpus_per_run!r}")
        if not (isinstance(self.gpus_per_run, (int, float)) and self.gpus_per_run >= 0):
            raise ConfigError(f"gpus_per_run must be a number >= 0, got {self.gpus_per_run!r}")
        if self.launcher == "local" and (self.address is not None or self.gpus_per_run):
            raise ConfigError("address and gpus_per_run need launcher='ray' (--launcher ray)")


@dataclass(frozen=True)
class Job:
    """``fn(*args, **kwargs)`` under ``name`` (e.g. a Table 1 run name); ``fn`` must be importable by workers."""

    name: str
    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


def run_jobs(jobs: Sequence[Job], config: LaunchConfig, on_done: Callable[[str, Any], None]) -> None:
    """Run ``jobs`` with ``config``; ``on_done(name, result)`` runs here as each finishes.

    Raises:
        SweepError: after all jobs ran, naming those that raised (their tracebacks were printed to stderr).
        DependencyNotInstalled: ``launcher="ray"`` without Ray installed.
        ConfigError: an unreachable Ray address, or more GPUs per job than the cluster has.
    """
    if not jobs:
        return
    if config.launcher == "local":
        failed: dict[str, str] = {}
        for job in jobs:
            try:
                result = job.fn(*job.args, **job.kwargs)
            except (KeyboardInterrupt, MemoryError):
                raise
            except Exception as exc:  # noqa: BLE001 -- reported with the job's name; the others go on
                traceback.print_exc()
                print(f"job {job.name} failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
                failed[job.name] = f"{type(exc).__name__}: {exc}"
                continue
            on_done(job.name, result)
        if failed:
            raise SweepError(failed)
        return
    _run_ray(jobs, config, on_done)


def _ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise DependencyNotInstalled("--launcher ray needs Ray: pip install 'deqmpc_gym[cluster]' (or pip install "
                                     "ray)") from exc
    return ray


def _connect(ray: Any, config: LaunchConfig) -> bool:
    """Start or join Ray; returns whether this call started it (and should shut it down)."""
    if ray.is_initialized():
        return False
    env = {"OMP_NUM_THREADS": str(config.cpus_per_run), **config.env_vars}
    kw: dict[str, Any] = {"runtime_env": {"env_vars": env}, "log_to_driver": True, "include_dashboard": False}
    try:
        if config.address is None:
            ray.init(num_cpus=os.cpu_count() or 1, **kw)
        else:
            ray.init(address=config.address, **kw)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
        where = config.address or "a local instance"
        raise ConfigError(f"cannot connect to Ray at {where}: {type(exc).__name__}: {exc}".splitlines()[0]) from exc
    return True


def _run_ray(jobs: Sequence[Job], config: LaunchConfig, on_done: Callable[[str, Any], None]) -> None:
    ray = _ray()
    started = _connect(ray, config)
    try:
        have = float(ray.cluster_resources().get("GPU", 0.0))
        if config.gpus_per_run > have:
            raise ConfigError(f"gpus_per_run={config.gpus_per_run} but the Ray cluster has {have:g} GPU(s)")
        remote = ray.remote(num_cpus=config.cpus_per_run, num_gpus=config.gpus_per_run, max_retries=1)(_call)
        pending = {remote.remote(job.fn, config.cpus_per_run, job.args, job.kwargs): job.name for job in jobs}
        failed: dict[str, str] = {}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            name = pending.pop(done[0])
            try:
                result = ray.get(done[0])
            except Exception as exc:  # noqa: BLE001 -- a failed task: reported with its name, the others go on
                msg = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
                print(f"job {name} failed: {msg}", file=sys.stderr, flush=True)
                failed[name] = msg
                continue
            on_done(name, result)
        if failed:
            raise SweepError(failed)
    finally:
        if started:
            ray.shutdown()


def _call(fn: Callable[..., Any], threads: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """A job inside a Ray worker: torch uses the job's CPUs."""
    import torch

    torch.set_num_threads(threads)
    return fn(*args, **kwargs)
