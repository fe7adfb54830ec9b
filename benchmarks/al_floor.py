"""The time floor of one augmented-Lagrangian (AL) iteration of the Pendulum MPC (T = 5, float64, B = 200 and 1):
a minimal, branch-free iteration (one Gauss-Newton step with a dense Cholesky, an 8-point batched line search, the
dual update), eager and under ``torch.compile`` (inductor, CPU). It bounds from below what a warm-started MPC-m
call (m AL iterations) of ``deqmpc_gym.mpc.solve`` can cost on this machine; the package's solver does more per
iteration (per-sample exits, active-set prediction, fallbacks). Prints its tables; needs a C++ compiler for
inductor.

Run:  python benchmarks/al_floor.py [--reps 300] [--autotune] [--novec]

Notes
* Pendulum.step is semi-implicit Euler (not RK4) and its step_and_jacobians is already pure torch
  (numpy_fast_path is False for the pendulum), but we write our own pure-torch step + analytic Jacobian
  (`pend_step`, `pend_step_jac`) to keep System's Python shape checks/ops shim out of the traced graph,
  and check them against s.step / s.step_and_jacobians.
* One AL iteration = ONE Gauss-Newton step (dense Cholesky) + an 8-point batched line search + dual update
  + rho *= 10.  No data-dependent Python control flow.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

# fresh inductor cache so the compile time measured is a cold compile
_CACHE = tempfile.mkdtemp(prefix="inductor_al_probe_")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", _CACHE)

import torch  # noqa: E402

torch.set_num_threads(1)
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
sys.path.insert(0, ROOT)

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from deqmpc_gym.mpc import MPCConfig, MPCProblem, solve  # noqa: E402
from deqmpc_gym.systems import Pendulum  # noqa: E402

from _timing import call_times  # noqa: E402
from solver import make_batch  # noqa: E402

DT = torch.float64
S = Pendulum()
NX, NU, T, K = S.nx, S.nu, 5, 8
N = NX + NU
TN = T * N
M_, L_, G_, DTS = S.mass, S.length, S.gravity, S.dt
ML2 = M_ * L_ ** 2


# ----------------------------------------------------------------------------- dynamics (pure torch)
def pend_step(x, u):
    """x (..., 2), u (..., 1) -> (..., 2): semi-implicit Euler, same expression order as Pendulum._step."""
    th, thd = x[..., 0], x[..., 1]
    thdd = (u[..., 0] + M_ * G_ * L_ * torch.sin(th)) / ML2
    thd_next = thd + DTS * thdd
    return torch.stack([th + DTS * thd_next, thd_next], -1)


def pend_step_jac(x, u):
    """x (..., 2), u (..., 1) -> f (..., 2), AB = [A | B] (..., 2, 3)."""
    f = pend_step(x, u)
    a10 = (DTS * M_ * G_ * L_ / ML2) * torch.cos(x[..., 0])
    one = torch.ones_like(a10)
    zero = torch.zeros_like(a10)
    row0 = torch.stack([1.0 + DTS * a10, one * DTS, one * (DTS * DTS / ML2)], -1)
    row1 = torch.stack([a10, one + zero, one * (DTS / ML2)], -1)
    return f, torch.stack([row0, row1], -2)


# ----------------------------------------------------------------------------- constants
Qm = torch.diag(torch.tensor(S.Q_diag, dtype=DT))
Rm = torch.diag(torch.tensor(S.R_diag, dtype=DT))
U_LO = torch.tensor(S.u_low, dtype=DT)
U_HI = torch.tensor(S.u_high, dtype=DT)
PIN = torch.ones(T, N, dtype=DT)
PIN[0, :NX] = 0.0
PINF = PIN.reshape(TN)
PIN2 = PINF[:, None] * PINF[None, :]
UNPIN = torch.diag(1.0 - PINF)
W_FULL = torch.block_diag(*([torch.block_diag(Qm, Rm)] * T))  # (TN, TN)
S0 = torch.eye(T - 1, T, dtype=DT)  # selects knot t for defect t
S1 = torch.eye(T, dtype=DT)[1:]  # (T-1, T): selects knot t+1
EX = torch.eye(NX, N, dtype=DT)  # [I_x 0] (nx, n)
G_BOX = torch.zeros(2 * NU, N, dtype=DT)
G_BOX[:NU, NX:] = torch.eye(NU, dtype=DT)
G_BOX[NU:, NX:] = -torch.eye(NU, dtype=DT)
EYE_T = torch.eye(T, dtype=DT)
# J_in block-diagonal pattern (T, 2nu, T, n), columns pinned
JIN_PAT = (EYE_T[:, None, :, None] * G_BOX[None, :, None, :]) * PIN[None, None]
ALPHAS = 0.5 ** torch.arange(K, dtype=DT)  # 1, 1/2, ..., 1/2^(K-1)


# ----------------------------------------------------------------------------- residuals / merit
def cost_fn(x, u, theta):
    e = x - theta
    return 0.5 * ((e @ Qm) * e).sum((-2, -1)) + 0.5 * ((u @ Rm) * u).sum((-2, -1))


def ineq(u):
    return torch.cat([u - U_HI, U_LO - u], -1)


def merit_from(cost, d, g, lam_eq, lam_in, rho):
    """All args may have extra leading dims; rho broadcasts as (..., B)."""
    r = rho[..., None, None]
    m = cost + (lam_eq * d).sum((-2, -1)) + 0.5 * rho * (d * d).sum((-2, -1))
    s = lam_in + r * g
    term = torch.where(s > 0, lam_in * g + 0.5 * r * g * g, -0.5 * lam_in * lam_in / r)
    return m + term.sum((-2, -1))


# ----------------------------------------------------------------------------- the AL iteration, in stages
def linearize(x, u, lam_eq, lam_in, rho, theta):
    """-> grad (B, TN), H (B, TN, TN), merit M0 (B,), d (B,T-1,nx), g (B,T,2nu)."""
    b = x.shape[0]
    f, AB = pend_step_jac(x[:, :-1], u[:, :-1])  # (B,T-1,nx), (B,T-1,nx,n)
    d = x[:, 1:] - f
    g = ineq(u)
    r = rho[:, None, None]
    cost = cost_fn(x, u, theta)
    M0 = merit_from(cost, d, g, lam_eq, lam_in, rho)
    mu = lam_eq + r * d  # (B,T-1,nx)
    s = lam_in + r * g  # (B,T,2nu)
    act = (s > 0).to(DT)
    mu_in = s.clamp_min(0.0)
    # dense constraint Jacobians, x_0 columns pinned
    Jeq = (-AB[:, :, :, None, :] * S0[None, :, None, :, None]
           + S1[None, :, None, :, None] * EX[None, None, :, None, :]) * PIN  # (B,T-1,nx,T,n)
    Jeq = Jeq.reshape(b, (T - 1) * NX, TN)
    Jin = act[..., None, None] * JIN_PAT  # (B,T,2nu,T,n)
    Jin = Jin.reshape(b, T * 2 * NU, TN)
    cgrad = torch.cat([(x - theta) @ Qm, u @ Rm], -1).reshape(b, TN)
    grad = cgrad * PINF + (Jeq.transpose(1, 2) @ mu.reshape(b, -1, 1))[..., 0] \
        + (Jin.transpose(1, 2) @ mu_in.reshape(b, -1, 1))[..., 0]
    J = torch.cat([Jeq, Jin], 1)  # (B, (T-1)nx + 2 nu T, TN); Jin rows already masked by act
    H = (W_FULL + rho[:, None, None] * (J.transpose(1, 2) @ J)) * PIN2 + UNPIN
    return grad, H, M0, d, g


def newton_dir(H, grad):
    Lc, info = torch.linalg.cholesky_ex(H)
    dz = -torch.cholesky_solve(grad[..., None], Lc)[..., 0]
    ok = (info == 0)[:, None] & torch.isfinite(dz)
    return torch.where(ok, dz, torch.zeros_like(dz))


def line_search(x, u, dz, M0, d0, g0, lam_eq, lam_in, rho, theta):
    b = x.shape[0]
    dzr = dz.reshape(b, T, N)
    a = ALPHAS[:, None, None, None]
    xt = x + a * dzr[None, :, :, :NX]  # (K,B,T,nx)
    ut = u + a * dzr[None, :, :, NX:]
    dt_ = xt[:, :, 1:] - pend_step(xt[:, :, :-1], ut[:, :, :-1])  # (K,B,T-1,nx)
    gt = ineq(ut)
    Mt = merit_from(cost_fn(xt, ut, theta), dt_, gt, lam_eq, lam_in, rho)  # (K,B)
    dec = Mt < M0  # strict decrease (NaN -> False)
    anyd = dec.any(0)
    first = torch.argmax(dec.to(torch.int8), 0)  # first True = largest alpha
    sel = torch.where(anyd, first, torch.full_like(first, K))  # K = "alpha = 0"
    ar = torch.arange(b)
    x_all = torch.cat([xt, x[None]], 0)
    u_all = torch.cat([ut, u[None]], 0)
    d_all = torch.cat([dt_, d0[None]], 0)
    g_all = torch.cat([gt, g0[None]], 0)
    return x_all[sel, ar], u_all[sel, ar], d_all[sel, ar], g_all[sel, ar]


def al_iter(x, u, lam_eq, lam_in, rho, theta):
    grad, H, M0, d0, g0 = linearize(x, u, lam_eq, lam_in, rho, theta)
    dz = newton_dir(H, grad)
    xn, un, dn, gn = line_search(x, u, dz, M0, d0, g0, lam_eq, lam_in, rho, theta)
    r = rho[:, None, None]
    return xn, un, lam_eq + r * dn, (lam_in + r * gn).clamp_min(0.0), rho * 10.0


# ----------------------------------------------------------------------------- variant: batch-last line search
# Same math; the K-point line search runs on (K, T, n, B) tensors (batch innermost, so inductor's C++ loops
# vectorize over B instead of over dims of size 2/5/8), uses Q/R diagonal (the pendulum's Q, R are diagonal)
# and recomputes d, g at the accepted point instead of gathering from the stacked trials.
QD = torch.tensor(S.Q_diag, dtype=DT)
RD = torch.tensor(S.R_diag, dtype=DT)
if not (torch.equal(torch.diag(QD), Qm) and torch.equal(torch.diag(RD), Rm)):
    raise RuntimeError("the batch-last variant assumes diagonal Q and R")


def line_search_bl(x, u, dz, M0, lam_eq, lam_in, rho, theta):
    b = x.shape[0]
    zT = torch.cat([x, u], -1).permute(1, 2, 0)  # (T, n, B)
    dzT = dz.reshape(b, T, N).permute(1, 2, 0)
    thT = theta.permute(1, 2, 0)  # (T, nx, B)
    leqT = lam_eq.permute(1, 2, 0)  # (T-1, nx, B)
    linT = lam_in.permute(1, 2, 0)  # (T, 2nu, B)
    zt = zT + ALPHAS[:, None, None, None] * dzT  # (K, T, n, B)
    xt, ut = zt[:, :, :NX], zt[:, :, NX:]
    th, thd, u0 = xt[:, :-1, 0], xt[:, :-1, 1], ut[:, :-1, 0]  # (K, T-1, B)
    thd_n = thd + DTS * ((u0 + M_ * G_ * L_ * torch.sin(th)) / ML2)
    d = torch.stack([xt[:, 1:, 0] - (th + DTS * thd_n), xt[:, 1:, 1] - thd_n], 2)  # (K, T-1, nx, B)
    g = torch.cat([ut - U_HI[:, None], U_LO[:, None] - ut], 2)  # (K, T, 2nu, B)
    e = xt - thT
    cost = 0.5 * (QD[:, None] * e * e).sum((1, 2)) + 0.5 * (RD[:, None] * ut * ut).sum((1, 2))  # (K, B)
    r = rho
    m = cost + (leqT * d).sum((1, 2)) + 0.5 * r * (d * d).sum((1, 2))
    sv = linT + r * g
    term = torch.where(sv > 0, linT * g + 0.5 * r * g * g, -0.5 * linT * linT / r)
    Mt = m + term.sum((1, 2))  # (K, B)
    dec = Mt < M0
    alpha = torch.where(dec, ALPHAS[:, None], torch.zeros_like(Mt)).amax(0)  # largest alpha with decrease, else 0
    dzr = dz.reshape(b, T, N)
    xn = x + alpha[:, None, None] * dzr[..., :NX]
    un = u + alpha[:, None, None] * dzr[..., NX:]
    dn = xn[:, 1:] - pend_step(xn[:, :-1], un[:, :-1])
    return xn, un, dn, ineq(un)


def al_iter_bl(x, u, lam_eq, lam_in, rho, theta):
    grad, H, M0, d0, g0 = linearize(x, u, lam_eq, lam_in, rho, theta)
    dz = newton_dir(H, grad)
    xn, un, dn, gn = line_search_bl(x, u, dz, M0, lam_eq, lam_in, rho, theta)
    r = rho[:, None, None]
    return xn, un, lam_eq + r * dn, (lam_in + r * gn).clamp_min(0.0), rho * 10.0


# ----------------------------------------------------------------------------- helpers
def cold(x0, theta, rho0=1e3):
    b = x0.shape[0]
    x = theta.clone()
    x[:, 0] = x0
    return (x, torch.zeros(b, T, NU, dtype=DT), torch.zeros(b, T - 1, NX, dtype=DT),
            torch.zeros(b, T, 2 * NU, dtype=DT), torch.full((b,), rho0, dtype=DT))


def max_defect(x, u):
    return (x[:, 1:] - pend_step(x[:, :-1], u[:, :-1])).abs().max().item()


def med_ms(fn, reps, warm=20):
    """(median, 10th, 90th percentile) of ``reps`` call times [ms] after ``warm`` untimed calls."""
    ts = sorted(call_times(fn, reps, warmup=warm))
    return 1e3 * statistics.median(ts), 1e3 * ts[len(ts) // 10], 1e3 * ts[9 * len(ts) // 10]


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0
        self.ops = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        k = str(func.overloadpacket)
        self.ops[k] = self.ops.get(k, 0) + 1
        return func(*args, **(kwargs or {}))


def run_iters(fn, state, theta, n):
    out = []
    for _ in range(n):
        state = fn(*state, theta)
        out.append(state)
    return out


# ----------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--autotune", action="store_true")
    ap.add_argument("--compile-threads", type=int, default=1)
    ap.add_argument("--novec", action="store_true", help="inductor cpp.simdlen=1 (no SIMD codegen)")
    ap.add_argument("--only-bl", action="store_true")
    args = ap.parse_args()
    import torch._inductor.config as icfg
    icfg.compile_threads = args.compile_threads
    if args.novec:
        icfg.cpp.simdlen = 1
        print("inductor cpp.simdlen = 1 (vectorization off)")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"inductor cache {os.environ['TORCHINDUCTOR_CACHE_DIR']}, compile_threads {icfg.compile_threads}")

    x0, theta = make_batch(S, 200, 5)
    x0, theta = x0.to(DT), theta.to(DT)

    # --- dynamics check
    xs, us = theta.reshape(-1, NX), torch.randn(theta.shape[0] * T, NU, dtype=DT) * 3
    f_ref, A_ref, B_ref = S.step_and_jacobians(xs, us)
    f_me, AB_me = pend_step_jac(xs, us)
    print(f"dynamics check: |f-s.step| {float((f_me - S.step(xs, us)).abs().max()):.2e}  "
          f"|f-sj.f| {float((f_me - f_ref).abs().max()):.2e}  "
          f"|A| {float((AB_me[..., :NX] - A_ref).abs().max()):.2e}  "
          f"|B| {float((AB_me[..., NX:] - B_ref).abs().max()):.2e}")

    # --- reference solve
    pb = MPCProblem(S, MPCConfig(horizon=5, rho_init=1e3))
    with torch.no_grad():
        xr, ur, st, info = solve(pb, x0, theta, iters=12, stop_when_converged=True)
    pb2 = MPCProblem(S, MPCConfig(horizon=5, rho_init=1e3, newton_tol=1e-10, newton_steps=10))
    with torch.no_grad():
        _, _, _, info2 = solve(pb2, x0, theta, iters=8, stop_when_converged=False)
    print("reference solve(stop_when_converged) vs tightly converged solve (newton_tol 1e-10, 10 Newton steps, 8 AL"
          f" iters): max rel cost diff {((info.cost - info2.cost).abs() / info2.cost.abs()).max().item():.2e}")
    print(f"reference: converged {int(info.converged.sum())}/200, al_iters max {int(info.al_iters.max())}, "
          f"newton steps median {float(info.newton_steps.median())}, "
          f"max primal res {float(info.primal_residual.max()):.2e}")

    # --- eager correctness from a cold start
    states = run_iters(al_iter, cold(x0, theta), theta, args.iters)
    for i, s_ in enumerate(states):
        x, u = s_[0], s_[1]
        c = cost_fn(x, u, theta)
        rel = ((c - info.cost).abs() / info.cost.abs().clamp_min(1e-12)).max().item()
        print(f"  eager iter {i + 1}: max|d| {max_defect(x, u):.2e}  max viol(u) "
              f"{ineq(u).clamp_min(0).max().item():.2e}  max rel cost err vs solve() {rel:.2e}  "
              f"(vs tight solve {((c - info2.cost).abs() / info2.cost.abs()).max().item():.2e})  "
              f"max|x-xref| {(x - xr).abs().max().item():.2e} max|u-uref| {(u - ur).abs().max().item():.2e}")

    sbl = run_iters(al_iter_bl, cold(x0, theta), theta, args.iters)[-1]
    sv1 = states[-1]
    print(f"al_iter_bl vs al_iter after {args.iters} iters: max|dx,du| "
          f"{max((a - b).abs().max().item() for a, b in zip(sbl[:2], sv1[:2])):.2e}")
    # --- op count (one eager iteration, B=200)
    st0 = cold(x0, theta)
    with OpCounter() as oc:
        al_iter(*st0, theta)
    print(f"aten ops per eager AL iteration: {oc.n}")
    print("  " + ", ".join(f"{k.replace('aten.', '')}:{v}" for k, v in sorted(oc.ops.items(), key=lambda kv: -kv[1])))
    with OpCounter() as oc2:
        al_iter_bl(*st0, theta)
    print(f"aten ops per eager AL iteration (batch-last line-search variant): {oc2.n}")

    results = {}
    shapes = {200: (x0, theta), 1: (x0[:1].clone(), theta[:1].clone())}
    # state after 2 iterations (realistic: rho 1e5, some multipliers nonzero) used for timing
    tstates = {B: run_iters(al_iter, cold(*shapes[B]), shapes[B][1], 2)[-1] for B in shapes}

    # --- eager timing
    for B in shapes:
        th = shapes[B][1]
        stB = tstates[B]
        results[("eager", B)] = med_ms(lambda: al_iter(*stB, th), args.reps)
        results[("eager_bl", B)] = med_ms(lambda: al_iter_bl(*stB, th), args.reps)

    # --- eager breakdown at B=200
    th = theta
    stB = tstates[200]
    grad, H, M0, d0, g0 = linearize(*stB, th)
    dz = newton_dir(H, grad)
    bd = {
        "linearize (GN grad+dense H)": med_ms(lambda: linearize(*stB, th), args.reps),
        "cholesky_ex + cholesky_solve": med_ms(
            lambda: torch.cholesky_solve(grad[..., None], torch.linalg.cholesky_ex(H)[0]), args.reps),
        "cholesky_ex only": med_ms(lambda: torch.linalg.cholesky_ex(H), args.reps),
        "newton_dir (chol+solve+mask)": med_ms(lambda: newton_dir(H, grad), args.reps),
        "line search (K=8 stacked)": med_ms(
            lambda: line_search(stB[0], stB[1], dz, M0, d0, g0, stB[2], stB[3], stB[4], th), args.reps),
    }

    # --- compiled
    modes = [("default", None, al_iter), ("default_bl", None, al_iter_bl)]
    if args.only_bl:
        modes = modes[1:]
    if args.autotune:
        modes = [("max-autotune-no-cudagraphs", "max-autotune-no-cudagraphs", al_iter)]
    ctimes, diffs, cinfo = {}, {}, {}
    for mname, mode, fn in modes:
        torch._dynamo.reset()
        kw = dict(dynamic=False, fullgraph=True)
        if mode:
            kw["mode"] = mode
        cfn = torch.compile(fn, **kw)
        for B in shapes:
            th = shapes[B][1]
            stB = tstates[B]
            t0 = time.perf_counter()
            try:
                out_c = cfn(*stB, th)
            except Exception as e:  # report the exact error
                print(f"COMPILE FAILED ({mname}, B={B}): {type(e).__name__}: {e}")
                raise
            ctimes[(mname, B)] = time.perf_counter() - t0
            t0 = time.perf_counter()
            cfn(*stB, th)
            cinfo[(mname, B)] = time.perf_counter() - t0
            out_e = fn(*stB, th)
            diffs[(mname, B, "one iter")] = max((a - b).abs().max().item() for a, b in zip(out_c, out_e))
            # full cold-start sequence compiled vs eager
            se = run_iters(fn, cold(*shapes[B]), th, args.iters)[-1]
            for it in (4, 6):
                sc_ = run_iters(cfn, cold(*shapes[B]), th, it)[-1]
                se_ = run_iters(fn, cold(*shapes[B]), th, it)[-1]
                diffs[(mname, B, f"{it} iters x,u / lam")] = (
                    max((a - b).abs().max().item() for a, b in zip(sc_[:2], se_[:2])),
                    max((a - b).abs().max().item() for a, b in zip(sc_[2:4], se_[2:4])))
            sc = run_iters(cfn, cold(*shapes[B]), th, args.iters)[-1]
            diffs[(mname, B, f"{args.iters} iters x,u")] = max(
                (a - b).abs().max().item() for a, b in zip(sc[:2], se[:2]))
            diffs[(mname, B, f"{args.iters} iters lam")] = max(
                (a - b).abs().max().item() for a, b in zip(sc[2:4], se[2:4]))
            if B == 200:
                xc, uc = sc[0], sc[1]
                rel = ((cost_fn(xc, uc, th) - info2.cost).abs() / info2.cost.abs()).max().item()
                print(f"compiled ({mname}) after {args.iters} iters: max|d| {max_defect(xc, uc):.2e} "
                      f"rel cost err vs tight solve {rel:.2e}")
            results[(mname, B)] = med_ms(lambda: cfn(*stB, th), args.reps)
        # graph-break report
        try:
            ex = torch._dynamo.explain(fn)(*tstates[200], theta)
            print(f"dynamo explain ({mname}): graphs {ex.graph_count}, graph breaks {ex.graph_break_count}")
        except Exception as e:  # noqa: BLE001
            print("explain failed:", e)

    print("\n=== one AL iteration, ms (median [p10, p90]) of", args.reps, "reps ===")
    print("| variant | B=200 | B=1 |")
    print("|---|---|---|")
    for key in ["eager", "eager_bl"] + [m for m, _, _ in modes]:
        row = [f"{results[(key, B)][0]:.3f} [{results[(key, B)][1]:.3f}, {results[(key, B)][2]:.3f}]" for B in (200, 1)]
        print(f"| {key} | {row[0]} | {row[1]} |")
    print("\n=== compile wall time (s), first call incl. dynamo+inductor+C++; cold cache ===")
    for (m, B), v in ctimes.items():
        print(f"  {m} B={B}: {v:.1f} s   (2nd call {1e3 * cinfo[(m, B)]:.2f} ms)")
    print("\n=== eager breakdown, B=200, ms (median [p10,p90]) ===")
    for k, v in bd.items():
        print(f"  {k}: {v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]")
    print("\n=== compiled vs eager max abs diff ===")
    for k, v in diffs.items():
        print(f"  {k}: " + (f"{v:.2e}" if isinstance(v, float) else " / ".join(f"{w:.2e}" for w in v)))


if __name__ == "__main__":
    main()
