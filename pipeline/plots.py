"""Small PNG plots written next to metrics.json (matplotlib, headless), and their
shrinking to a byte budget for reports that carry them inline."""

from __future__ import annotations

import io
from typing import Any

import numpy as np


def spectrum_png(singular_values: np.ndarray, total_sumsq: float, centred: bool) -> bytes:
    """Singular values (log scale) and the cumulative share of ``total_sumsq`` they hold:
    explained variance when ``centred``, energy otherwise."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sv = np.asarray(singular_values, dtype=np.float64)
    ratio = sv**2 / total_sumsq if total_sumsq > 0 else np.zeros_like(sv)
    ratio_label = "explained variance ratio" if centred else "energy retained"
    k = np.arange(1, len(sv) + 1)
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4), constrained_layout=True)
    left.semilogy(k, sv, "o-", ms=3)
    left.set(xlabel="component", ylabel="singular value", title="Spectrum")
    left.grid(True, which="both", alpha=0.3)
    right.plot(k, np.cumsum(ratio), "o-", ms=3, color="tab:green")
    right.set(
        xlabel="components kept",
        ylabel=f"cumulative {ratio_label}",
        ylim=(0, 1.02),
        title=f"Cumulative {ratio_label}",
    )
    right.grid(True, alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def convergence_png(history: list[float], solver: str) -> bytes:
    """Relative error per iteration (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.4), constrained_layout=True)
    ax.semilogy(np.arange(1, len(history) + 1), history, "-", color="tab:purple")
    ax.set(xlabel="iteration", ylabel="‖A − WH‖ / ‖A‖", title=f"NMF ({solver}) convergence")
    ax.grid(True, which="both", alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def compress_png(layers: list[dict[str, Any]]) -> bytes:
    """Per layer: relative error against the share of its parameters kept (one point per
    layer, dense layers at 1), and the histogram of the ranks chosen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    share = [r["params_after"] / r["params_before"] for r in layers]
    error = [max(r["rel_error"], 1e-16) for r in layers]
    ranks = [r["rank"] for r in layers if r["rank"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4), constrained_layout=True)
    left.scatter(share, error, s=12)
    left.set_yscale("log")
    left.set(
        xlabel="parameters kept (share of the layer)",
        ylabel="‖W − BA‖ / ‖W‖",
        title="Error against parameters, per layer",
    )
    left.grid(True, which="both", alpha=0.3)
    right.hist(ranks or [0], bins=min(30, max(len(set(ranks)), 1)), color="tab:green")
    right.set(xlabel="rank", ylabel="layers", title="Ranks chosen")
    right.grid(True, alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


# Plots shrink by this factor per side at each step of :func:`fit_png`.
SHRINK_STEP = 0.75


def _palette_png(image: Any, scale: float) -> bytes:
    """``image`` scaled by ``scale`` per side, quantized to 256 colours, as PNG bytes."""
    from PIL import Image

    if scale < 1.0:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    image.quantize(colors=256).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def fit_png(png: bytes, max_bytes: int) -> bytes:
    """``png`` itself when it has at most ``max_bytes``, else a smaller PNG of it.

    First quantized to a 256-colour palette (plots have few colours: this alone usually
    divides the size by 2–4), then scaled down by :data:`SHRINK_STEP` per side until it
    fits. The floor is a 1 × 1 image (under 100 bytes), so every allowed budget is met.

    Parameters
    ----------
    png : PNG bytes (a plot from this module)
    max_bytes : the largest size the result may have

    Returns
    -------
    PNG bytes of at most ``max_bytes``.

    Raises
    ------
    ValueError
        ``max_bytes`` is below 1 KiB (no plot would be readable).
    """
    if max_bytes < 1024:
        raise ValueError(f"max_bytes must be at least 1024, got {max_bytes}")
    if len(png) <= max_bytes:
        return png
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")  # plots have an opaque background
    scale = 1.0
    smaller = _palette_png(image, scale)
    while len(smaller) > max_bytes and min(image.width, image.height) * scale > 1:
        scale *= SHRINK_STEP
        smaller = _palette_png(image, scale)
    return smaller


def als_png(history: list[dict[str, float]], implicit: bool) -> bytes:
    """ALS per iteration: train and validation RMSE (explicit ratings), or the weighted
    objective (implicit feedback, log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    it = np.arange(1, len(history) + 1)
    fig, ax = plt.subplots(figsize=(5.5, 3.4), constrained_layout=True)
    if implicit:
        ax.semilogy(it, [h["objective"] for h in history], "-", color="tab:purple")
        ax.set(ylabel="weighted objective", title="ALS (implicit feedback) convergence")
    else:
        for key, color in (("train_rmse", "tab:blue"), ("validation_rmse", "tab:orange")):
            values = [h[key] for h in history if key in h]
            if values:
                ax.plot(it[: len(values)], values, "o-", ms=3, color=color, label=key)
        ax.set(ylabel="RMSE", title="ALS (explicit ratings) convergence")
        ax.legend()
    ax.set(xlabel="iteration")
    ax.grid(True, which="both", alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
