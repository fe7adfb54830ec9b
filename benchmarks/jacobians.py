"""Benchmark: analytic vs autodiff Jacobians of the discrete dynamics (``System.step_and_jacobians``).

Usage::

    python benchmarks/jacobians.py [--threads 2] [--dtype float64] [--batch 1 200 1000] [--repeats 50]

Prints, per system and batch size, the median wall time [ms] of the analytic Jacobians
(``system.step_and_jacobians``), of the generic reverse-mode reference (``autodiff_jacobians``) and of a plain
``system.step``, plus the speed-up ``autodiff / analytic``. The minimum is shown too (robust to other load).
For systems with ``numpy_fast_path`` (float64 CPU no-grad calls run numpy), the analytic Jacobians are also
timed with the fast path switched off (``torch path``) and the ratio ``torch / numpy`` is printed. For batches up
to ``complex_step_max_batch`` (the complex-step Jacobians), the analytic chain rule on numpy is timed beside it
(``chain/cstep``: how much the complex step saves).
"""

from __future__ import annotations

import argparse
import statistics

import torch

from deqmpc_gym.systems import SYSTEMS, get_system
from deqmpc_gym.systems.base import autodiff_jacobians

from _timing import call_times


def _time(fn, repeats: int) -> tuple[float, float]:
    """``(median, min)`` wall time of ``fn()`` in ms after two warm-up calls."""
    ts = call_times(fn, repeats, warmup=2)
    return 1e3 * statistics.median(ts), 1e3 * min(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float64")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 200, 1000])
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--systems", nargs="+", default=list(SYSTEMS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.dtype}; times in ms (median / min)")
    header = (f"{'system':<10} {'B':>5} | {'analytic':>15} | {'autodiff':>15} | {'step':>15} | {'speed-up':>8} | "
              f"{'torch path':>15} | {'torch/numpy':>11} | {'chain/cstep':>11}")
    print(header)
    print("-" * len(header))
    for name in args.systems:
        system = get_system(name)
        for nb in args.batch:
            x = 0.5 * torch.randn(nb, system.nx, generator=gen, dtype=torch.float64)
            lo, hi = system.tensor("u_low"), system.tensor("u_high")
            u = lo + (hi - lo) * torch.rand(nb, system.nu, generator=gen, dtype=torch.float64)
            x, u = x.to(dtype), u.to(dtype)
            an = _time(lambda: system.step_and_jacobians(x, u), args.repeats)
            ad = _time(lambda: autodiff_jacobians(system, x, u), args.repeats)
            st = _time(lambda: system.step(x, u), args.repeats)
            extra = ""
            if system.numpy_fast_path:
                type(system).numpy_fast_path = False
                try:
                    tp = _time(lambda: system.step_and_jacobians(x, u), args.repeats)
                finally:
                    type(system).numpy_fast_path = True
                extra = f" | {tp[0]:7.3f} /{tp[1]:7.3f} | {tp[0] / an[0]:10.1f}x"
                if nb <= system.complex_step_max_batch:
                    limit = type(system).complex_step_max_batch
                    type(system).complex_step_max_batch = 0
                    try:
                        ch = _time(lambda: system.step_and_jacobians(x, u), args.repeats)
                    finally:
                        type(system).complex_step_max_batch = limit
                    extra += f" | {ch[0] / an[0]:10.1f}x"
            print(f"{name:<10} {nb:>5} | {an[0]:7.3f} /{an[1]:7.3f} | {ad[0]:7.3f} /{ad[1]:7.3f} | "
                  f"{st[0]:7.3f} /{st[1]:7.3f} | {ad[0] / an[0]:7.1f}x{extra}")


if __name__ == "__main__":
    main()
