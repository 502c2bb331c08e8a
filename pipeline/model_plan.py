"""The plan of one model method (``compress``): the data the plan step makes and
``metrics.json`` records (:mod:`pipeline.plan` makes it, the method computes its layers).
Kept apart from :mod:`pipeline.plan` so that the method module can build it without
importing the lifecycle."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class LayerPlan:
    """One tensor a model method factorizes: the matrix it factors (a conv kernel
    ``(out, in, kh, kw)`` as ``out × in·kh·kw``), the rank when known before the run (a
    fixed rank; ``None``: chosen by a rule in its task or by the budget after the spectra
    pass), the solver when known, whether it runs as one task or distributed (too large
    for one task), and the bytes that task holds at once."""

    name: str
    shape: tuple[int, ...]  # as stored
    matrix: tuple[int, int]  # as factored
    dtype: str  # safetensors code
    rank: int | None
    solver: str  # svd, rsvd, or auto (decided from the rank in the task)
    distributed: bool
    task_bytes: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {**asdict(self), "shape": list(self.shape), "matrix": list(self.matrix)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerPlan:
        """The plan :meth:`to_dict` wrote."""
        return cls(**{**d, "shape": tuple(d["shape"]), "matrix": tuple(d["matrix"])})


@dataclass(frozen=True)
class KeptTensor:
    """A tensor a model method copies unchanged, and why."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {**asdict(self), "shape": list(self.shape)}


@dataclass(frozen=True)
class ModelMethodPlan:
    """What a model method (``compress``) will do: its layers, the tensors it keeps, its
    passes over the checkpoint (2 with a parameter budget: the spectra, then the factors)
    and the predicted peak per worker (``None``: workers not known before the run)."""

    method: str
    layers: tuple[LayerPlan, ...]
    kept: tuple[KeptTensor, ...]
    passes: int
    params_before: int
    budget: int | None  # parameters the factored layers may take (params_ratio)
    peak: int | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (``metrics.json``)."""
        return {
            **asdict(self),
            "layers": [layer.to_dict() for layer in self.layers],
            "kept": [k.to_dict() for k in self.kept],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelMethodPlan:
        """The plan :meth:`to_dict` wrote."""
        return cls(
            **{
                **d,
                "layers": tuple(LayerPlan.from_dict(x) for x in d["layers"]),
                "kept": tuple(KeptTensor(**{**k, "shape": tuple(k["shape"])}) for k in d["kept"]),
            }
        )
