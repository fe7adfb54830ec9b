"""Typed errors raised by deqmpc_gym.

Every error subclasses a builtin (``ValueError``, ``ImportError``, ``RuntimeError``, ``OSError``) so callers
can catch either the specific class or the builtin one. Messages say what was wrong and how to fix it.
:class:`TrainingInterrupted` is not a :class:`DeqmpcError`: it is a ``KeyboardInterrupt``, so that ``except Exception``
never swallows a Ctrl-C. Neither is :class:`TimeLimitReached` (the end of a time-limited slice, not an error).
"""

from __future__ import annotations

from gymnasium.error import ResetNeeded as _GymResetNeeded


class DeqmpcError(Exception):
    """Base class of every error raised on purpose by deqmpc_gym."""


class ShapeError(DeqmpcError, ValueError):
    """An array or tensor has the wrong shape, dtype or non-finite values."""


class ConfigError(DeqmpcError, ValueError):
    """A configuration value or keyword argument is invalid or unknown."""


class CheckpointError(DeqmpcError, ValueError):
    """A checkpoint file is corrupt, of the wrong kind, or made for another environment."""


class DatasetError(DeqmpcError, ValueError):
    """A dataset file is corrupt, of the wrong schema version, or made for another environment."""


class DependencyNotInstalled(DeqmpcError, ImportError):
    """An optional dependency is missing; the message names the pip command that installs it."""


class UntrustedEnvIdError(DeqmpcError, ValueError):
    """An env id read from a file is not a registered ``DEQMPC/*`` id (nor the id the caller passed).

    Such ids are refused before ``gym.make`` sees them: ``gym.make("module:Env-v0")`` imports ``module``.
    """


class ResumeMismatchError(CheckpointError):
    """``resume`` found a run in the output folder that was defined differently (variant, configs, dataset).

    Attributes:
        fields: the names of the differing fields (``"policy.variant"``, ``"train.lr"``, ``"dataset.sha256"``...).
    """

    def __init__(self, message: str, fields: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.fields = tuple(fields)


class RunDirError(DeqmpcError, RuntimeError):
    """An output folder is in use by a live run, or holds a run that would be overwritten silently."""


class OutputPathError(DeqmpcError, OSError):
    """An output file or folder cannot be written (missing permission, a file where a folder is needed...)."""


class DeviceError(DeqmpcError, RuntimeError):
    """A torch device is unknown or not available on this machine."""


class ResetNeeded(DeqmpcError, _GymResetNeeded):
    """An environment was stepped before its first ``reset()`` (also a ``gymnasium.error.ResetNeeded``)."""


#: why a training stopped before its budget (:attr:`TrainingInterrupted.reason`): Ctrl-C (SIGINT), SIGTERM (a
#: scheduler or ``kill``), or the deadline passed to ``ImitationTrainer.train`` (``--time-limit``).
STOP_REASONS = ("interrupt", "terminate", "time limit")


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped before its budget; a checkpoint of the last completed step was written.

    Deliberately a ``KeyboardInterrupt`` and not a :class:`DeqmpcError`, so generic ``except Exception`` handlers
    let it through.

    Attributes:
        step: the last completed optimisation step (the checkpoint's step).
        total: the step budget of the run.
        out_dir: the run's output folder (holding ``checkpoint.pt``).
        reason: one of :data:`STOP_REASONS`: ``"interrupt"`` (Ctrl-C), ``"terminate"`` (SIGTERM) or
            ``"time limit"`` (the deadline of the call).
    """

    def __init__(self, step: int, total: int, out_dir: str, reason: str = "interrupt") -> None:
        if reason not in STOP_REASONS:
            raise ValueError(f"reason must be one of {STOP_REASONS}, got {reason!r}")
        why = "interrupted" if reason == "interrupt" else f"stopped ({reason})"
        super().__init__(f"training {why} at step {step} of {total}; checkpoint saved in {out_dir}")
        self.step, self.total, self.out_dir, self.reason = int(step), int(total), str(out_dir), reason


class TimeLimitReached(RuntimeError):
    """A campaign of several runs (``reproduce``, a sweep) reached its deadline: the runs it started were
    checkpointed at a step boundary, the others not started. Running the same call again resumes them.

    Not a :class:`DeqmpcError`: nothing was wrong, the slice is over.

    Attributes:
        unfinished: run name -> what is left of it (``"stopped at step S of N"`` or ``"not started"``).
    """

    def __init__(self, unfinished: dict[str, str]) -> None:
        self.unfinished = dict(unfinished)
        super().__init__(f"time limit reached with {len(unfinished)} run(s) unfinished: "
                         + "; ".join(f"{k}: {v}" for k, v in self.unfinished.items()))


def check_shape(name: str, value, expected: tuple[int | None, ...]) -> None:
    """Raise :class:`ShapeError` unless ``value.shape`` matches ``expected`` (``None`` = any size).

    Args:
        name: argument name used in the message.
        value: a numpy array or torch tensor.
        expected: expected shape; ``None`` entries match any size.
    """
    shape = tuple(value.shape)
    ok = len(shape) == len(expected) and all(e is None or e == s for e, s in zip(expected, shape))
    if not ok:
        want = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        raise ShapeError(f"{name} must have shape {want}, got {shape}")
