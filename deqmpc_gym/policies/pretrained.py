"""The trained DEQ-MPC controllers shipped with the package (the model zoo), and their cards.

Each shipped controller lives in ``deqmpc_gym/pretrained_policies/<Env>/<variant>/`` as a directory written by
:meth:`~deqmpc_gym.policies.DEQMPCPolicy.save` (``policy.pt`` float32 weights, ``config.json``) plus a
``card.json`` saying how it was trained and how well it does (:data:`CARD_FORMAT`). Load one with
:meth:`DEQMPCPolicy.from_pretrained("DEQMPC/Pendulum-v0", variant="deq-mpc-deq")
<deqmpc_gym.policies.DEQMPCPolicy.from_pretrained>`; list them with :func:`available`.

This module only resolves paths and reads cards; it imports no policy code (the policy imports it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from deqmpc_gym.errors import CheckpointError, ConfigError
from deqmpc_gym.policies.config import Variant

#: where the shipped controllers live (package data)
ZOO_DIR = Path(__file__).resolve().parent.parent / "pretrained_policies"
CARD_FORMAT = "deqmpc_gym.pretrained_policy"


def _short(env_id: str) -> str:
    """``"DEQMPC/QPole-v0" -> "QPole-v0"``."""
    return env_id.split("/", 1)[-1]


def available(root: Path | None = None) -> list[tuple[str, str]]:
    """``[(env_id, variant), ...]`` of every shipped controller, sorted (env ids as ``"DEQMPC/<Env>-v0"``)."""
    root = ZOO_DIR if root is None else Path(root)
    out = []
    for card in sorted(root.glob("*/*/card.json")):
        out.append((f"DEQMPC/{card.parent.parent.name}", card.parent.name))
    return out


def _listing(items: list[tuple[str, str]]) -> str:
    if not items:
        return "no pretrained controller ships with this installation"
    by_env: dict[str, list[str]] = {}
    for env_id, variant in items:
        by_env.setdefault(env_id, []).append(variant)
    return "; ".join(f"{e}: {', '.join(v)}" for e, v in by_env.items())


def pretrained_dir(env_id: str, variant: str | Variant = "deq-mpc-deq", root: Path | None = None) -> Path:
    """The directory of the shipped controller for ``env_id`` and ``variant``.

    Raises:
        ConfigError: ``env_id`` or ``variant`` is not a string / known variant, or no controller ships for the
            pair; the message lists what ships.
    """
    if not isinstance(env_id, str):
        raise ConfigError(f"env_id must be a string such as 'DEQMPC/Pendulum-v0', got {type(env_id).__name__}")
    name = Variant.resolve(variant).value
    items = available(root)
    path = (ZOO_DIR if root is None else Path(root)) / _short(env_id) / name
    if (env_id, name) not in items or not (path / "policy.pt").is_file():
        raise ConfigError(f"no pretrained {name!r} controller for {env_id!r}; shipped: {_listing(items)}")
    return path


def card(env_id: str, variant: str | Variant = "deq-mpc-deq", root: Path | None = None) -> dict[str, Any]:
    """The ``card.json`` of a shipped controller as a dict (see :func:`pretrained_dir` for the errors)."""
    f = pretrained_dir(env_id, variant, root) / "card.json"
    try:
        data = json.loads(f.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read the card {f}: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != CARD_FORMAT:
        raise CheckpointError(f"{f} is not a deqmpc_gym pretrained-policy card (format {CARD_FORMAT!r})")
    return data


__all__ = ["ZOO_DIR", "CARD_FORMAT", "available", "pretrained_dir", "card"]
