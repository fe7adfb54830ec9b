"""Benchmark of the AL MPC solver (deqmpc_gym.mpc) against mpc.pytorch (Amos et al. 2018) and IPOPT.

Run:  python benchmarks/solver.py [--threads 1] [--reps 5] [--hard]
Writes a markdown table to stdout and benchmarks/results/solver.json.

Measured (medians over --reps, B = 200 and B = 1, T = 5):
* cold:   our cold solve to convergence (at most 12 AL iterations, rho 1 -> 1e11, stopping per sample once
          the primal/dual tolerances are met) vs mpc.pytorch's cold solve (lqr_iter=20,
          eps=1e-4) on the same problem (same Q, R, theta, bounds, dynamics = system.step); costs are reported
          so "same tolerance" can be checked;
* cold rho0: the same cold solve with the first penalty a standalone MPC solver would use (rho_init = 1e5,
          chosen among 1e3 / 1e5 / 1e7, see the README; the default rho_init = 1 is the DEQ-MPC
          setting), reported beside the default;
* accuracy: the largest relative cost difference of each cold solution (ours at both penalties, mpc.pytorch) to
          a tight reference solve of the same problems (10 AL iterations, Newton steps to 1e-10), so "the same
          tolerance" can be checked sample by sample;
* warm:   our warm-started MPC-m call (m = 2 AL iterations from the shifted previous solution) vs mpc.pytorch cold;
* streaming: the same call with the settings DEQMPCPolicy.act() uses (penalty restarted at rho_max / 10, stop after
          the AL iteration at rho_max, Newton exit at the reference implementation's constraint residual 1e-3);
* compiled streaming: the streaming call through deqmpc_gym.mpc.CompiledSolver (torch.compile; Pendulum and
          Cartpole -- the Quadrotor's T (nx + nu)^3 is above its limit); its first call (compilation, or loading
          it from torch's disk cache) is reported separately, and its largest difference to the eager solution;
* T50/T5: time(T=50) / time(T=5) of our solver for the same number of AL iterations (iters=2);
* bwd/fwd: implicit backward time / forward time of a warm MPC-m call;
* ipopt:  CasADi+IPOPT time of one problem (B = 1).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "mpc"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from deqmpc_gym.errors import ConfigError  # noqa: E402
from deqmpc_gym.io import atomic_write_text  # noqa: E402
from deqmpc_gym.mpc import CompiledSolver, MPCConfig, MPCProblem, solve  # noqa: E402
from deqmpc_gym.policies import PolicyConfig  # noqa: E402
from deqmpc_gym.systems import Cartpole, Pendulum, Quadrotor  # noqa: E402

from _timing import median_time  # noqa: E402


def make_batch(system, B, T, seed=0, noise=0.1):
    """x0 ~ task distribution; theta = rollout of random in-bounds controls + noise (T <= 10)."""
    rng = np.random.default_rng(seed)
    x0 = torch.tensor(system.sample_initial_states(rng, B))
    lo, hi = np.asarray(system.u_low), np.asarray(system.u_high)
    if T > 10:  # long random rollouts of the quadrotor diverge: track x0 held constant (+ noise)
        return x0, x0[:, None].expand(B, T, system.nx) + noise * torch.tensor(
            rng.standard_normal((B, T, system.nx)))
    u = torch.tensor(lo + (hi - lo) * rng.random((B, T, system.nu)))
    xs = [x0]
    for t in range(T - 1):
        xs.append(system.step(xs[-1], u[:, t]))
    return x0, torch.stack(xs, 1) + noise * torch.tensor(rng.standard_normal((B, T, system.nx)))


def mpc_pytorch_solver(system, x0, theta, lqr_iter=20, u_ref=None, u_init=None):
    """A cold (or, with ``u_init (B, T, nu)``, warm-started) mpc.pytorch solve of the tracking problem of
    ``x0 (B, nx)``, ``theta (B, T, nx)`` with the control reference ``u_ref (nu,)`` (default 0), as a function
    returning ``(x (B, T, nx), u (B, T, nu))``."""
    from mpc import mpc as mp
    from mpc.mpc import GradMethods, QuadCost

    B, T, nx = theta.shape
    nu = system.nu
    Q = torch.tensor(system.Q_diag, dtype=torch.float64)
    R = torch.tensor(system.R_diag, dtype=torch.float64)
    C = torch.diag(torch.cat([Q, R])).expand(T, B, nx + nu, nx + nu)
    cu = torch.zeros(B, T, nu, dtype=torch.float64) if u_ref is None else (-(u_ref * R)).expand(B, T, nu)
    c = torch.cat([-(theta * Q), cu], -1).transpose(0, 1)
    ui = None if u_init is None else u_init.transpose(0, 1).contiguous()
    ul = torch.tensor(system.u_low, dtype=torch.float64).expand(T, B, nu)
    uh = torch.tensor(system.u_high, dtype=torch.float64).expand(T, B, nu)

    class Dyn(torch.nn.Module):
        def forward(self, x, u):
            return system.step(x, u)

    dyn = Dyn()

    def run():
        ctrl = mp.MPC(nx, nu, T, u_lower=ul, u_upper=uh, u_init=ui, lqr_iter=lqr_iter, exit_unconverged=False,
                      eps=1e-4, n_batch=B, grad_method=GradMethods.AUTO_DIFF, verbose=-1, backprop=False)
        x, u, objs = ctrl(x0, QuadCost(C, c), dyn)
        return x.transpose(0, 1), u.transpose(0, 1)

    return run


def time_mpc_pytorch(system, x0, theta, reps):
    """Median time [s] of mpc.pytorch's cold solve of ``(x0, theta)`` and its last solution ``(x, u)``
    (detached)."""
    run = mpc_pytorch_solver(system, x0, theta)
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = median_time(lambda: out.__setitem__("mp", run()), reps)
    xm, um = out["mp"]
    return t, xm.detach(), um.detach()


#: first penalty of the "standalone" cold solve (see bench_system)
STANDALONE_RHO_INIT = 1e5


def max_rel_cost_error(cost: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest relative difference of the costs ``(B,)`` to the reference costs ``(B,)``."""
    return float(((cost - ref).abs() / ref.abs().clamp_min(1e-12)).max())


def bench_system(system, B, reps, do_mpc_pytorch=True):
    T = 5
    x0, theta = make_batch(system, B, T + 1)
    th0, th1 = theta[:, :T], theta[:, 1:]
    pb = MPCProblem(system, MPCConfig(horizon=T))
    res = {}
    out = {}

    def cold():
        out["cold"] = solve(pb, x0, th0, iters=12, stop_when_converged=True)

    res["ours_cold_s"] = median_time(cold, reps)
    x, u, st, info = out["cold"]
    tight = MPCProblem(system, MPCConfig(horizon=T, newton_steps=20, newton_tol=1e-10, tol_dual=1e-9))
    ref_cost = solve(tight, x0, th0, iters=10)[3].cost
    res["ours_cold_rel_cost_err_max"] = max_rel_cost_error(info.cost, ref_cost)
    res["ours_cold_cost_median"] = float(info.cost.median())
    res["ours_cold_defect_max"] = float(info.primal_residual.max())
    res["ours_cold_converged_frac"] = float(info.converged.float().mean())
    # the same cold solve as a standalone MPC solver would be configured: a larger first penalty (the default
    # rho_init = 1 suits DEQ-MPC, whose first AL iterations are meant to be loose while the network adapts)
    pb_hi = MPCProblem(system, MPCConfig(horizon=T, rho_init=STANDALONE_RHO_INIT))

    def cold_hi():
        out["cold_hi"] = solve(pb_hi, x0, th0, iters=12, stop_when_converged=True)

    res["ours_cold_rho_hi_s"] = median_time(cold_hi, reps)
    res["ours_cold_rho_hi_cost_median"] = float(out["cold_hi"][3].cost.median())
    res["ours_cold_rho_hi_defect_max"] = float(out["cold_hi"][3].primal_residual.max())
    res["ours_cold_rho_hi_converged_frac"] = float(out["cold_hi"][3].converged.float().mean())
    res["ours_cold_rho_hi_rel_cost_err_max"] = max_rel_cost_error(out["cold_hi"][3].cost, ref_cost)
    warm = st.shift(pb, x_last=th1[:, -1])
    x1 = st.x[:, 1]

    def warm_call():
        out["warm"] = solve(pb, x1, th1, state=warm, iters=2)

    res["ours_warm_m2_s"] = median_time(warm_call, reps)
    res["ours_warm_defect_median"] = float(out["warm"][3].primal_residual.median())
    # the call DEQMPCPolicy.act() makes each control step: penalty restarted by the streaming rule, samples stop
    # after the AL iteration at rho_max, Newton loops exit at the reference's constraint residual (1e-3)
    warm_s = st.shift(pb, x_last=th1[:, -1], iters_remaining=2)

    def stream_call():
        out["stream"] = solve(pb, x1, th1, state=warm_s, iters=2, stop_at_rho_max=True,
                              exit_residual=PolicyConfig().stream_exit_residual)

    res["ours_stream_m2_s"] = median_time(stream_call, reps)
    res["ours_stream_defect_median"] = float(out["stream"][3].primal_residual.median())
    # the same streaming call through the compiled path (small box-constrained problems only)
    try:
        fast = CompiledSolver(pb)
    except ConfigError:
        fast = None
    if fast is not None:
        t0 = time.perf_counter()
        out["compiled"] = fast(x1, th1, state=warm_s, iters=2, stop_at_rho_max=True,
                               exit_residual=PolicyConfig().stream_exit_residual)
        res["compiled_first_call_sec"] = time.perf_counter() - t0  # includes compilation (or the disk cache)
        res["compiled_ok"] = bool(fast.compiled_ok is not False)

        def compiled_call():
            out["compiled"] = fast(x1, th1, state=warm_s, iters=2, stop_at_rho_max=True,
                                   exit_residual=PolicyConfig().stream_exit_residual)

        res["compiled_stream_m2_s"] = median_time(compiled_call, reps)

        def compiled_warm():  # the default warm call (no streaming exits), compiled
            out["compiled_warm"] = fast(x1, th1, state=warm, iters=2)

        compiled_warm()
        res["compiled_warm_m2_s"] = median_time(compiled_warm, reps)
        res["compiled_vs_eager_max_abs_diff"] = max(float((a - b).abs().max()) for a, b in
                                                    zip(out["compiled"][:2], out["stream"][:2]))
    # backward / forward (implicit) of the warm call
    thg = th1.clone().requires_grad_()

    def fwd():
        out["g"] = solve(pb, x1, thg, state=warm, iters=2)

    def bwd():
        x, u = out["g"][0], out["g"][1]
        torch.autograd.grad(x.sum() + u.sum(), thg)

    tf = median_time(fwd, reps)
    tbs = []
    for _ in range(reps + 1):
        fwd()
        t0 = time.perf_counter()
        bwd()
        tbs.append(time.perf_counter() - t0)
    tb = statistics.median(tbs[1:])
    res["implicit_fwd_s"], res["implicit_bwd_s"] = tf, tb
    res["bwd_over_fwd"] = tb / tf
    # T = 50 vs T = 5 (iters = 2)
    x0l, thl = make_batch(system, B, 50)
    pbl = MPCProblem(system, MPCConfig(horizon=50))
    t50 = median_time(lambda: solve(pbl, x0l, thl, iters=2), reps)
    t5 = median_time(lambda: solve(pb, x0, th0, iters=2), reps)
    res["ours_T5_iters2_s"], res["ours_T50_iters2_s"] = t5, t50
    res["T50_over_T5"] = t50 / t5
    if do_mpc_pytorch:
        res["mpc_pytorch_cold_s"], xm, um = time_mpc_pytorch(system, x0, th0, reps)
        res["mpc_pytorch_cost_median"] = float(pb.cost(xm.detach(), um.detach(), th0).median())
        res["mpc_pytorch_defect_max"] = float(pb.defects(xm.detach(), um.detach()).abs().amax((1, 2)).max())
        res["mpc_pytorch_rel_cost_err_max"] = max_rel_cost_error(pb.cost(xm.detach(), um.detach(), th0), ref_cost)
        res["speedup_cold"] = res["mpc_pytorch_cold_s"] / res["ours_cold_s"]
        res["speedup_cold_rho_hi"] = res["mpc_pytorch_cold_s"] / res["ours_cold_rho_hi_s"]
        res["speedup_warm_vs_mpc_pytorch_cold"] = res["mpc_pytorch_cold_s"] / res["ours_warm_m2_s"]
        res["speedup_stream_vs_mpc_pytorch_cold"] = res["mpc_pytorch_cold_s"] / res["ours_stream_m2_s"]
        if "compiled_stream_m2_s" in res:
            res["speedup_compiled_stream_vs_mpc_pytorch_cold"] = res["mpc_pytorch_cold_s"] / res["compiled_stream_m2_s"]
            res["speedup_compiled_warm_vs_mpc_pytorch_cold"] = res["mpc_pytorch_cold_s"] / res["compiled_warm_m2_s"]
    return res


def hard_problems(system, B, T=5, seed=0):
    """Harder cold problems than :func:`make_batch`: waypoints with 0.5 of noise, and the goal held at every knot
    (regulation from a random initial state). Returns ``{name: (x0, theta)}``."""
    out = {"noise 0.5": make_batch(system, B, T, seed=seed, noise=0.5)}
    x0, _ = make_batch(system, B, T, seed=seed)
    goal = torch.tensor(np.asarray(system.goal), dtype=torch.float64).expand(B, T, system.nx).clone()
    goal[:, 0] = x0
    out["goal"] = (x0, goal)
    return out


def bench_hard(system, B, reps):
    """Cold solves of :func:`hard_problems`: ours vs mpc.pytorch (times, ratio, costs)."""
    pb = MPCProblem(system, MPCConfig(horizon=5))
    rows = []
    for name, (x0, th) in hard_problems(system, B).items():
        out = {}
        t_ours = median_time(lambda: out.__setitem__("o", solve(pb, x0, th, iters=12, stop_when_converged=True)),
                             reps)
        t_mp, xm, um = time_mpc_pytorch(system, x0, th, reps)
        rows.append({"problems": name, "ours_cold_s": t_ours, "mpc_pytorch_cold_s": t_mp,
                     "speedup_cold": t_mp / t_ours, "ours_converged_frac": float(out["o"][3].converged.float().mean()),
                     "ours_cost_median": float(out["o"][3].cost.median()),
                     "mpc_pytorch_cost_median": float(pb.cost(xm.detach(), um.detach(), th).median())})
    return rows


def bench_ipopt(system, reps):
    try:
        import casadi_ref as ref
    except Exception:  # casadi missing
        return None
    x0, theta = make_batch(system, 1, 5)
    f = ref.casadi_dynamics(system)
    Q, R = np.diag(system.Q_diag), np.diag(system.R_diag)
    return median_time(lambda: ref.ipopt_solve(system, f, x0[0].numpy(), theta[0].numpy(), Q, R,
                                         np.asarray(system.u_low), np.asarray(system.u_high)), reps)


def _cell(key, v):
    """One cell of the results table: ``-`` when missing, times (keys ending in ``_s``) in ms, 3 significant digits."""
    if v is None:
        return "-"
    if key.endswith("_s"):
        return f"{1e3 * v:.3g}"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--systems", default="pendulum,cartpole,quadrotor")
    ap.add_argument("--hard", action="store_true",
                    help="also time cold solves of harder Pendulum/Cartpole problems (0.5 noise, goal regulation)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    systems = {"pendulum": Pendulum, "cartpole": Cartpole, "quadrotor": Quadrotor}
    results = {"threads": args.threads, "torch": torch.__version__, "rows": []}
    for name in args.systems.split(","):
        system = systems[name]()
        for B in (200, 1):
            r = bench_system(system, B, args.reps)
            r.update(system=name, B=B)
            if B == 1:
                r["ipopt_s"] = bench_ipopt(system, args.reps)
                if r["ipopt_s"]:
                    r["ipopt_over_ours_cold"] = r["ipopt_s"] / r["ours_cold_s"]
            results["rows"].append(r)
    if args.hard:
        results["hard"] = []
        for name in args.systems.split(","):
            if name in ("pendulum", "cartpole"):
                for r in bench_hard(systems[name](), 200, args.reps):
                    results["hard"].append({"system": name, "B": 200, **r})
    os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
    atomic_write_text(os.path.join(os.path.dirname(__file__), "results", "solver.json"), json.dumps(results, indent=2))
    cols = [("system", "system"), ("B", "B"), ("ours cold [ms]", "ours_cold_s"),
            ("mpc.pytorch cold [ms]", "mpc_pytorch_cold_s"), ("cold speedup", "speedup_cold"),
            (f"ours cold rho0={STANDALONE_RHO_INIT:g} [ms]", "ours_cold_rho_hi_s"),
            ("cold speedup (rho0)", "speedup_cold_rho_hi"),
            ("ours warm m=2 [ms]", "ours_warm_m2_s"), ("warm vs mpc.pt cold", "speedup_warm_vs_mpc_pytorch_cold"),
            ("ours streaming m=2 [ms]", "ours_stream_m2_s"),
            ("streaming vs mpc.pt cold", "speedup_stream_vs_mpc_pytorch_cold"),
            ("compiled streaming [ms]", "compiled_stream_m2_s"),
            ("compiled streaming vs mpc.pt cold", "speedup_compiled_stream_vs_mpc_pytorch_cold"),
            ("compiled warm [ms]", "compiled_warm_m2_s"),
            ("compiled warm vs mpc.pt cold", "speedup_compiled_warm_vs_mpc_pytorch_cold"),
            ("compiled first call [s]", "compiled_first_call_sec"),
            ("T50/T5", "T50_over_T5"), ("bwd/fwd", "bwd_over_fwd"), ("cost ours", "ours_cold_cost_median"),
            ("cost mpc.pt", "mpc_pytorch_cost_median"), ("max rel. cost err. ours", "ours_cold_rel_cost_err_max"),
            ("(rho0)", "ours_cold_rho_hi_rel_cost_err_max"), ("mpc.pt", "mpc_pytorch_rel_cost_err_max"),
            ("IPOPT 1 problem [ms]", "ipopt_s")]
    print(f"torch threads = {args.threads}\n")
    print("| " + " | ".join(c[0] for c in cols) + " |")
    print("|" + "---|" * len(cols))
    for r in results["rows"]:
        print("| " + " | ".join(_cell(key, r.get(key)) for _, key in cols) + " |")
    if results.get("hard"):
        print("\nharder cold problems, B = 200:\n")
        print("| system | problems | ours cold [ms] | mpc.pytorch cold [ms] | cold speedup | cost ours | cost mpc.pt |")
        print("|---|---|---|---|---|---|---|")
        for r in results["hard"]:
            print(f"| {r['system']} | {r['problems']} | {1e3 * r['ours_cold_s']:.1f} | "
                  f"{1e3 * r['mpc_pytorch_cold_s']:.1f} | {r['speedup_cold']:.2f} | {r['ours_cost_median']:.4g} | "
                  f"{r['mpc_pytorch_cost_median']:.4g} |")


if __name__ == "__main__":
    main()
