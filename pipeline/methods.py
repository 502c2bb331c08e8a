"""One runner per method: factorize, write the factors, compute the metrics.

A runner joins :mod:`pipeline.linalg`, :mod:`pipeline.metrics` and the run's output
folder for one entry of ``methods:``. Factor writes and the metrics that read the same
blocks go into one ``dask.compute`` so the input is read once for both.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import dask
import dask.array as da
import numpy as np
from distributed import Client

from pipeline import metrics as mx
from pipeline.backend import to_host
from pipeline.cluster import keep_in_memory
from pipeline.config import MethodSpec, RSVDSpec, TSQRSpec
from pipeline.errors import InputError
from pipeline.io.artifacts import RunOutput
from pipeline.linalg import row_blocks, rsvd, tsqr
from pipeline.plots import spectrum_png

log = logging.getLogger(__name__)


def check_applicable(spec: MethodSpec, shape: tuple[int, int], index: int) -> None:
    """Refuse, before any compute, a method that cannot run on a matrix of ``shape``.

    Raises
    ------
    InputError
    """
    if isinstance(spec, RSVDSpec):
        _check_rsvd(spec, shape, index)
    if isinstance(spec, TSQRSpec):
        m, n = shape[::-1] if spec.transpose else shape
        if m < n:
            what = "its transpose" if spec.transpose else "the input"
            hint = (
                "set transpose: false"
                if spec.transpose
                else "set transpose: true to factorize the transpose"
            )
            raise InputError(
                f"methods[{index}]: tsqr needs a tall matrix (rows ≥ columns) but {what} "
                f"is {m} × {n}; {hint}"
            )


def _check_rsvd(spec: RSVDSpec, shape: tuple[int, int], index: int) -> None:
    m, n = shape
    if spec.rank > min(m, n):
        raise InputError(
            f"methods[{index}].rank: must be between 1 and {min(m, n)} (the smaller dimension "
            f"of the input, shape ({m}, {n})); got {spec.rank}"
        )


def run_tsqr(spec: TSQRSpec, a: da.Array, out: RunOutput, client: Client | None) -> dict[str, Any]:
    """TSQR runner: writes ``tsqr/R`` (and ``tsqr/Q``) and returns its metrics."""
    if spec.transpose:
        a = a.T
    t0 = time.perf_counter()
    a = row_blocks(a, spec.block_rows)
    persisted = False
    if spec.q:  # two passes: keep the input in memory when it fits
        a, persisted = keep_in_memory(a, client)
    log.info(
        "tsqr: %d × %d %s in %d row blocks; pass 1/%d computes R",
        *a.shape,
        a.dtype,
        a.numblocks[0],
        2 if spec.q else 1,
    )
    res = tsqr(a, compute_q=spec.q)
    log.info(
        "tsqr: R done in %.1f s (block paths: %s)",
        time.perf_counter() - t0,
        ", ".join(f"{k} {v}" for k, v in sorted(res.block_methods.items())),
    )
    out.factor_array("tsqr", "R", res.r, ("component", "col"))
    result: dict[str, Any] = {
        "fro_norm": res.fro_norm,
        "shape": list(a.shape),
        "transposed": spec.transpose,
        "blocks": a.numblocks[0],
        "block_methods": res.block_methods,
        "passes": 2 if spec.q else 1,
        "reads_from_storage": 1 if (persisted or not spec.q) else 2,
    }
    if spec.q:
        t1 = time.perf_counter()
        log.info("tsqr: pass 2/2 writes Q and computes residual and orthogonality")
        store = out.factor_array("tsqr", "Q", res.q, ("row", "component"))
        _, rsq, g = dask.compute(store, mx.residual_sq(res.a, res.q, res.r), mx.gram(res.q))
        log.info("tsqr: Q written in %.1f s", time.perf_counter() - t1)
        result["residual_rel"] = mx.relative(float(rsq), res.sumsq)
        result["orthogonality"] = mx.orthogonality_from_gram(g)
    else:
        # Without Q, ‖R‖_F = ‖A‖_F is the check that needs no extra pass.
        r_norm = float(np.linalg.norm(to_host(res.r).astype(np.float64)))
        result["residual_rel"] = None
        result["orthogonality"] = None
        result["norm_consistency"] = abs(r_norm - res.fro_norm) / res.fro_norm if res.sumsq else 0.0
    r_diag = np.abs(np.diagonal(to_host(res.r)).astype(np.float64))
    if r_diag.size and r_diag.max() > 0:
        result["r_diag_ratio"] = float(r_diag.min() / r_diag.max())
    result["seconds"] = time.perf_counter() - t0
    return result


def run_rsvd(spec: RSVDSpec, a: da.Array, out: RunOutput, client: Client | None) -> dict[str, Any]:
    """Randomized SVD / PCA runner: writes ``rsvd/U, S, Vt`` (``mean``) and a spectrum plot."""
    t0 = time.perf_counter()
    m, n = a.shape
    width = min(spec.rank + spec.oversample, m, n)
    a = row_blocks(a, spec.block_rows, min_rows=width)
    passes = 1 if spec.single_pass else 2 * spec.power_iters + 2
    persisted = False
    if passes > 1 or spec.measure_residual:
        a, persisted = keep_in_memory(a, client)
    log.info(
        "rsvd: rank %d (sketch %d) of %d × %d %s, %s; %d passes over the input",
        spec.rank,
        width,
        m,
        n,
        a.dtype,
        "single-pass sketch" if spec.single_pass else f"{spec.power_iters} power iterations",
        passes,
    )
    res = rsvd(
        a,
        spec.rank,
        oversample=spec.oversample,
        power_iters=spec.power_iters,
        center=spec.center,
        seed=spec.seed,
        single_pass=spec.single_pass,
    )
    log.info("rsvd: factors found in %.1f s; writing U and measuring", time.perf_counter() - t0)
    s, vt = res.s, res.vt
    out.factor_array("rsvd", "S", s, ("component",))
    out.factor_array("rsvd", "Vt", vt, ("component", "col"))
    if res.mean is not None:
        out.factor_array("rsvd", "mean", res.mean, ("col",))
    store = out.factor_array("rsvd", "U", res.u, ("row", "component"))
    _, g = dask.compute(store, mx.gram(res.u))

    sigma_sq = float(np.sum(s**2))
    eps = float(np.finfo(a.dtype).eps)
    formula = res.total_sumsq - sigma_sq if res.projection else None
    direct = spec.measure_residual or (
        spec.measure_residual is None
        and formula is not None
        and formula < 1e3 * eps * res.total_sumsq  # the difference has lost its digits
    )
    if direct:
        rsq = float(mx.residual_sq(res.a, res.u, s[:, None] * vt, res.mean).compute())
        passes += 1
    else:
        rsq = formula
    total = res.total_sumsq
    result: dict[str, Any] = {
        "rank": spec.rank,
        "sketch_width": width,
        "singular_values": s.tolist(),
        "residual_rel": None if rsq is None else mx.relative(rsq, total),
        "residual_method": "direct" if direct else ("formula" if rsq is not None else None),
        "orthogonality_u": mx.orthogonality_from_gram(g),
        "orthogonality_v": mx.orthogonality_from_gram(vt @ vt.T),
        "fro_norm": float(np.sqrt(res.input_sumsq)),
        "passes": passes,
        "reads_from_storage": 1 if persisted else passes,
        "single_pass": spec.single_pass,
    }
    ratio = s**2 / total if total > 0 else np.zeros_like(s)
    if spec.center:
        result["explained_variance"] = (s**2 / max(m - 1, 1)).tolist()
        result["explained_variance_ratio"] = ratio.tolist()
        result["total_variance"] = total / max(m - 1, 1)
    else:
        result["energy_retained"] = float(ratio.sum())
    out.write_bytes(
        "rsvd_spectrum.png",
        spectrum_png(s, ratio, "explained variance ratio" if spec.center else "energy retained"),
    )
    result["seconds"] = time.perf_counter() - t0
    return result


RUNNERS: dict[str, Callable[..., dict[str, Any]]] = {"tsqr": run_tsqr, "rsvd": run_rsvd}
