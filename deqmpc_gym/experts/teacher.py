"""An obstacle-aware MPC teacher that guides a PPO expert, distilled into the PPO actor by DAgger.

PPO experts on the obstacle variants learn the direct route to the goal and cut past some spheres (6-11 % of
episodes collide). The teacher is a *safety filter* around the PPO expert: at every step it rolls the expert's own
policy ``horizon`` steps through the model; where that plan comes close to an obstacle, it solves the MPC
(:mod:`deqmpc_gym.mpc`) that tracks the plan under the sphere constraints enlarged by ``margin`` and returns its
first control; elsewhere it returns the expert's action unchanged. The MPC sees the obstacles and a longer
horizon; the expert supplies the route to the goal, which a short-horizon tracking MPC alone would not find.

:func:`refine_with_teacher` distils the teacher into the expert's PPO actor with DAgger (Ross et al. 2011): round
0 rolls out the teacher, later rounds roll out the student, the teacher labels every visited state, and the actor
is fitted to the aggregated labels after each round. The shipped expert stays the PPO policy network (the same
architecture and observation normalisation); the round with the best validation score is kept, and the plain
PPO actor competes as round ``-1``, so refinement never makes an expert worse on the validation episodes.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deqmpc_gym._config import require_at_least_one
from deqmpc_gym.checkpoint import check_definition, load_checkpoint, save_checkpoint
from deqmpc_gym.errors import CheckpointError, ConfigError

#: seed of round ``r``'s initial states is ``TeacherConfig.seed + ROUND_SEED_STRIDE * r``
ROUND_SEED_STRIDE = 1000
#: layout version of the refinement checkpoint (another version is refused: delete the file to start over)
CHECKPOINT_VERSION = 2
#: the ``format`` of a refinement checkpoint (:mod:`deqmpc_gym.checkpoint`)
CHECKPOINT_FORMAT = "deqmpc_gym.teacher_checkpoint"


@dataclass(frozen=True)
class TeacherConfig:
    """The MPC safety-filter teacher and its DAgger distillation (defaults: measured on QuadrotorObs / QPoleObs).

    Attributes:
        horizon: lookahead steps ``H`` of the expert's plan (the MPC has ``H + 1`` knots).
        margin: [m] added to the env's obstacle radius in the MPC's sphere constraints.
        trigger: [m] the MPC acts where the plan's clearance to the enlarged spheres is below this.
        rho_init: first AL penalty of the MPC's solves.
        iters: at most this many AL iterations per solve (each sample stops once converged).
        rounds: DAgger rounds (round 0: the teacher drives; later rounds: the student drives).
        episodes, steps: episodes per round (one batch) and their length.
        epochs, batch_size, learning_rate: Adam passes over the aggregated data after each round.
        mpc_weight: a label's loss weight is ``1 + mpc_weight * max_i |label_i - a_i|^2`` with ``a`` the PPO
            expert's action: the few states where the MPC overrides the expert by much (those that decide a
            collision) count most; the rest carry the expert's own actions and keep the actor where it is.
        seed: initial states of round ``r`` use ``seed + 1000 r`` (kept apart from the card's evaluation seeds
            10000-10199 and from ``val_seed``).
        val_seed, val_episodes: validation rollouts that pick the kept round (score: success rate minus
            collision rate).
    """

    horizon: int = 10
    margin: float = 0.2
    trigger: float = 0.3
    rho_init: float = 10.0
    iters: int = 10
    rounds: int = 14
    episodes: int = 200
    steps: int = 200
    epochs: int = 30
    batch_size: int = 4096
    learning_rate: float = 1e-3
    mpc_weight: float = 30.0
    seed: int = 20_000
    val_seed: int = 40_000
    val_episodes: int = 200

    def __post_init__(self) -> None:
        require_at_least_one(self, ("horizon", "iters", "rounds", "episodes", "steps", "epochs", "batch_size",
                                    "val_episodes"))
        for name in ("margin", "trigger"):
            if not getattr(self, name) >= 0.0:
                raise ConfigError(f"TeacherConfig.{name} must be >= 0 [m], got {getattr(self, name)!r}")
        if not (self.rho_init > 0.0 and self.learning_rate > 0.0 and self.mpc_weight >= 0.0):
            raise ConfigError(f"TeacherConfig needs rho_init > 0, learning_rate > 0 and mpc_weight >= 0, got "
                              f"{self.rho_init!r}, {self.learning_rate!r} and {self.mpc_weight!r}")


class SafetyFilterTeacher:
    """The MPC safety filter around a PPO expert on a batched obstacle env (see the module docstring).

    Args:
        expert: the PPO :class:`~deqmpc_gym.experts.Expert` whose plan is tracked (kept frozen).
        env: the :class:`~deqmpc_gym.envs.BatchedSystemEnv` whose states are labelled (observations = states).
        config: :class:`TeacherConfig`.
    """

    def __init__(self, expert: Any, env: Any, config: TeacherConfig = TeacherConfig()) -> None:
        from deqmpc_gym.mpc import MPCConfig, MPCProblem

        system = env.system
        if not getattr(env, "obstacles", False):
            raise ConfigError(f"the MPC teacher needs an obstacle variant, {expert.env_id} has no obstacles")
        if expert.obs_dim != system.nx:
            raise ConfigError(f"the MPC teacher needs observations equal to states (obs_dim {expert.obs_dim} != "
                              f"nx {system.nx})")
        self.expert, self.env, self.config, self.system = expert, env, config, system
        self.radius = float(env.obstacle_radius) + config.margin
        self.problem = MPCProblem(system, MPCConfig(horizon=config.horizon + 1, rho_init=config.rho_init),
                                  obstacle_centers=env.obstacle_centers, obstacle_radius=self.radius)
        self._centers = np.asarray(env.obstacle_centers, dtype=np.float64)
        self._pos = slice(*system.position_slice)

    def plan(self, x: torch.Tensor) -> torch.Tensor:
        """The expert's ``H``-step plan ``(N, H + 1, nx)`` float64 from states ``x: (N, nx)`` (knot 0 is ``x``;
        angles continuous along the plan, the expert sees them wrapped)."""
        xs, xc = [x], x
        for _ in range(self.config.horizon):
            a, _ = self.expert.predict(np.nan_to_num(self.system.wrap(xc).numpy()), deterministic=True)
            u = torch.as_tensor(self.env.to_physical(a), dtype=x.dtype)
            xc = self.system.step(xc, u)
            xs.append(xc)
        return torch.stack(xs, 1)

    def act(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Teacher actions for states ``x: (N, nx)`` float64 CPU tensor [physical units].

        Returns:
            ``(actions (N, nu) float32 normalized to [-1, 1], intervened (N,) bool, expert_actions (N, nu))``:
            the MPC's first control where the expert's plan comes within ``trigger`` of the enlarged spheres (and
            the solve is finite), the expert's action elsewhere; and the expert's own actions.
        """
        from deqmpc_gym.mpc import solve

        cfg = self.config
        a0, _ = self.expert.predict(np.nan_to_num(x.numpy()), deterministic=True)
        theta = self.plan(x)
        p = theta[:, 1:, self._pos].numpy()
        clear = np.linalg.norm(p[:, :, None, :] - self._centers[None, None], axis=-1).min((1, 2)) - self.radius
        need = np.nan_to_num(clear, nan=np.inf) < cfg.trigger
        finite = torch.isfinite(theta).flatten(1).all(1)
        theta = torch.where(finite[:, None, None], theta, x[:, None].expand_as(theta))
        use = need & finite.numpy()
        idx = np.flatnonzero(use)
        out = a0.astype(np.float32)
        if idx.size == 0:
            return out, use, a0
        # a cold solve per labelled state: the label is a function of the state alone (not of a warm start's
        # history), which the student can fit
        ii = torch.as_tensor(idx)
        _, u, _, info = solve(self.problem, x[ii], theta[ii], None, iters=cfg.iters, stop_when_converged=True)
        a_mpc = np.clip(self.env.to_normalized(u[:, 0].numpy()), -1.0, 1.0)
        ok = np.isfinite(a_mpc).all(1) & ~info.nonfinite.numpy()
        out[idx[ok]] = a_mpc[ok]
        use[idx[~ok]] = False
        return out, use, a0


def _actor_mean(policy: Any, inputs: torch.Tensor) -> torch.Tensor:
    """The Gaussian mean ``(n, nu)`` of an SB3 ``ActorCriticPolicy`` on normalized inputs (differentiable)."""
    return policy.get_distribution(inputs).distribution.mean


def _label_loss(mean: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Per-sample ``(n,)`` squared error to the label; a label at a bound (|a| >= 0.999) only asks the mean to
    reach it (the expert's deterministic action is ``clip(mean, -1, 1)``: any mean beyond the bound acts the same)."""
    at_bound = label.abs() >= 0.999
    err = torch.where(at_bound, torch.relu(label.sign() * (label - mean)), mean - label)
    return (err * err).mean(-1)


def _fit(policy: Any, inputs: np.ndarray, labels: np.ndarray, by_mpc: np.ndarray, disagreement: np.ndarray,
         config: TeacherConfig, generator: torch.Generator) -> tuple[float, float]:
    """Fit the actor (policy net and action head) to ``labels (M, nu)`` on ``inputs (M, d)``, weighted by
    ``1 + config.mpc_weight * disagreement**2``. Returns the mean loss on all rows and on the MPC-labelled rows
    (``by_mpc (M,) bool``)."""
    params = list(policy.mlp_extractor.policy_net.parameters()) + list(policy.action_net.parameters())
    opt = torch.optim.Adam(params, lr=config.learning_rate)
    xin = torch.as_tensor(inputs, dtype=torch.float32)
    yl = torch.as_tensor(labels, dtype=torch.float32)
    mpc = torch.as_tensor(by_mpc, dtype=torch.bool)
    w = 1.0 + config.mpc_weight * torch.as_tensor(disagreement, dtype=torch.float32) ** 2
    m = xin.shape[0]
    policy.set_training_mode(True)
    for _ in range(config.epochs):
        perm = torch.randperm(m, generator=generator)
        for i in range(0, m, config.batch_size):
            idx = perm[i:i + config.batch_size]
            loss = (w[idx] * _label_loss(_actor_mean(policy, xin[idx]), yl[idx])).sum() / w[idx].sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    policy.set_training_mode(False)
    with torch.no_grad():
        per = _label_loss(_actor_mean(policy, xin), yl)
    return float(per.mean()), float(per[mpc].mean()) if bool(mpc.any()) else 0.0


def _rollout(env: Any, teacher: SafetyFilterTeacher, student: Any | None, seed: int, steps: int
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, float]]:
    """One batch of episodes driven by the teacher (``student=None``) or the student; the teacher labels every
    state of a live episode. Returns ``(raw observations (M, nx), labels (M, nu), by_mpc (M,) bool,
    disagreement (M,): max |label - PPO expert's action|, stats)``."""
    obs, _ = env.reset(seed=seed)
    n = env.num_envs
    alive = np.ones(n, bool)
    crashed = np.zeros(n, bool)
    success = np.zeros(n, bool)
    xs, ys, ms, ds = [], [], [], []
    for _ in range(steps):
        x = env.state.to(torch.float64).cpu()[torch.as_tensor(alive)]  # ended episodes are not labelled
        labels, used, a0 = teacher.act(x)
        xs.append(x.numpy())
        ys.append(labels)
        ms.append(used)
        ds.append(np.abs(labels - a0).max(1))
        if student is None:
            act = np.zeros((n, labels.shape[1]), dtype=np.float32)  # ended episodes' actions are ignored
            act[alive] = labels
        else:
            act, _ = student.predict(np.nan_to_num(np.asarray(obs, dtype=np.float64)), deterministic=True)
        r = env.step_arrays(np.nan_to_num(np.asarray(act, dtype=np.float32)))
        obs = r.obs.cpu().numpy()
        term = r.terminated.cpu().numpy()
        success = np.where(alive, r.is_success.cpu().numpy(), success)
        crashed |= alive & term
        alive &= ~term
        if not alive.any():
            break
    by_mpc = np.concatenate(ms)
    stats = {"states": int(by_mpc.size), "interventions": int(by_mpc.sum()),
             "collision_rate": float(crashed.mean()), "success_rate": float((success & alive).mean())}
    return np.concatenate(xs), np.concatenate(ys), by_mpc, np.concatenate(ds), stats


def refine_with_teacher(expert: Any, config: TeacherConfig = TeacherConfig(), *,
                        checkpoint: str | Path | None = None,
                        log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """DAgger distillation of the MPC safety-filter teacher into ``expert``'s PPO actor (in place).

    Args:
        expert: a loaded :class:`~deqmpc_gym.experts.Expert` of an obstacle variant; its ``policy`` (an SB3
            ``ActorCriticPolicy``) is updated in place to the kept round's weights.
        config: :class:`TeacherConfig`.
        checkpoint: a file that stores the finished rounds (the aggregated data and the actor), so an
            interrupted refinement resumes after its last finished round (asked for more ``rounds``, a finished
            one continues); None: no checkpoint. A checkpoint of other teacher settings, of another PPO actor or
            with more rounds than ``config.rounds`` raises :class:`~deqmpc_gym.errors.ResumeMismatchError`
            naming the fields (:mod:`deqmpc_gym.checkpoint`).
        log: called with one line per round.

    Returns:
        A record for the expert card: the config, per-round statistics (teacher/student rollouts and validation
        success/collision rates) and ``kept_round`` (``-1``: the plain PPO actor).
    """
    from deqmpc_gym.envs import make_batched_env
    from deqmpc_gym.evaluation import EvalConfig, rollout_batched

    log = log or (lambda s: None)
    env = make_batched_env(expert.env_id, config.episodes, max_episode_steps=None)
    teacher = SafetyFilterTeacher(copy.deepcopy(expert), env, config)  # labels come from the frozen PPO expert
    gen = torch.Generator().manual_seed(config.seed)
    val_cfg = EvalConfig(episodes=config.val_episodes, max_steps=config.steps, seed=config.val_seed)

    def validate() -> dict[str, float]:
        res = rollout_batched(expert, expert.env_id, val_cfg)
        return {"val_success_rate": res.success_rate, "val_collision_rate": res.collision_rate,
                "val_mean_return": res.mean_return}

    policy = expert.policy
    ckpt = Path(checkpoint) if checkpoint is not None else None
    base = _fingerprint(policy.state_dict())  # a checkpoint of another PPO actor is not resumed
    saved = _load_checkpoint(ckpt, config, base)
    if saved is not None:
        rounds, best = saved["rounds"], saved["best"]
        data_x, data_y, data_m, data_d = saved["data_x"], saved["data_y"], saved["data_m"], saved["data_d"]
        policy.load_state_dict(saved["actor"])
        gen.set_state(saved["generator"])
        log(f"teacher: resumed after round {len(rounds) - 2} from {ckpt}")
    else:
        v = validate()
        rounds = [{"round": -1, **v}]
        best = {"round": -1, "score": v["val_success_rate"] - v["val_collision_rate"],
                "actor": copy.deepcopy(policy.state_dict())}
        data_x = np.zeros((0, env.system.nx))
        data_y = np.zeros((0, env.system.nu), dtype=np.float32)
        data_m = np.zeros(0, dtype=bool)
        data_d = np.zeros(0, dtype=np.float32)
        log(f"teacher: PPO actor val success {v['val_success_rate']:.1%}, collisions {v['val_collision_rate']:.1%}")
    for r in range(len(rounds) - 1, config.rounds):
        t0 = time.perf_counter()
        xs, ys, ms, ds, st = _rollout(env, teacher, None if r == 0 else expert,
                                      config.seed + ROUND_SEED_STRIDE * r, config.steps)
        data_x, data_y = np.concatenate([data_x, xs]), np.concatenate([data_y, ys])
        data_m, data_d = np.concatenate([data_m, ms]), np.concatenate([data_d, ds])
        loss, loss_mpc = _fit(policy, expert.inputs(data_x), data_y, data_m, data_d, config, gen)
        v = validate()
        score = v["val_success_rate"] - v["val_collision_rate"]
        rec = {"round": r, "driver": "teacher" if r == 0 else "student",
               **{f"rollout_{k}": val for k, val in st.items()}, "fit_loss": loss, "fit_loss_mpc": loss_mpc, **v,
               "wall_time_s": round(time.perf_counter() - t0, 1)}
        rounds.append(rec)
        if score > best["score"]:
            best = {"round": r, "score": score, "actor": copy.deepcopy(policy.state_dict())}
        log(f"teacher: round {r} ({rec['driver']} drove: success {st['success_rate']:.1%}, collisions "
            f"{st['collision_rate']:.1%}, {st['interventions']} MPC labels of {st['states']}), fit loss {loss:.4f} "
            f"(MPC labels {loss_mpc:.4f}); "
            f"val success {v['val_success_rate']:.1%}, collisions {v['val_collision_rate']:.1%}")
        _save_checkpoint(ckpt, config, base, rounds, best, (data_x, data_y, data_m, data_d), policy.state_dict(),
                         gen.get_state())
    policy.load_state_dict(best["actor"])
    policy.set_training_mode(False)
    return {"config": dataclasses.asdict(config), "rounds": rounds, "kept_round": best["round"],
            "labelled_states": int(data_x.shape[0]),
            "wall_time_s": round(sum(r.get("wall_time_s", 0.0) for r in rounds), 1)}


def _fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """A short hash of a state dict's values (identifies the PPO actor a refinement started from)."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        h.update(k.encode())
        h.update(state_dict[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _definition(config: TeacherConfig, base: str) -> dict[str, Any]:
    """The flat definition of a refinement (:mod:`deqmpc_gym.checkpoint`): the teacher settings except ``rounds``
    (more rounds may be asked of a refinement) and the fingerprint of the PPO actor it started from."""
    out = {f"teacher.{k}": v for k, v in dataclasses.asdict(config).items() if k != "rounds"}
    out["teacher.ppo_actor"] = base
    return json.loads(json.dumps(out))


def _save_checkpoint(path: Path | None, config: TeacherConfig, base: str, rounds, best, data, actor,
                     gen_state) -> None:
    if path is None:
        return
    blob = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
            "definition_json": json.dumps(_definition(config, base)), "config": json.dumps(dataclasses.asdict(config)),
            "base": base, "rounds": rounds, "best": best,
            **{k: torch.as_tensor(v) for k, v in zip(("data_x", "data_y", "data_m", "data_d"), data)}, "actor": actor,
            "generator": gen_state}
    save_checkpoint(path, blob)


def _load_checkpoint(path: Path | None, config: TeacherConfig, base: str) -> dict[str, Any] | None:
    """The finished rounds stored at ``path`` (None: no checkpoint).

    Raises:
        ResumeMismatchError: the checkpoint was written for other teacher settings, another PPO actor, or more
            rounds than ``config.rounds``.
        CheckpointError: an unreadable file, or one of another layout version.
    """
    blob = None if path is None else load_checkpoint(path, (CHECKPOINT_FORMAT, None), what="MPC-teacher")
    if path is None or blob is None:
        return None
    if blob.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} was written by another version of the teacher refinement (layout "
                              f"{blob.get('version')!r}, this one reads {CHECKPOINT_VERSION}); delete it to start the "
                              "refinement over")
    if "definition_json" in blob:
        saved = json.loads(blob["definition_json"])
    else:  # written before checkpoints stored their definition
        saved = {f"teacher.{k}": v for k, v in json.loads(blob.get("config", "{}")).items() if k != "rounds"}
        saved["teacher.ppo_actor"] = blob.get("base")
    requested = _definition(config, base)
    n_done = len(blob.get("rounds", [])) - 1
    if n_done > config.rounds:  # a refinement may be extended, not shortened
        saved["teacher.rounds"], requested["teacher.rounds"] = n_done, config.rounds
    check_definition(path, saved, requested, what="MPC-teacher refinement (TeacherConfig or PPO actor)",
                     start_over=f"delete {path} (the PPO checkpoint is kept), or use another output folder")
    for k in ("data_x", "data_y", "data_m", "data_d"):
        blob[k] = blob[k].numpy()
    return blob
