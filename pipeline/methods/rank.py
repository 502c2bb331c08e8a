"""Rank chosen by the data: ``rank: {max: 200, energy: 0.95}`` and its kin, for the SVD-type
methods (``rsvd``, ``svd``).

One rule per job entry, evaluated on the singular values the method computed anyway (the
sketch at ``max + oversample`` for ``rsvd``, all of them for ``svd``) and the exact totals
of its first pass — zero extra passes:

- ``energy: e`` — the smallest ``k`` with ``Σ_{i≤k} σᵢ² ≥ e · total``, ``total`` being
  ``‖A‖²_F`` (``‖A − 1μᵀ‖²_F`` for PCA: then ``e`` is the explained variance ratio, as
  scikit-learn's float ``n_components``);
- ``rel_error: r`` — the smallest ``k`` with ``‖A (− 1μᵀ) − U_k S_k V_kᵀ‖_F ≤ r · ‖A‖_F``
  (the contract's ``residual_rel``, Heat's ``hsvd_rtol``);
- ``sv_ratio: q`` — every ``σᵢ ≥ σ₁ / q`` (kohya's ``sv_ratio`` for model compression).

When ``max`` is not enough the result has rank ``max`` and ``rank_rule_met: false``, with
a warning in the log and the report — never a silent truncation.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from pydantic import Discriminator, Field, Tag, model_validator

from pipeline.sections import StrictModel

log = logging.getLogger(__name__)

RULES = ("energy", "rel_error", "sv_ratio")


class RankRule(StrictModel):
    """``rank:`` as a rule: at most ``max`` components, as few as meet the one target."""

    max: int = Field(ge=1, description="the most components kept (the sketch is sized for it)")
    energy: float | None = Field(
        None, gt=0, le=1, description="share of ‖A‖² (of the centred total for PCA) to keep"
    )
    rel_error: float | None = Field(
        None, ge=0, lt=1, description="largest ‖A − U S Vᵀ‖_F / ‖A‖_F allowed"
    )
    sv_ratio: float | None = Field(None, ge=1, description="keep every σᵢ ≥ σ₁ / sv_ratio")

    @model_validator(mode="after")
    def _one_target(self) -> RankRule:
        given = [name for name in RULES if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(RULES)} next to max, got {given}")
        return self

    @property
    def target(self) -> dict[str, float]:
        """The rule as recorded in ``metrics.json`` (``rank_rule``), ``max`` included."""
        name = next(n for n in RULES if getattr(self, n) is not None)
        return {"max": self.max, name: getattr(self, name)}


def max_rank(rank: int | RankRule | None) -> int | None:
    """The number of components a spec computes: ``rank`` itself or the rule's ``max``."""
    return rank.max if isinstance(rank, RankRule) else rank


def choose_rank(
    rule: RankRule, s: Any, total_sumsq: float, input_sumsq: float, computed: Any = None
) -> tuple[int, bool]:
    """``(k, met)``: the rank ``rule`` picks from the singular values ``s`` (descending,
    at least ``rule.max`` of them where the matrix has that many).

    ``total_sumsq`` is ``Σ`` of all ``σ²`` (``‖A‖²``, or ``‖A − 1μᵀ‖²`` for PCA) and
    ``input_sumsq`` is ``‖A‖²`` (``rel_error`` is relative to ``‖A‖``, like
    ``residual_rel``). ``computed`` (default ``s``) may hold singular values beyond ``max``
    (the sketch's oversampling): ``sv_ratio`` looks at the next one to tell whether ``max``
    sufficed.
    """
    import numpy as np

    s = np.asarray(s, dtype=np.float64)
    beyond = np.asarray(s if computed is None else computed, dtype=np.float64)
    kept = s[: rule.max]
    if rule.sv_ratio is not None:
        floor = kept[0] / rule.sv_ratio
        k = int(np.sum(kept >= floor))
        return max(k, 1), bool(k < rule.max or len(beyond) <= rule.max or beyond[rule.max] < floor)
    cum = np.cumsum(kept**2)
    if rule.energy is not None:
        ok = cum >= rule.energy * total_sumsq
    else:
        ok = total_sumsq - cum <= rule.rel_error**2 * input_sumsq
    if not ok.any():
        return len(kept), False
    return int(np.argmax(ok)) + 1, True


def apply_rule(
    method: str, rule: RankRule, s: Any, total_sumsq: float, input_sumsq: float
) -> tuple[int, dict[str, Any]]:
    """The rank ``rule`` chooses (see :func:`choose_rank`) and its metrics (``rank``,
    ``rank_rule``, ``rank_rule_met``); a warning in the log when ``max`` is not enough."""
    k, met = choose_rank(rule, s, total_sumsq, input_sumsq)
    if not met:
        log.warning(
            "%s: rank rule %s not met with max %d components; the result has rank %d",
            method,
            rule.target,
            rule.max,
            k,
        )
    return k, {"rank": k, "rank_rule": rule.target, "rank_rule_met": met}


def _rank_kind(value: Any) -> str:
    return "rank-rule" if isinstance(value, dict | RankRule) else "rank-number"


# ``rank:`` of the SVD-type methods: a number or a rule. Tagged, so a bad value reports the
# errors of the branch it meant (a mapping: the rule's fields), not of both.
Rank = Annotated[
    Annotated[int, Field(ge=1), Tag("rank-number")] | Annotated[RankRule, Tag("rank-rule")],
    Discriminator(_rank_kind),
]
UNION_TAGS = frozenset({"rank-number", "rank-rule"})  # left out of error paths
