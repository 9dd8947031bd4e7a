"""Power-law fits for the scaling study: L(C) = a C^-b + c and L(N, D) = E + A N^-alpha + B D^-beta.

How: the coefficients that enter linearly (a, c; E, A, B) are solved by least squares for each
trial exponent (variable projection), which gives a robust start with no initial guess; scipy's
least_squares then refines all coefficients on the log loss (Hoffmann et al. 2022 fit in log
space too). Without scipy the exponents are refined by shrinking the search instead.
A fit from a handful of tiny runs says little beyond its data: plot_power_law marks anything
past the largest point as "extrapolation".
"""
from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from geb_jax.atomic_io import atomic_file

try:
    import scipy.optimize as _scipy_optimize
except ImportError:  # numpy-only fallback below
    _scipy_optimize = None


@dataclasses.dataclass(frozen=True)
class PowerLawFit:
    """L(x) = a * x^-b + c (c = 0 when fitted without an offset)."""
    a: float
    b: float
    c: float
    n_points: int
    rms_log_error: float  # root mean square of log(fit) - log(data) over the fitted points

    def __call__(self, x):
        x = np.asarray(x, np.float64)
        return np.exp(np.log(self.a) - self.b * np.log(x)) + self.c

    def formula(self) -> str:
        offset = f" + {self.c:.4g}" if self.c else ""
        return f"L = {self.a:.4g} * x^-{self.b:.4g}{offset}"


@dataclasses.dataclass(frozen=True)
class LossNDFit:
    """L(N, D) = E + A * N^-alpha + B * D^-beta (Chinchilla's parametric form)."""
    E: float
    A: float
    alpha: float
    B: float
    beta: float
    n_points: int
    rms_log_error: float

    def __call__(self, n, d):
        n, d = np.asarray(n, np.float64), np.asarray(d, np.float64)
        return (self.E + np.exp(np.log(self.A) - self.alpha * np.log(n))
                + np.exp(np.log(self.B) - self.beta * np.log(d)))


def _as_points(*arrays) -> list[np.ndarray]:
    arrays = [np.asarray(a, np.float64).ravel() for a in arrays]
    if len({a.size for a in arrays}) != 1:
        raise ValueError(f"power-law fit: inputs differ in length {[a.size for a in arrays]}.")
    if any(not np.all(np.isfinite(a)) or np.any(a <= 0) for a in arrays):
        raise ValueError("power-law fit: every x and loss must be finite and positive.")
    return arrays


def _linear_fit(columns: list[np.ndarray], y: np.ndarray):
    """Least squares y ~ sum_k w_k columns_k; returns (w, squared error)."""
    design = np.stack(columns, axis=1)
    w, *_ = np.linalg.lstsq(design, y, rcond=None)
    return w, float(np.sum((design @ w - y) ** 2))


def _shrinking_search(objective, bounds: list[tuple[float, float]], points: int = 41,
                      rounds: int = 30) -> np.ndarray:
    """Grid search that re-centres a finer grid on the best point each round (numpy only)."""
    lo, hi = np.array(bounds, np.float64).T
    best = (lo + hi) / 2
    for _ in range(rounds):
        grids = [np.linspace(l, h, points) for l, h in zip(lo, hi)]
        best = min((np.array(p) for p in itertools.product(*grids)), key=objective)
        half = (hi - lo) / 8
        lo = np.maximum(best - half, np.array(bounds)[:, 0])
        hi = np.minimum(best + half, np.array(bounds)[:, 1])
    return best


def fit_power_law(x, loss, offset: bool = True, use_scipy: bool | None = None) -> PowerLawFit:
    """Fits L(x) = a x^-b (+ c) to (x, loss) points, x being compute, parameters or tokens.

    Needs 3 points (2 without offset); with exactly that many the fit passes through them.
    """
    x, y = _as_points(x, loss)
    if x.size < (3 if offset else 2):
        raise ValueError(f"power-law fit needs at least {3 if offset else 2} points, "
                         f"got {x.size}.")
    use_scipy = _scipy_optimize is not None if use_scipy is None else use_scipy
    scale = float(np.exp(np.mean(np.log(x))))  # fit in x / scale: keeps x^-b near 1
    u = x / scale

    def linear_part(b: float):
        columns = [u ** -b] + ([np.ones_like(u)] if offset else [])
        w, err = _linear_fit(columns, y)
        if offset and w[1] < 0:  # a loss floor cannot be negative: the best fit has c = 0
            w0, err = _linear_fit([u ** -b], y)
            w = np.array([w0[0], 0.0])
        if offset and w[1] >= y.min():
            err = np.inf
        return w, err

    b = float(_shrinking_search(lambda p: linear_part(p[0])[1], [(1e-4, 4.0)])[0])
    w = linear_part(b)[0]
    a_scaled, c = float(w[0]), float(w[1]) if offset else 0.0
    if use_scipy and a_scaled > 0:
        def residual(p):
            return np.log(np.exp(p[0]) * u ** -p[1] + (p[2] if offset else 0.0)) - np.log(y)
        upper_c = y.min() * (1 - 1e-9)
        start = [np.log(a_scaled), b, min(max(c, 0.0), upper_c * 0.999)]
        result = _scipy_optimize.least_squares(
            residual, start, bounds=([-np.inf, 0.0, 0.0], [np.inf, 10.0, upper_c]),
            xtol=1e-15, ftol=1e-15, gtol=1e-15)
        a_scaled, b = float(np.exp(result.x[0])), float(result.x[1])
        c = float(result.x[2]) if offset else 0.0
    if a_scaled <= 0:
        raise ValueError("power-law fit: loss does not fall with x, so no L = a x^-b + c fits.")
    a = float(np.exp(np.log(a_scaled) + b * np.log(scale)))  # back to units of x
    fit = PowerLawFit(a, b, c, int(x.size), 0.0)
    rms = float(np.sqrt(np.mean((np.log(fit(x)) - np.log(y)) ** 2)))
    return dataclasses.replace(fit, rms_log_error=rms)


def fit_loss_nd(n_params, n_tokens, loss, use_scipy: bool | None = None) -> LossNDFit:
    """Fits L(N, D) = E + A N^-alpha + B D^-beta; needs at least 5 points (better: many more)."""
    n, d, y = _as_points(n_params, n_tokens, loss)
    if n.size < 5:
        raise ValueError(f"L(N, D) has 5 coefficients; got only {n.size} points.")
    use_scipy = _scipy_optimize is not None if use_scipy is None else use_scipy
    n0, d0 = float(np.exp(np.mean(np.log(n)))), float(np.exp(np.mean(np.log(d))))
    un, ud = n / n0, d / d0

    def linear_part(alpha: float, beta: float):
        w, err = _linear_fit([np.ones_like(y), un ** -alpha, ud ** -beta], y)
        return w, (err if np.all(w >= 0) else np.inf)

    alpha, beta = _shrinking_search(lambda p: linear_part(*p)[1], [(1e-3, 3.0), (1e-3, 3.0)],
                                    points=15, rounds=8 if use_scipy else 16)
    (e, a_s, b_s), _ = linear_part(alpha, beta)
    if use_scipy and a_s > 0 and b_s > 0:
        def residual(p):
            return np.log(p[0] + np.exp(p[1]) * un ** -p[2] + np.exp(p[3]) * ud ** -p[4]) \
                - np.log(y)
        result = _scipy_optimize.least_squares(
            residual, [max(e, 0.0), np.log(a_s), alpha, np.log(b_s), beta],
            bounds=([0.0, -np.inf, 0.0, -np.inf, 0.0], [y.min(), np.inf, 10.0, np.inf, 10.0]),
            xtol=1e-15, ftol=1e-15, gtol=1e-15)
        e, a_s, alpha, b_s, beta = (float(result.x[0]), float(np.exp(result.x[1])),
                                    float(result.x[2]), float(np.exp(result.x[3])),
                                    float(result.x[4]))
    fit = LossNDFit(float(e), float(a_s * n0 ** alpha), float(alpha), float(b_s * d0 ** beta),
                    float(beta), int(n.size), 0.0)
    rms = float(np.sqrt(np.mean((np.log(fit(n, d)) - np.log(y)) ** 2)))
    return dataclasses.replace(fit, rms_log_error=rms)


def plot_power_law(fit: PowerLawFit, x, loss, path: str, extrapolate: float = 10.0,
                   xlabel: str = "training compute (FLOPs)", ylabel: str = "loss",
                   labels: list[str] | None = None, title: str | None = None) -> str:
    """Points, the fit over the data's range, and the fit continued `extrapolate` x further,
    in a shaded region labelled "extrapolation". Written atomically; returns the path."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    x, y = _as_points(x, loss)
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.add_subplot()
    ax.scatter(x, y, color="C0", zorder=3, label=f"runs ({x.size})")
    for xi, yi, label in zip(x, y, labels or []):
        ax.annotate(label, (xi, yi), fontsize=6, xytext=(3, 3), textcoords="offset points")
    inside = np.geomspace(x.min(), x.max(), 100)
    ax.plot(inside, fit(inside), color="C1", label=fit.formula())
    if extrapolate > 1:
        beyond = np.geomspace(x.max(), x.max() * extrapolate, 50)
        ax.plot(beyond, fit(beyond), color="C1", linestyle="--",
                label=f"extrapolation (x{extrapolate:g}, no data)")
        ax.axvspan(x.max(), x.max() * extrapolate, color="0.9", zorder=0)
        ax.text(np.sqrt(x.max() * x.max() * extrapolate), ax.get_ylim()[1], "extrapolation",
                ha="center", va="top", fontsize=9, color="0.3")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title or f"power-law fit on {x.size} points (rms log error "
                          f"{fit.rms_log_error:.2g})", fontsize=10)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def save_figure(fig, path: str) -> str:
    """Saves a matplotlib Figure as PNG all or nothing (temporary name, then rename)."""
    with atomic_file(path) as f:
        fig.savefig(f, dpi=120, format="png")
    return path
