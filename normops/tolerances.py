"""Numerical tolerances, per dtype, in one place.

`OP` bounds one fused op against the float64 reference (kernel and ORT-op tests): output
rounding of the dtype plus fp32 accumulation. `GRAPH` bounds a whole fused graph against the
reference graph run by the same backend: errors of several layers and both graphs' own roundings.
A value passes when |actual - expected| <= atol + rtol * |expected| (numpy.allclose's rule).
Integer and boolean outputs (token ids, masks) must match exactly. The relative error reported
is taken where |expected| >= atol only: near zero the absolute tolerance governs, and a
denominator there would make the figure meaningless (1e8 for a 1e-8 reference value).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float

    def passes(self, actual: np.ndarray, expected: np.ndarray) -> bool:
        return bool(np.all(within(actual, expected, self)))


OP = {
    "float32": Tolerance(atol=1e-5, rtol=1e-5),
    "float16": Tolerance(atol=2e-3, rtol=2e-3),  # fp16 has 11 significant bits: 2^-10 ~ 1e-3
    "bfloat16": Tolerance(atol=1.6e-2, rtol=1.6e-2),  # bf16 has 8: 2^-7 ~ 8e-3
}

GRAPH = {
    "float32": Tolerance(atol=1e-4, rtol=1e-3),
    "float16": Tolerance(atol=3e-2, rtol=3e-2),
    "bfloat16": Tolerance(atol=1.5e-1, rtol=1e-1),
    # nothing is fused in float64 (no kernel takes it), but such a graph is still validated as it is
    "float64": Tolerance(atol=1e-9, rtol=1e-9),
}


EXACT = Tolerance(atol=0.0, rtol=0.0)  # integer and boolean outputs


def tolerance_for(values, tol: Tolerance) -> Tolerance:
    """`tol` for floating-point values; EXACT for integers and booleans (token ids, masks)."""
    return EXACT if np.asarray(values).dtype.kind in "biu" else tol


def within(actual: np.ndarray, expected: np.ndarray, tol: Tolerance) -> np.ndarray:
    """Elementwise pass mask; NaN matches NaN and an infinity matches the same infinity."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    finite = np.isfinite(a) & np.isfinite(e)
    with np.errstate(invalid="ignore"):
        close = finite & (np.abs(a - e) <= tol.atol + tol.rtol * np.abs(e))
    same_special = (np.isnan(a) & np.isnan(e)) | (np.isinf(a) & (a == e))
    return close | same_special


def error_stats(actual: np.ndarray, expected: np.ndarray, tol: Tolerance) -> dict:
    """Per-output error statistics: max/mean/median abs and rel error and the pass verdict (held
    to EXACT where the values are integers or booleans)."""
    tol = tolerance_for(expected, tol)
    a = np.asarray(actual, dtype=np.float64).ravel()
    e = np.asarray(expected, dtype=np.float64).ravel()
    finite = np.isfinite(a) & np.isfinite(e)
    abs_err = np.abs(a[finite] - e[finite])
    sized = np.abs(e[finite]) >= max(tol.atol, 1e-12)  # where a relative error means something
    rel_err = abs_err[sized] / np.abs(e[finite][sized])
    mask = within(a, e, tol)
    pick = lambda f, v: float(f(v)) if v.size else 0.0  # noqa: E731
    return {
        "max_abs": pick(np.max, abs_err),
        "mean_abs": pick(np.mean, abs_err),
        "median_abs": pick(np.median, abs_err),
        "max_rel": pick(np.max, rel_err),
        "mean_rel": pick(np.mean, rel_err),
        "median_rel": pick(np.median, rel_err),
        "nan_mismatch": int(np.sum(np.isnan(a) != np.isnan(e))),
        "inf_mismatch": int(np.sum(np.isinf(a) != np.isinf(e))),
        "finite_compared": int(finite.sum()),
        "failed_fraction": float(1.0 - mask.mean()) if mask.size else 0.0,
        "atol": tol.atol,
        "rtol": tol.rtol,
        "passed": bool(mask.all()),
    }
