"""Configuration of the augmented-Lagrangian MPC solver (:class:`MPCConfig`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deqmpc_gym.errors import ConfigError

_LINEAR_SOLVERS = ("auto", "dense", "banded")
_GRADIENTS = ("implicit", "unroll", "final_implicit")
_HESSIANS = ("gauss_newton", "exact")
#: the primal guesses of a cold start without an initial control guess (``MPCConfig.cold_start``)
COLD_STARTS = ("theta", "rollout")
#: maximum AL iterations of a standalone cold solve (:meth:`MPCConfig.standalone`)
STANDALONE_ITERS = 30


@dataclass(frozen=True)
class MPCConfig:
    """Settings of the MPC-m augmented-Lagrangian (AL) solver.

    Attributes:
        horizon: ``T``, the number of knots including the current state (``x_0`` is fixed to ``x_init``).
        newton_steps: maximum Gauss-Newton steps per AL iteration (per sample).
        rho_init: cold-start penalty ``rho`` (1: the DEQ-MPC setting, loose first iterations while the network adapts).
            :meth:`standalone` solves to convergence start at 1e3 (fewer AL iterations, the same answers on the
            solver suite); not so with a tiny control weight (the QPole's R = 1e-8): the Hessian's condition number
            ``rho / R`` loses the cost's curvature to round-off before the iterate nears the optimum, and samples
            stall -- start such problems at 1 (``rho_init_r_ratio`` does so for the standalone configuration).
        rho_init_r_ratio: if > 0, a cold start's first penalty is ``min(rho_init, max(1, rho_init_r_ratio *
            r_min))`` with ``r_min`` the smallest eigenvalue of the control weight R: it keeps the Gauss-Newton
            Hessian's first condition number ``rho / r_min`` at most ``rho_init_r_ratio`` where R is tiny, but never
            starts below the DEQ-MPC default 1. 0 (the default): the first penalty is ``rho_init``.
        rho_growth: ``rho <- rho_growth * rho`` after every AL iteration.
        rho_progress: with ``solve(..., stop_when_converged=True)``, if > 0, a sample's penalty grows only when its
            constraint violation has not fallen to ``rho_progress`` times the previous AL iteration's (the
            classical rule of Conn, Gould and Toint / Nocedal and Wright, Alg. 17.4): the multipliers alone drive
            a violation that falls fast enough, and the penalty stays as small as the problem allows. 0 (the
            default, DEQ-MPC's fixed schedules): it grows after every AL iteration.
        rho_max: in streaming use (``solve(..., stop_at_rho_max=True)``) a sample stops once its ``rho``
            exceeds this value; the last AL iteration of a sample therefore runs at ``rho <= rho_max``.
        rho_init_max: cap of the warm-start penalty, ``rho_0 = min(rho_prev, rho_init_max)`` (paper 4.2.3).
        rho_cap: the penalty never grows beyond this value, in every mode (``rho <- min(rho_growth rho,
            rho_cap)``); above it the Gauss-Newton Hessian's conditioning loses more than the penalty gains. The
            default 1e12 is not reached by DEQ-MPC's fixed schedules (6 x 2 AL iterations from 1).
        newton_tol: per-sample exit test of the Newton loop: a sample stops after a step with
            ``||dz||_inf <= newton_tol * (1 + ||z||_inf)`` (or whose contraction estimate predicts the next step
            below that) or when its line search finds no decrease.
        newton_exit_residual: if > 0, a sample's Newton loop also stops after a step that leaves its constraint
            residual ``||[d; max(g, 0)]||_2`` at or below this value -- the exit test of the paper's reference
            implementation (1e-3), looser than the step test; 0 disables it (per call: ``solve(exit_residual=)``).
        n_obstacle_constraints: ``k``, the nearest obstacles constrained at each knot.
        linear_solver: ``"dense"`` (batched dense Cholesky of the ``T(nx+nu)`` Hessian), ``"banded"``
            (block-tridiagonal Cholesky, cost linear in ``T``) or ``"auto"`` (per call: dense when
            ``B * (T (nx + nu))**3 <= dense_max_work``, or for a single problem with ``T (nx + nu) <= 400``).
        gradient: default gradient mode of :func:`~deqmpc_gym.mpc.solve` (``"implicit"``, ``"unroll"``,
            ``"final_implicit"``).
        hessian: the Hessian of the ``"final_implicit"`` gradient's KKT system (``"gauss_newton"`` | ``"exact"``;
            per call ``solve(hessian=)``): ``"gauss_newton"`` (the default, the paper's and mpc.pytorch's) keeps the
            cost's ``W`` alone; ``"exact"`` adds the dynamics' and constraints' second-order terms weighted by the
            KKT multipliers, which makes the gradient the exact sensitivity of the constrained optimum (as IPOPT's);
            it costs ``nx + nu`` Hessian-vector products of the dynamics per backward (:mod:`deqmpc_gym.mpc.kkt`).
        dtype: the solver's floating dtype (inputs are cast to it; outputs are returned in it).
        line_search_steps: maximum halvings of the step length per Newton step (``alpha = 1, 1/2, ...``).
        tol_primal: a sample is ``converged`` when max(|dynamics defect|, inequality violation) <= tol_primal
            and its last Newton loop exited by the step test.
        tol_dual: ... and its AL stationarity ``||grad_z M||_inf / (1 + ||grad_z C||_inf)`` is <= tol_dual.
        tol_shooting: the convergence test of answers returned as rollouts (``solve(output="rollout",
            stop_when_converged=True)``, control bounds only): the projected reduced gradient of the controls
            (:func:`~deqmpc_gym.mpc.polish.shooting_kkt`) at most this, and the bounds met to ``tol_primal``.
            Tighter than ``tol_dual``: over long horizons the reduced cost is flat along some control directions,
            and 1e-3 let cart-pole T = 20 samples stop 5e-3 above the optimum (``benchmarks/solver_suite.py``).
        reg_min: relative regularisation ``mu`` added (``H + mu * max|diag H| * I``) to a sample whose Cholesky
            factorisation fails; it is grown by 1e3 up to twice before the sample's step is skipped.
        cold_start: the primal guess of a cold start (no ``state``) without an initial control guess ``u_init``:
            ``"theta"`` (the default, DEQ-MPC's: ``x = theta`` with ``x_0`` pinned, the network's waypoints being
            the guess, and ``u`` the control reference clipped to the bounds) or ``"rollout"`` (:meth:`standalone`:
            ``u`` the clipped control reference and ``x`` its rollout from ``x_0``, a dynamically feasible start as
            shooting solvers and IPOPT's first start take). With ``u_init`` the start is always its rollout.
        starts: ``K``, the starting guesses of each sample of a cold call (no ``state``) to :func:`~deqmpc_gym.mpc.
            solve`: 1 (the default) solves from the cold start alone; ``K > 1`` solves the ``K`` starts of
            :mod:`deqmpc_gym.mpc.starts` as one batch of ``K B`` (``K`` times the work, gradients included) and keeps
            per sample the converged answer of the lowest cost (``SolveInfo.start`` says whose). For standalone
            solves of nonconvex problems whose local solutions differ (vehicles turning left or right): on the
            held-out unicycle and car of ``benchmarks/solver_suite.py`` at ``T = 20``, see docs/solver.md.
            Warm calls (with a ``state``) run from that state alone; :class:`~deqmpc_gym.mpc.CompiledSolver`
            refuses ``K > 1``.
        screen_iters: with ``starts = K > 1``, the ``K`` starts run only this many AL iterations together; then
            each sample continues from its most promising start alone (the lowest AL merit at the rollout of its
            controls clipped to the bounds, :func:`~deqmpc_gym.mpc.starts.screen`). 0: every start runs to the end
            (``K`` times the work). :meth:`standalone` screens after 2 iterations: on the held-out unicycle and car
            at ``T = 20`` the screened ``K = 4`` reaches the same counts as running every start to the end, at
            1.6-2.3 times the time of one start instead of 2.6-3.2 (docs/solver.md). Calls with ``iters <=
            screen_iters`` run every start to the end.
        polish_iters: the samples of a standalone solve (``stop_when_converged`` with ``output="rollout"``, control
            bounds only) that the AL iterations leave unconverged continue with at most this many projected
            Levenberg-Marquardt iterations on the controls alone (:mod:`deqmpc_gym.mpc.polish`): every iterate a
            rollout within the bounds, the cost never rising, no penalty. 0 (the default): off. Not in calls that
            attach the ``"implicit"`` gradient (it differentiates the last AL subproblem).
        dense_max_work: crossover of ``linear_solver="auto"`` in ``B (T n)^3`` (measured on one CPU thread: the
            dense factorisation wins below it, the banded one above; ``benchmarks/linalg.py``).
    """

    horizon: int = 5
    newton_steps: int = 4
    rho_init: float = 1.0
    rho_init_r_ratio: float = 0.0
    rho_growth: float = 10.0
    rho_progress: float = 0.0
    rho_max: float = 1e8
    rho_init_max: float = 1e7
    rho_cap: float = 1e12
    newton_tol: float = 1e-3
    newton_exit_residual: float = 0.0
    n_obstacle_constraints: int = 4
    linear_solver: str = "auto"
    gradient: str = "implicit"
    hessian: str = "gauss_newton"
    dtype: torch.dtype = torch.float64
    line_search_steps: int = 12
    tol_primal: float = 1e-6
    tol_dual: float = 1e-3
    tol_shooting: float = 1e-5
    reg_min: float = 1e-10
    dense_max_work: float = 2e6
    cold_start: str = "theta"
    starts: int = 1
    screen_iters: int = 0
    polish_iters: int = 0

    @classmethod
    def standalone(cls, horizon: int, **overrides: object) -> MPCConfig:
        """The configuration of standalone cold solves to convergence (``solve(problem, x0, theta, iters=
        STANDALONE_ITERS, stop_when_converged=True)``): ``rho_init = 1e3`` capped at ``1e8`` times the smallest
        control weight (``rho_init_r_ratio``, never below 1), up to 12 Newton steps per AL iteration and the Newton
        step test at ``newton_tol = 1e-6`` (DEQ-MPC's 4 steps to 1e-3 leave the subproblems of long rigid-body
        horizons too loose: the multiplier updates stall). Chosen on the tuning split of
        ``benchmarks/solver_suite.py``: every first penalty from 1 to 1e3 reaches IPOPT's cost on all 450
        samples, 1e4 and 1e5 leave a quadrotor T = 20 sample in a worse local solution, and 1e3 takes the fewest
        AL iterations of the robust ones. The cap keeps tiny control weights (the package's Cartpole, R = 1e-10,
        and QPole, R = 1e-8) at 1, where larger first penalties end more samples in worse local solutions.
        A cold start begins at the rollout of the control reference (``cold_start = "rollout"``): on the suite
        both starts reach IPOPT's cost on >= 99 % of every problem's samples; on the held-out unicycle the rollout
        start reaches it on more samples (T = 20: 191 against 170 of 200), on the held-out car the two are close
        (181 against 184). Problems with distinct local solutions (a vehicle turning left or right) gain from
        several starts per sample, ``standalone(T, starts=4)`` (:attr:`starts`, screened after 2 AL iterations:
        :attr:`screen_iters`): the held-out unicycle at T = 20 then reaches it on 199 of 200, the car on 197 (with
        the polish below; 8 starts: 199 and 198), for 2.3 and 1.6 times the time of one start (8: 4.1 and 2.7).
        Samples the AL iterations leave unconverged continue with up to 50 iterations of the shooting polish
        (``polish_iters``, :mod:`deqmpc_gym.mpc.polish`): on the tuning split it converged every remaining sample
        but one (a quadrotor at T = 20) and lowered none's count (car T = 20: 183 -> 190 of 200 at IPOPT's cost,
        quadrotor T = 20: 198 -> 199).
        ``overrides`` replace any field."""
        kw: dict = {"horizon": horizon, "rho_init": 1e3, "rho_init_r_ratio": 1e8, "newton_steps": 12,
                    "newton_tol": 1e-6, "cold_start": "rollout", "polish_iters": 50, "screen_iters": 2}
        kw.update(overrides)
        return cls(**kw)

    def __post_init__(self) -> None:
        if not isinstance(self.horizon, int) or self.horizon < 2:
            raise ConfigError(f"horizon must be an int >= 2, got {self.horizon!r}")
        if not isinstance(self.newton_steps, int) or self.newton_steps < 1:
            raise ConfigError(f"newton_steps must be an int >= 1, got {self.newton_steps!r}")
        for name in ("rho_init", "rho_max", "rho_init_max", "rho_cap", "newton_tol", "tol_primal", "tol_dual",
                     "tol_shooting"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v > 0):
                raise ConfigError(f"{name} must be a positive number, got {v!r}")
        if not self.rho_cap > self.rho_max:
            raise ConfigError(f"rho_cap must be > rho_max (streaming calls stop above rho_max), got rho_cap="
                              f"{self.rho_cap!r}, rho_max={self.rho_max!r}")
        for name in ("newton_exit_residual", "rho_init_r_ratio", "rho_progress"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v >= 0):
                raise ConfigError(f"{name} must be a number >= 0, got {v!r}")
        if not self.rho_growth >= 1.0:
            raise ConfigError(f"rho_growth must be >= 1, got {self.rho_growth!r}")
        for name, choices in (("linear_solver", _LINEAR_SOLVERS), ("gradient", _GRADIENTS), ("hessian", _HESSIANS),
                              ("cold_start", COLD_STARTS)):
            if getattr(self, name) not in choices:
                raise ConfigError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        if self.hessian == "exact" and self.gradient != "final_implicit":
            raise ConfigError(f"hessian='exact' applies to gradient='final_implicit' only, got gradient="
                              f"{self.gradient!r}")
        if self.dtype not in (torch.float32, torch.float64):
            raise ConfigError(f"dtype must be torch.float32 or torch.float64, got {self.dtype!r}")
        for name, low in (("n_obstacle_constraints", 0), ("line_search_steps", 0), ("starts", 1), ("screen_iters", 0),
                          ("polish_iters", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ConfigError(f"{name} must be an int >= {low}, got {v!r}")
