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
from pipeline.checkpoints import Checkpoints
from pipeline.cluster import keep_in_memory
from pipeline.config import MethodSpec, NMFSpec, RSVDSpec, TSQRSpec
from pipeline.errors import InputError
from pipeline.io.artifacts import RunOutput
from pipeline.linalg import NMFState, nmf, row_blocks, rsvd, rsvd_passes, tsqr
from pipeline.linalg.tsqr import UNOPTIMIZED
from pipeline.plots import convergence_png, spectrum_png

log = logging.getLogger(__name__)


def check_applicable(spec: MethodSpec, shape: tuple[int, int], index: int) -> None:
    """Refuse, before any compute, a method that cannot run on a matrix of ``shape``.

    Raises
    ------
    InputError
    """
    if isinstance(spec, RSVDSpec):
        _check_rsvd(spec, shape, index)
    if isinstance(spec, NMFSpec):
        _check_nmf(spec, shape, index)
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
        _, rsq, g = dask.compute(
            store, mx.residual_sq(res.a, res.q, res.r), mx.gram(res.q), **UNOPTIMIZED
        )
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
    passes = rsvd_passes(spec.power_iters, spec.single_pass)
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
        rsq = float(mx.residual_sq(res.a, res.u, s[:, None] * vt, res.mean).compute(**UNOPTIMIZED))
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


INIT_POWER_ITERS = 1


def _check_nmf(spec: NMFSpec, shape: tuple[int, int], index: int) -> None:
    m, n = shape
    if spec.rank > min(m, n):
        raise InputError(
            f"methods[{index}].rank: must be between 1 and {min(m, n)} (the smaller dimension "
            f"of the input, shape ({m}, {n})); got {spec.rank}"
        )


def _svd_for_init(a: da.Array, rank: int, seed: int) -> tuple[da.Array, np.ndarray, np.ndarray]:
    # NNDSVD needs only the dominant directions: one power iteration (2 passes) suffices.
    res = rsvd(a, rank, seed=seed, power_iters=INIT_POWER_ITERS)
    return res.u, res.s, res.vt


def run_nmf(spec: NMFSpec, a: da.Array, out: RunOutput, client: Client | None) -> dict[str, Any]:
    """NMF runner: writes ``nmf/W``, ``nmf/H``, a convergence plot; checkpoints as it goes."""
    t0 = time.perf_counter()
    m, n = a.shape
    a = row_blocks(a, spec.block_rows, min_rows=min(spec.rank + 10, m, n))
    a, persisted = keep_in_memory(a, client)
    checkpoints = Checkpoints(out.spec, out.name)
    state = None
    if spec.resume and checkpoints.exists():
        state = checkpoints.load(spec, a)
        log.info("nmf: resuming from the checkpoint at iteration %d", state.iteration)
    elif spec.resume:
        log.warning("nmf: resume: true but no checkpoint was found; starting from the beginning")
    log.info(
        "nmf: rank %d of %d × %d %s, solver %s, init %s, up to %d iterations",
        spec.rank,
        m,
        n,
        a.dtype,
        spec.solver,
        spec.init,
        spec.max_iter,
    )
    clock = {"checkpoint": time.perf_counter(), "log": time.perf_counter()}

    def on_iteration(st: NMFState, w: da.Array) -> None:
        now = time.perf_counter()
        if now - clock["log"] >= 5 or st.iteration == 1:
            log.info("nmf: iteration %d, relative error %.6f", st.iteration, st.history[-1])
            clock["log"] = now
        every = spec.checkpoint_every
        due = st.iteration % every == 0 if every else now - clock["checkpoint"] >= 60
        if due and not st.converged and st.iteration < spec.max_iter:
            checkpoints.save(st, w, spec, a)
            clock["checkpoint"] = time.perf_counter()

    start_iteration = state.iteration if state else 0
    res = nmf(
        a,
        spec.rank,
        solver=spec.solver,
        init=spec.init,
        max_iter=spec.max_iter,
        tol=spec.tol,
        seed=spec.seed,
        state=state,
        svd=_svd_for_init,
        on_iteration=on_iteration,
        inner_sweeps=spec.inner_sweeps,
    )
    if not res.converged:
        log.warning(
            "nmf: not converged after %d iterations (tol %g); raise max_iter or tol",
            res.iterations,
            spec.tol,
        )
    out.factor_array("nmf", "H", res.h.astype(a.dtype), ("component", "col"))
    store = out.factor_array("nmf", "W", res.w, ("row", "component"))
    if persisted:  # the input is in memory: measure the residual directly, for free
        _, rsq = dask.compute(store, mx.residual_sq(res.a, res.w, res.h))
        residual, method = mx.relative(float(rsq), res.sumsq), "direct"
    else:
        dask.compute(store)
        residual, method = res.history[-1] if res.history else None, "objective"
    out.write_bytes("nmf_convergence.png", convergence_png(res.history, spec.solver))
    init_passes = 0 if state is not None or spec.init == "random" else rsvd_passes(INIT_POWER_ITERS)
    passes = 1 + init_passes + (res.iterations - start_iteration)
    return {
        "rank": spec.rank,
        "solver": spec.solver,
        "init": spec.init,
        "residual_rel": residual,
        "residual_method": method,
        "iterations": res.iterations,
        "converged": res.converged,
        "history": res.history,
        "resumed_from": start_iteration or None,
        "fro_norm": float(np.sqrt(res.sumsq)),
        "passes": passes,
        "reads_from_storage": 1 if persisted else passes,
        "seconds": time.perf_counter() - t0,
    }


RUNNERS: dict[str, Callable[..., dict[str, Any]]] = {
    "tsqr": run_tsqr,
    "rsvd": run_rsvd,
    "nmf": run_nmf,
}
