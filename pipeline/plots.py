"""Small PNG plots written next to metrics.json (matplotlib, headless)."""

from __future__ import annotations

import io

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
