"""Launchers for the independent jobs of a sweep: in this process, one after another (``"local"``), or as Ray
tasks (``"ray"``) on a local Ray instance or an existing cluster.

A job is a function and its arguments; :func:`run_jobs` calls ``on_done(name, result)`` in the calling process as
each job finishes (so records are written by one process, as jobs complete), reports a failed job with its name
and goes on with the others, and raises :class:`SweepError` naming the failed jobs at the end.

With a deadline (``LaunchConfig.deadline``, the CLI's ``--time-limit``) the launch is one slice of a longer
campaign: no job starts after it, and training jobs (which take ``deadline=``) checkpoint at the first step
boundary after it; :func:`run_jobs` then raises :class:`~deqmpc_gym.errors.TimeLimitReached` naming what is left,
and the same call later resumes it.

Ray is optional (``pip install 'deqmpc_gym[cluster]'``). On a cluster every node needs this package installed
(the same version) and a shared file system for the results folder (the jobs write their checkpoints there). A Ray
task whose worker dies (a killed process, a lost node) runs again up to ``LaunchConfig.max_retries`` times; jobs that
checkpoint (training) resume from their checkpoint. Before any job starts, the address is checked for a listening
server and the per-job CPUs / GPUs against the largest node of the cluster (a task that fits no node would wait
forever).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from deqmpc_gym._config import check_deadline
from deqmpc_gym.errors import ConfigError, DependencyNotInstalled, DeqmpcError, TimeLimitReached, TrainingInterrupted

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
        max_retries: how often Ray runs a job again whose worker died (not for a job that raised: that one is
            reported as failed); ignored by the local launcher.
        deadline: a ``time.time()`` instant [s since the epoch] after which no job starts and training jobs stop at
            a checkpoint (:func:`run_jobs`); None: no limit. :func:`deadline_in` makes one from a duration.
    """

    launcher: str = "local"
    address: str | None = None
    cpus_per_run: int = 1
    gpus_per_run: float = 0.0
    env_vars: dict[str, str] = field(default_factory=dict)
    max_retries: int = 2
    deadline: float | None = None

    def __post_init__(self) -> None:
        check_deadline(self.deadline)
        if self.launcher not in LAUNCHERS:
            raise ConfigError(f"launcher must be one of {LAUNCHERS}, got {self.launcher!r}")
        if isinstance(self.cpus_per_run, bool) or not isinstance(self.cpus_per_run, int) or self.cpus_per_run < 1:
            raise ConfigError(f"cpus_per_run must be an int >= 1, got {self.cpus_per_run!r}")
        if not (isinstance(self.gpus_per_run, (int, float)) and self.gpus_per_run >= 0):
            raise ConfigError(f"gpus_per_run must be a number >= 0, got {self.gpus_per_run!r}")
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise ConfigError(f"max_retries must be an int >= 0, got {self.max_retries!r}")
        if self.launcher == "local" and (self.address is not None or self.gpus_per_run):
            raise ConfigError("address and gpus_per_run need launcher='ray' (--launcher ray)")


@dataclass(frozen=True)
class Job:
    """``fn(*args, **kwargs)`` under ``name`` (e.g. a Table 1 run name); ``fn`` must be importable by workers."""

    name: str
    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


def deadline_in(seconds: float) -> float:
    """The ``time.time()`` instant ``seconds`` from now, for ``LaunchConfig(deadline=...)`` and
    ``ImitationTrainer.train(deadline=...)``."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds) \
            or seconds <= 0:
        raise ConfigError(f"a time limit must be a positive number of seconds, got {seconds!r}")
    return time.time() + float(seconds)


def parse_duration(text: str) -> float:
    """Seconds of a duration such as ``"90m"``, ``"2.5h"``, ``"1h30m"``, ``"45s"`` or ``"3600"`` (seconds).

    Raises:
        ConfigError: an unreadable or non-positive duration.
    """
    units = {"h": 3600.0, "m": 60.0, "s": 1.0}
    t = str(text).strip().lower()
    number = r"(\d+(?:\.\d*)?)"
    if re.fullmatch(number, t):
        total = float(t)
    else:
        parts = re.fullmatch(f"(?:{number}h)?(?:{number}m)?(?:{number}s)?", t)
        if not t or parts is None or not any(parts.groups()):
            raise ConfigError(f"cannot read the duration {text!r}; write e.g. 90m, 2.5h, 1h30m, 45s or 3600 "
                              "(seconds)")
        total = sum(float(v) * units[u] for v, u in zip(parts.groups(), "hms") if v)
    if total <= 0:
        raise ConfigError(f"a time limit must be positive, got {text!r}")
    return total


def _past(deadline: float | None) -> bool:
    return deadline is not None and time.time() >= deadline


@dataclass(frozen=True)
class _Unfinished:
    """What a job left when the deadline stopped it (returned by Ray workers instead of raising)."""

    what: str


def _stopped(exc: TrainingInterrupted) -> _Unfinished:
    return _Unfinished(f"stopped at step {exc.step} of {exc.total} (checkpoint in {exc.out_dir})")


def run_jobs(jobs: Sequence[Job], config: LaunchConfig, on_done: Callable[[str, Any], None]) -> None:
    """Run ``jobs`` with ``config``; ``on_done(name, result)`` runs here as each finishes.

    Raises:
        SweepError: after all jobs ran, naming those that raised (their tracebacks were printed to stderr).
        TimeLimitReached: ``config.deadline`` passed before every job finished (and none failed): the unfinished
            ones, stopped at a checkpoint or not started.
        DependencyNotInstalled: ``launcher="ray"`` without Ray installed.
        ConfigError: an unreachable Ray address, or more CPUs / GPUs per job than the largest node of the cluster
            has.
    """
    if not jobs:
        return
    if config.launcher == "local":
        failed: dict[str, str] = {}
        unfinished: dict[str, str] = {}
        for job in jobs:
            if _past(config.deadline):
                unfinished[job.name] = "not started"
                continue
            try:
                result = job.fn(*job.args, **job.kwargs)
            except TrainingInterrupted as exc:
                if exc.reason != "time limit":
                    raise
                unfinished[job.name] = _stopped(exc).what
                continue
            except (KeyboardInterrupt, MemoryError):
                raise
            except Exception as exc:  # noqa: BLE001 -- reported with the job's name; the others go on
                traceback.print_exc()
                print(f"job {job.name} failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
                failed[job.name] = f"{type(exc).__name__}: {exc}"
                continue
            on_done(job.name, result)
        _raise_left(failed, unfinished)
        return
    _run_ray(jobs, config, on_done)


def _raise_left(failed: dict[str, str], unfinished: dict[str, str]) -> None:
    """The end of a launch: failed jobs first (an error), then what the deadline left."""
    if failed:
        raise SweepError(failed)
    if unfinished:
        raise TimeLimitReached(unfinished)


def _ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise DependencyNotInstalled("--launcher ray needs Ray: pip install 'deqmpc_gym[cluster]' (or pip install "
                                     "ray)") from exc
    return ray


@contextlib.contextmanager
def connection(config: LaunchConfig) -> Iterator[None]:
    """Keep one Ray connection open for several :func:`run_jobs` calls with ``config`` (each call would otherwise
    start and stop a local instance of its own); does nothing for the local launcher.

    Raises:
        DependencyNotInstalled, ConfigError: as :func:`run_jobs`.
    """
    if config.launcher != "ray":
        yield
        return
    ray = _ray()
    started = _connect(ray, config)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


#: the former name of :func:`connection`, kept for code that imports it.
session = connection


def _host_port(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of ``HOST:PORT`` / ``ray://HOST:PORT`` / ``[IPv6]:PORT``; None for ``auto`` (Ray finds
    the local cluster) or an address without a port."""
    rest = address.split("://", 1)[-1].rstrip("/")
    if rest in ("auto", "local") or ":" not in rest:
        return None
    host, _, port = rest.rpartition(":")
    host = host.strip("[]")
    if not port.isdigit():
        raise ConfigError(f"Ray address {address!r} is not HOST:PORT, ray://HOST:PORT or auto")
    return host, int(port)


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A listening server at ``address`` (ray.init itself retries an absent one for minutes, then exits)."""
    hp = _host_port(address)
    if hp is None:
        return
    try:
        with socket.create_connection(hp, timeout=timeout_s):
            pass
    except OSError as exc:
        raise ConfigError(f"cannot reach the Ray cluster at {address} ({exc.strerror or type(exc).__name__}); "
                          "start its head with `ray start --head` or check --address") from exc


def _connect(ray: Any, config: LaunchConfig) -> bool:
    """Start or join Ray (a running instance of this process is joined as it is) and check that a job fits a node;
    returns whether this call started Ray (and should shut it down)."""
    started = False
    if not ray.is_initialized():
        env = {"OMP_NUM_THREADS": str(config.cpus_per_run), **config.env_vars}
        kw: dict[str, Any] = {"runtime_env": {"env_vars": env}, "log_to_driver": True, "include_dashboard": False}
        try:
            if config.address is None:
                ray.init(num_cpus=os.cpu_count() or 1, **kw)
            else:
                _check_reachable(config.address)
                ray.init(address=config.address, **kw)
        except (ConnectionError, RuntimeError, ValueError, TimeoutError, SystemExit) as exc:
            where = config.address or "a local instance"
            raise ConfigError(f"cannot connect to Ray at {where}: {type(exc).__name__}: {exc}".splitlines()[0]) \
                from exc
        started = True
    try:
        _check_resources(ray, config)
    except ConfigError:
        if started:
            ray.shutdown()
        raise
    return started


def _check_resources(ray: Any, config: LaunchConfig) -> None:
    """The job's CPUs and GPUs fit the largest alive node (Ray would keep an infeasible task pending forever)."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive", True)]
    for key, want, what in (("CPU", float(config.cpus_per_run), "cpus_per_run"),
                            ("GPU", float(config.gpus_per_run), "gpus_per_run")):
        have = max((float(r.get(key, 0.0)) for r in nodes), default=0.0)
        if want > have:
            raise ConfigError(f"{what}={want:g} but the largest node of the Ray cluster has {have:g} {key}(s)"
                              f" (--{what.replace('_', '-')})")


def _run_ray(jobs: Sequence[Job], config: LaunchConfig, on_done: Callable[[str, Any], None]) -> None:
    ray = _ray()
    started = _connect(ray, config)
    try:
        remote = ray.remote(num_cpus=config.cpus_per_run, num_gpus=config.gpus_per_run,
                            max_retries=config.max_retries)(_call)
        pending = {remote.remote(job.fn, config.cpus_per_run, job.args, job.kwargs, config.deadline): job.name
                   for job in jobs}
        failed: dict[str, str] = {}
        unfinished: dict[str, str] = {}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            name = pending.pop(done[0])
            try:
                result = ray.get(done[0])
            except Exception as exc:  # noqa: BLE001 -- a failed task: reported with its name, the others go on
                msg = _task_error(exc)
                print(f"job {name} failed: {msg}", file=sys.stderr, flush=True)
                failed[name] = msg
                continue
            if isinstance(result, _Unfinished):
                unfinished[name] = result.what
                continue
            on_done(name, result)
        _raise_left(failed, unfinished)
    finally:
        if started:
            ray.shutdown()


def _task_error(exc: BaseException) -> str:
    """One line for a failed Ray task: the job's own exception (``TYPE: message``), or Ray's error."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {' '.join(str(cause).split())}"
    text = str(exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__


def _call(fn: Callable[..., Any], threads: int, args: tuple[Any, ...], kwargs: dict[str, Any],
          deadline: float | None = None) -> Any:
    """A job inside a Ray worker: torch uses the job's CPUs; after the deadline the job does not start, and a
    training the deadline stopped returns what it left (Ray would report the exception as a failure)."""
    import torch

    if _past(deadline):
        return _Unfinished("not started")
    torch.set_num_threads(threads)
    try:
        return fn(*args, **kwargs)
    except TrainingInterrupted as exc:
        if exc.reason != "time limit":
            raise
        return _stopped(exc)
