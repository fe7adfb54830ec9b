"""Prototype (not part of the package): a structure-exploiting AL iteration for the Pendulum MPC (T = 5) that
``torch.compile`` fuses into one elementwise C++ kernel over the batch -- what a compiled streaming path of
``deqmpc_gym.mpc`` could cost (README, solver targets). Pendulum-specific; compares against
``benchmarks/al_floor.py``'s minimal dense iteration in the same process.

al_iter_struct: block-tridiagonal GN Hessian built elementwise (no bmm), block-tridiagonal Cholesky + the two
substitutions written as explicit scalar formulas on (B,)-shaped tensors (loops over knots / 3x3 entries unrolled
at trace time, exact Python-float zeros/ones short-circuited), branch-free pivot-failure flag, K-point line search
(alphas 1, 1/2, 1/4, 1/8 or alpha = 1 only), dual update, rho *= 10.

Run: python benchmarks/al_struct_prototype.py [--reps 300] [--novec] [--code]   (compiles 10 graphs: ~3 min)
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="inductor_al_struct_"))

import torch  # noqa: E402

torch.set_num_threads(1)
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
sys.path.insert(0, ROOT)

import al_floor as F  # noqa: E402

DT, T, NX, NU, N, TN = F.DT, F.T, F.NX, F.NU, F.N, F.TN
DTS, M_, G_, L_, ML2 = F.DTS, F.M_, F.G_, F.L_, F.ML2
QD = [float(v) for v in F.S.Q_diag]
RD = [float(v) for v in F.S.R_diag]
UHI = float(F.S.u_high[0])
ULO = float(F.S.u_low[0])
if not (NX == 2 and NU == 1):
    raise RuntimeError("this prototype is written for the Pendulum (nx = 2, nu = 1)")
# constant Jacobian entries (A01 = DTS, A11 = 1, B = [DTS^2/ML2, DTS/ML2]), as in al_floor.pend_step_jac
A01, A11 = DTS, 1.0
B0C, B1C = DTS * DTS / ML2, DTS / ML2
CA10 = DTS * M_ * G_ * L_ / ML2


# ----------------------------------------------------------------------------- scalar helpers (float | tensor)
def _isc(a, v):
    return type(a) is float and a == v


def mul(a, b):
    if _isc(a, 0.0) or _isc(b, 0.0):
        return 0.0
    if _isc(a, 1.0):
        return b
    if _isc(b, 1.0):
        return a
    return a * b


def add(a, b):
    if _isc(a, 0.0):
        return b
    if _isc(b, 0.0):
        return a
    return a + b


def sub(a, b):
    if _isc(b, 0.0):
        return a
    if _isc(a, 0.0):
        return -b
    return a - b


def ssum(*xs):
    out = 0.0
    for v in xs:
        out = add(out, v)
    return out


# ----------------------------------------------------------------------------- scalar pendulum
def dyn(th, thd, u):
    """same expression order as al_floor.pend_step"""
    thdd = (u + M_ * G_ * L_ * torch.sin(th)) / ML2
    thd_n = thd + DTS * thdd
    return th + DTS * thd_n, thd_n


def jac(th):
    """[A | B] as 2x3 nested list; only A00, A10 depend on th"""
    a10 = CA10 * torch.cos(th)
    return [[1.0 + DTS * a10, A01, B0C], [a10, A11, B1C]]


def merit_s(xs, us, th, leq, lin, rho):
    """xs[t] = (th, thd), us[t], th[t] = (th0, th1), leq[t] = (l0, l1), lin[t] = (lhi, llo); -> (B,) merit, d, g"""
    cost = 0.0
    for t in range(T):
        e0, e1 = xs[t][0] - th[t][0], xs[t][1] - th[t][1]
        cost = cost + 0.5 * (QD[0] * e0 * e0 + QD[1] * e1 * e1 + RD[0] * us[t] * us[t])
    m = cost
    ds, gs = [], []
    for t in range(T - 1):
        f0, f1 = dyn(xs[t][0], xs[t][1], us[t])
        d0, d1 = xs[t + 1][0] - f0, xs[t + 1][1] - f1
        ds.append((d0, d1))
        m = m + leq[t][0] * d0 + leq[t][1] * d1 + 0.5 * rho * (d0 * d0 + d1 * d1)
    for t in range(T):
        g = (us[t] - UHI, ULO - us[t])
        gs.append(g)
        for j in range(2):
            lj = lin[t][j]
            s = lj + rho * g[j]
            m = m + torch.where(s > 0, lj * g[j] + 0.5 * rho * g[j] * g[j], -0.5 * lj * lj / rho)
    return m, ds, gs


def unpack(x, u, lam_eq, lam_in, theta):
    xs = [(x[:, t, 0], x[:, t, 1]) for t in range(T)]
    us = [u[:, t, 0] for t in range(T)]
    th = [(theta[:, t, 0], theta[:, t, 1]) for t in range(T)]
    leq = [(lam_eq[:, t, 0], lam_eq[:, t, 1]) for t in range(T - 1)]
    lin = [(lam_in[:, t, 0], lam_in[:, t, 1]) for t in range(T)]
    return xs, us, th, leq, lin


# ----------------------------------------------------------------------------- structured linearization
def lin_struct(xs, us, th, leq, lin, rho):
    """-> grad [T][3], D [T] 3x3 (symmetric, full), Lsub [T-1] 3x3 (rows knot t+1, cols knot t), M0, d0, g0"""
    M0, ds, gs = merit_s(xs, us, th, leq, lin, rho)
    AB = [jac(xs[t][0]) for t in range(T - 1)]
    mu = [(leq[t][0] + rho * ds[t][0], leq[t][1] + rho * ds[t][1]) for t in range(T - 1)]
    grad, D, Ls = [], [], []
    for t in range(T):
        s_hi = lin[t][0] + rho * gs[t][0]
        s_lo = lin[t][1] + rho * gs[t][1]
        act = (s_hi > 0).to(DT) + (s_lo > 0).to(DT)
        gu = RD[0] * us[t] + s_hi.clamp_min(0.0) - s_lo.clamp_min(0.0)
        if t == 0:
            gx = [0.0, 0.0]
        else:
            gx = [QD[0] * (xs[t][0] - th[t][0]) + mu[t - 1][0], QD[1] * (xs[t][1] - th[t][1]) + mu[t - 1][1]]
        # rho * J^T J on knot t
        JJ = [[0.0] * 3 for _ in range(3)]
        if t < T - 1:
            a = AB[t]
            for i in range(3):
                for j in range(3):
                    JJ[i][j] = add(mul(a[0][i], a[0][j]), mul(a[1][i], a[1][j]))
            gxu = [ssum(mul(a[0][i], mu[t][0]), mul(a[1][i], mu[t][1])) for i in range(3)]  # AB^T mu
            gx = [sub(gx[0], gxu[0]), sub(gx[1], gxu[1])]
            gu = sub(gu, gxu[2])
        if t == 0:  # x_0 pinned: gradient zeroed
            gx = [0.0, 0.0]
        if t >= 1:
            JJ[0][0] = add(JJ[0][0], 1.0)
            JJ[1][1] = add(JJ[1][1], 1.0)
        JJ[2][2] = add(JJ[2][2], act)
        Dt = [[mul(rho, JJ[i][j]) for j in range(3)] for i in range(3)]
        Dt[0][0] = add(Dt[0][0], QD[0])
        Dt[1][1] = add(Dt[1][1], QD[1])
        Dt[2][2] = add(Dt[2][2], RD[0])
        if t == 0:  # x_0 pinned: its rows/cols -> identity
            for i in range(2):
                for j in range(3):
                    Dt[i][j] = 0.0
                    Dt[j][i] = 0.0
                Dt[i][i] = 1.0
        D.append(Dt)
        grad.append([gx[0], gx[1], gu])
        if t < T - 1:
            a = AB[t]
            Lt = [[-rho * a[i][j] if not (t == 0 and j < 2) else 0.0 for j in range(3)] for i in range(2)]
            Lt.append([0.0, 0.0, 0.0])
            Ls.append(Lt)
    return grad, D, Ls, M0, ds, gs


# ----------------------------------------------------------------------------- block-tridiagonal Cholesky solve
def _sqrt_inv(p, ok):
    """1/sqrt(p) of a pivot; p <= 0 (or NaN) -> ok = False and a harmless 1."""
    if type(p) is float:
        return 1.0 / math.sqrt(p), ok
    good = p > 0
    ok = good if ok is None else ok & good
    return torch.rsqrt(torch.where(good, p, torch.ones_like(p))), ok


def chol3(Sm, ok):
    """lower Cholesky of symmetric 3x3 (nested list); returns C (with zeros above), inverse diagonal, ok."""
    i0, ok = _sqrt_inv(Sm[0][0], ok)
    c00 = Sm[0][0] if type(Sm[0][0]) is float and Sm[0][0] == 1.0 else None
    c10 = mul(Sm[1][0], i0)
    c20 = mul(Sm[2][0], i0)
    i1, ok = _sqrt_inv(sub(Sm[1][1], mul(c10, c10)), ok)
    c21 = mul(sub(Sm[2][1], mul(c20, c10)), i1)
    i2, ok = _sqrt_inv(sub(sub(Sm[2][2], mul(c20, c20)), mul(c21, c21)), ok)
    del c00
    C = [[None, 0.0, 0.0], [c10, None, 0.0], [c20, c21, None]]  # diagonal only via inverse
    return C, [i0, i1, i2], ok


def fwd3(C, inv, b):
    """solve C y = b (C lower, diag given by inv)"""
    y0 = mul(b[0], inv[0])
    y1 = mul(sub(b[1], mul(C[1][0], y0)), inv[1])
    y2 = mul(sub(sub(b[2], mul(C[2][0], y0)), mul(C[2][1], y1)), inv[2])
    return [y0, y1, y2]


def bwd3(C, inv, b):
    """solve C^T z = b"""
    z2 = mul(b[2], inv[2])
    z1 = mul(sub(b[1], mul(C[2][1], z2)), inv[1])
    z0 = mul(sub(sub(b[0], mul(C[1][0], z1)), mul(C[2][0], z2)), inv[0])
    return [z0, z1, z2]


def btri_solve(D, Ls, grad):
    """H z = grad with H block-tridiagonal (diag D_t, sub-diag Ls_t); returns z [T][3], ok (B,) bool"""
    ok = None
    Cs, invs, Es = [], [], []
    Sm = D[0]
    for t in range(T):
        C, inv, ok = chol3(Sm, ok)
        Cs.append(C)
        invs.append(inv)
        if t < T - 1:
            Lt = Ls[t]
            E = [fwd3(C, inv, Lt[r]) for r in range(3)]  # row r of E: C e^T = l^T
            Es.append(E)
            Dn = D[t + 1]
            Sm = [[sub(Dn[i][j], ssum(*[mul(E[i][k], E[j][k]) for k in range(3)])) if j <= i else None
                   for j in range(3)] for i in range(3)]
    ys = []
    for t in range(T):
        b = grad[t]
        if t > 0:
            E = Es[t - 1]
            b = [sub(b[i], ssum(*[mul(E[i][k], ys[t - 1][k]) for k in range(3)])) for i in range(3)]
        ys.append(fwd3(Cs[t], invs[t], b))
    zs = [None] * T
    for t in reversed(range(T)):
        b = ys[t]
        if t < T - 1:
            E = Es[t]
            b = [sub(b[i], ssum(*[mul(E[k][i], zs[t + 1][k]) for k in range(3)])) for i in range(3)]
        zs[t] = bwd3(Cs[t], invs[t], b)
    return zs, ok


# ----------------------------------------------------------------------------- the iteration
def unpack_bl(x, u, lam_eq, lam_in, theta):
    """batch-last layout: x (T, nx, B), u (T, nu, B), lam_eq (T-1, nx, B), lam_in (T, 2nu, B), theta (T, nx, B)"""
    xs = [(x[t, 0], x[t, 1]) for t in range(T)]
    us = [u[t, 0] for t in range(T)]
    th = [(theta[t, 0], theta[t, 1]) for t in range(T)]
    leq = [(lam_eq[t, 0], lam_eq[t, 1]) for t in range(T - 1)]
    lin = [(lam_in[t, 0], lam_in[t, 1]) for t in range(T)]
    return xs, us, th, leq, lin


def to_bl(st, theta):
    x, u, le, li, rho = st
    return (x.permute(1, 2, 0).contiguous(), u.permute(1, 2, 0).contiguous(), le.permute(1, 2, 0).contiguous(),
            li.permute(1, 2, 0).contiguous(), rho), theta.permute(1, 2, 0).contiguous()


def from_bl(st):
    x, u, le, li, rho = st
    return x.permute(2, 0, 1), u.permute(2, 0, 1), le.permute(2, 0, 1), li.permute(2, 0, 1), rho


def make_al_iter_struct(alphas=(1.0, 0.5, 0.25, 0.125), return_alpha=False, bl=False):
    """bl=True: all state tensors and theta in batch-last layout (T, n, B) in and out."""
    alphas = tuple(float(a) for a in alphas)

    def al_iter_struct(x, u, lam_eq, lam_in, rho, theta):
        xs, us, th, leq, lin = (unpack_bl if bl else unpack)(x, u, lam_eq, lam_in, theta)
        grad, D, Ls, M0, _, _ = lin_struct(xs, us, th, leq, lin, rho)
        zs, ok = btri_solve(D, Ls, grad)
        # dz = -z, zeroed for failed samples / non-finite entries (x_0 part is exactly 0)
        dz = []
        for t in range(T):
            row = []
            for i in range(3):
                v = zs[t][i]
                if type(v) is float:
                    row.append(0.0)
                else:
                    row.append(torch.where(ok & torch.isfinite(v), -v, torch.zeros_like(v)))
            dz.append(row)
        # line search: merits at all alphas, largest alpha with strict decrease, else 0
        decs = []
        for a in alphas:
            xa = [(add(xs[t][0], mul(a, dz[t][0])), add(xs[t][1], mul(a, dz[t][1]))) for t in range(T)]
            ua = [add(us[t], mul(a, dz[t][2])) for t in range(T)]
            Ma, _, _ = merit_s(xa, ua, th, leq, lin, rho)
            decs.append(Ma < M0)
        alpha = torch.zeros_like(M0)
        for a, dec in reversed(list(zip(alphas, decs))):
            alpha = torch.where(dec, a, alpha)
        if return_alpha:
            return alpha, dz
        xn = [(add(xs[t][0], mul(alpha, dz[t][0])), add(xs[t][1], mul(alpha, dz[t][1]))) for t in range(T)]
        un = [add(us[t], mul(alpha, dz[t][2])) for t in range(T)]
        leqn, linn = [], []
        for t in range(T - 1):
            f0, f1 = dyn(xn[t][0], xn[t][1], un[t])
            leqn.append(torch.stack([leq[t][0] + rho * (xn[t + 1][0] - f0), leq[t][1] + rho * (xn[t + 1][1] - f1)], -1))
        for t in range(T):
            linn.append(torch.stack([(lin[t][0] + rho * (un[t] - UHI)).clamp_min(0.0),
                                     (lin[t][1] + rho * (ULO - un[t])).clamp_min(0.0)], -1))
        if bl:
            xo = torch.stack([torch.stack([xn[t][0], xn[t][1]], 0) for t in range(T)], 0)
            uo = torch.stack(un, 0)[:, None]
            return (xo, uo, torch.stack([v.t() for v in leqn], 0), torch.stack([v.t() for v in linn], 0),
                    rho * 10.0)
        xo = torch.stack([torch.stack([xn[t][0], xn[t][1]], -1) for t in range(T)], 1)
        uo = torch.stack(un, 1)[..., None]
        return xo, uo, torch.stack(leqn, 1), torch.stack(linn, 1), rho * 10.0

    return al_iter_struct


al_iter_struct = make_al_iter_struct()  # K = 4
al_iter_struct_a1 = make_al_iter_struct((1.0,))  # alpha = 1 only
al_iter_struct_bl = make_al_iter_struct(bl=True)  # K = 4, batch-last I/O
al_iter_struct_a1_bl = make_al_iter_struct((1.0,), bl=True)
al_iter_struct_k8 = make_al_iter_struct(tuple(F.ALPHAS.tolist()))  # K = 8, for the exact comparison


# ----------------------------------------------------------------------------- checks
def assemble_dense(D, Ls, b):
    H = torch.zeros(b, TN, TN, dtype=DT)

    def val(v):
        return v if type(v) is not float else torch.full((b,), v, dtype=DT)

    for t in range(T):
        for i in range(3):
            for j in range(3):
                H[:, 3 * t + i, 3 * t + j] = val(D[t][i][j])
        if t < T - 1:
            for i in range(3):
                for j in range(3):
                    H[:, 3 * (t + 1) + i, 3 * t + j] = val(Ls[t][i][j])
                    H[:, 3 * t + j, 3 * (t + 1) + i] = val(Ls[t][i][j])
    return H


def mx(a, b):
    return max((p - q).abs().max().item() for p, q in zip(a, b))


def checks(x0, theta, iters):
    out = {}
    for label, st in [("cold", F.cold(x0, theta)), ("after 2 al_iter", F.run_iters(F.al_iter, F.cold(x0, theta), theta, 2)[-1]),
                      ("after 4 al_iter", F.run_iters(F.al_iter, F.cold(x0, theta), theta, 4)[-1])]:
        x, u, le, li, rho = st
        gd, Hd, M0d, _, _ = F.linearize(x, u, le, li, rho, theta)
        grad, D, Ls, M0, _, _ = lin_struct(*unpack(x, u, le, li, theta), rho)
        Hs = assemble_dense(D, Ls, x.shape[0])
        gs = torch.stack([v if type(v) is not float else torch.zeros_like(rho) for t in range(T) for v in grad[t]], -1)
        zs, ok = btri_solve(D, Ls, grad)
        z = torch.stack([v if type(v) is not float else torch.zeros_like(rho) for t in range(T) for v in zs[t]], -1)
        zd = -F.newton_dir(Hd, gd)
        print(f"[{label}] H: max|Hs-Hd|/max|Hd| {((Hs - Hd).abs().max() / Hd.abs().max()).item():.2e} "
              f"(max|Hd| {Hd.abs().max().item():.1e}); grad rel {((gs - gd).abs().max() / gd.abs().max()).item():.2e}; "
              f"M0 rel {((M0 - M0d).abs() / M0d.abs()).max().item():.2e}; dz rel "
              f"{((z - zd).abs().max() / zd.abs().max()).item():.2e}; chol ok {int(ok.sum())}/{ok.numel()}")
        # one iteration from the same state
        r_ref = F.al_iter(*st, theta)
        for nm, fn in [("K=4", al_iter_struct), ("K=8", al_iter_struct_k8), ("alpha=1", al_iter_struct_a1)]:
            r = fn(*st, theta)
            dxu = torch.cat([(r[0] - r_ref[0]).abs().flatten(1), (r[1] - r_ref[1]).abs().flatten(1)], 1).amax(1)
            scale = max(r_ref[0].abs().max().item(), r_ref[1].abs().max().item())
            nbad = int((dxu > 1e-8 * scale).sum())
            print(f"   one iter {nm:8s} vs al_iter: max|dx,du| {dxu.max().item():.2e}  max|dlam| {mx(r[2:4], r_ref[2:4]):.2e}"
                  f"  samples differing >1e-8*scale: {nbad}")
        # line-search choice K=8 (== al_iter's) vs K=4
        a8, dz8 = make_al_iter_struct(tuple(F.ALPHAS.tolist()), True)(*st, theta)
        a4, _ = make_al_iter_struct(return_alpha=True)(*st, theta)
        dzn = torch.stack([v if type(v) is not float else torch.zeros_like(rho) for r_ in dz8 for v in r_], -1).abs().amax(1)
        diff = a8 != a4
        print("   K=8 alpha histogram: " + ", ".join(f"{a:g}:{int((a8 == a).sum())}" for a in F.ALPHAS.tolist() + [0.0])
              + f" | K=4 differs on {int(diff.sum())} samples (alpha_K8 {sorted(set(a8[diff].tolist()))}), "
              f"max |dz|inf there {dzn[diff].max().item() if diff.any() else 0.0:.2e}")
    # convergence from a cold start
    st_ref = F.cold(x0, theta)
    st_s = F.cold(x0, theta)
    st_a1 = F.cold(x0, theta)
    for i in range(iters):
        st_ref = F.al_iter(*st_ref, theta)
        st_s = al_iter_struct(*st_s, theta)
        st_a1 = al_iter_struct_a1(*st_a1, theta)
        cr = F.cost_fn(st_ref[0], st_ref[1], theta)
        cs = F.cost_fn(st_s[0], st_s[1], theta)
        ca = F.cost_fn(st_a1[0], st_a1[1], theta)
        print(f"  iter {i + 1}: max|d| al_iter {F.max_defect(st_ref[0], st_ref[1]):.2e}  struct K=4 "
              f"{F.max_defect(st_s[0], st_s[1]):.2e}  struct a=1 {F.max_defect(st_a1[0], st_a1[1]):.2e} | "
              f"cost rel diff K=4 {((cs - cr).abs() / cr.abs()).max().item():.2e}  a=1 {((ca - cr).abs() / cr.abs()).max().item():.2e}"
              f" | max|x,u diff| K=4 {mx(st_s[:2], st_ref[:2]):.2e}")
    out["final"] = (st_ref, st_s, st_a1)
    return out


# ----------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--novec", action="store_true")
    ap.add_argument("--code", action="store_true", help="dump generated code of struct K=4 at B=200")
    ap.add_argument("--no-eager", action="store_true")
    ap.add_argument("--no-ref", action="store_true")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--noheur", action="store_true", help="inductor cpp.enable_tiling_heuristics = False")
    ap.add_argument("--only", default="")
    args = ap.parse_args()
    import torch._inductor.config as icfg
    icfg.compile_threads = 1
    if args.novec:
        icfg.cpp.simdlen = 1
    if args.noheur:
        icfg.cpp.enable_tiling_heuristics = False
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, simdlen {icfg.cpp.simdlen}, tiling heuristics {icfg.cpp.enable_tiling_heuristics}, "
          f"cache {os.environ['TORCHINDUCTOR_CACHE_DIR']}")
    x0, theta = F.make_batch(F.S, 200, 5)
    x0, theta = x0.to(DT), theta.to(DT)
    if not args.no_check:
        checks(x0, theta, args.iters)

    shapes = {200: (x0, theta), 1: (x0[:1].clone(), theta[:1].clone())}
    tstates = {B: F.run_iters(F.al_iter, F.cold(*shapes[B]), shapes[B][1], 2)[-1] for B in shapes}
    fns = [("struct K=4", al_iter_struct), ("struct alpha=1", al_iter_struct_a1),
           ("struct K=4 BL", al_iter_struct_bl), ("struct alpha=1 BL", al_iter_struct_a1_bl)]
    if args.only:
        fns = [f for f in fns if f[0] in args.only.split(",")]
    tstates_bl = {B: to_bl(tstates[B], shapes[B][1]) for B in shapes}

    def get(nm, B):
        return tstates_bl[B] if nm.endswith("BL") else (tstates[B], shapes[B][1])
    if not args.no_ref:
        fns = [("al_iter (ref)", F.al_iter)] + fns
    res, ctime = {}, {}
    if not args.no_eager:
        for nm, fn in fns:
            for B in shapes:
                stB, th = get(nm, B)
                res[(nm, "eager", B)] = F.med_ms(lambda: fn(*stB, th), args.reps)
    for nm, fn in fns:
        torch._dynamo.reset()
        cfn = torch.compile(fn, fullgraph=True, dynamic=False)
        for B in shapes:
            stB, th = get(nm, B)
            t0 = time.perf_counter()
            if args.code and B == 200 and nm.startswith("struct"):
                from torch._inductor.utils import run_and_get_code
                oc, codes = run_and_get_code(cfn, *stB, th)
                p = os.path.join(tempfile.gettempdir(), f"al_struct_code_{'_'.join(nm.split()[1:]).replace('=', '')}{'_novec' if args.novec else ''}{'_noheur' if args.noheur else ''}.py")
                with open(p, "w") as fh:
                    fh.write("\n\n# ======\n".join(codes))
                print(f"  code -> {p}: {sum(c.count('cpp_fused') for c in codes)} 'cpp_fused' mentions, "
                      f"extern_kernels: {sum(c.count('extern_kernels.') for c in codes)}, aten.: {sum(c.count('aten.') for c in codes)}")
            else:
                oc = cfn(*stB, th)
            ctime[(nm, B)] = time.perf_counter() - t0
            oe = fn(*stB, th)
            print(f"  {nm} B={B}: compile {ctime[(nm, B)]:.1f} s, compiled vs eager max diff {mx(oc, oe):.2e}")
            res[(nm, "compiled", B)] = F.med_ms(lambda: cfn(*stB, th), args.reps)
        if nm.startswith("struct"):
            # converge with compiled fn from cold start
            th = theta
            if nm.endswith("BL"):
                st_, thb = to_bl(F.cold(x0, th), th)
                sc = from_bl(F.run_iters(cfn, st_, thb, 6)[-1])
                ref1 = F.al_iter(*tstates[200], th)
                one = from_bl(cfn(*tstates_bl[200][0], tstates_bl[200][1]))
                print(f"  {nm} compiled one iter vs al_iter: max|dx,du| {mx(one[:2], ref1[:2]):.2e}")
            else:
                sc = F.run_iters(cfn, F.cold(x0, th), th, 6)[-1]
            print(f"  {nm} compiled, 6 iters from cold: max|d| {F.max_defect(sc[0], sc[1]):.2e}")
            # profiler: which ops run inside the compiled call
            stB, th = get(nm, 200)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                for _ in range(20):
                    cfn(*stB, th)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))

    print(f"\n=== one AL iteration, ms: median [p10, p90] of {args.reps} reps; simdlen {icfg.cpp.simdlen} ===")
    print("| variant | mode | B=200 | B=1 |")
    print("|---|---|---|---|")
    for (nm, mode, B), v in res.items():
        if B != 200:
            continue
        w = res[(nm, mode, 1)]
        print(f"| {nm} | {mode} | {v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}] | {w[0]:.3f} [{w[1]:.3f}, {w[2]:.3f}] |")
    print("compile wall times (s, first call):", ", ".join(f"{k[0]} B={k[1]}: {v:.1f}" for k, v in ctime.items()))


if __name__ == "__main__":
    main()
