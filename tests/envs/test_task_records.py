"""The task (reward, success, termination, obstacle distance) is computed once for both envs and reproduces
the recorded rollouts of ``task_records.py`` (obs, rewards, flags, infos; NaN where NaN): flags exactly, floats bit
for bit on a CPU like the one that wrote the records and to round-off (1e-12) on others, whose vector units (AVX2
against AVX-512) change the last bits of the dynamics' sums."""

from __future__ import annotations

import numpy as np
import pytest
from task_records import RECORDS, batched_records, single_records

from deqmpc_gym.envs import ENV_IDS


@pytest.fixture(scope="module")
def records() -> dict[str, np.ndarray]:
    with np.load(RECORDS) as data:
        return {k: data[k] for k in data.files}


@pytest.mark.parametrize("kind", ["single", "batched"])
@pytest.mark.parametrize("env_id", ENV_IDS)
def test_rollouts_equal_the_records(env_id: str, kind: str, records: dict[str, np.ndarray]) -> None:
    fresh = (single_records if kind == "single" else batched_records)(env_id)
    for field, got in fresh.items():
        want = records[f"{env_id}/{kind}/{field}"]
        assert got.dtype == want.dtype and got.shape == want.shape, (field, got.dtype, want.dtype)
        if np.issubdtype(got.dtype, np.floating) and not np.array_equal(got, want, equal_nan=True):
            np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want), err_msg=f"{env_id} {kind} {field}")
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-13, err_msg=f"{env_id} {kind} {field}")
        else:
            np.testing.assert_array_equal(got, want, err_msg=f"{env_id} {kind} {field}", strict=True)


def test_records_cover_every_branch(records: dict[str, np.ndarray]) -> None:
    """The records exercise terminations, collisions (negative distance) and non-finite states (NaN distance)."""
    obs_ids = [e for e in ENV_IDS if "Obs" in e]
    for kind in ("single", "batched"):
        assert any(records[f"{e}/{kind}/terminated"].any() for e in ENV_IDS)
        assert any((records[f"{e}/{kind}/dist"] < 0).any() for e in obs_ids)
        assert any(np.isnan(records[f"{e}/{kind}/dist"]).any() for e in obs_ids)
        assert any(records[f"{e}/{kind}/success"].any() for e in ENV_IDS)
