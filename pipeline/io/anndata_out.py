"""``adata.zarr`` next to ``factors.zarr`` for an AnnData input: the results where the
single-cell tools look for them.

The store holds the input's ``obs`` and ``var`` (copied element by element with their
encoding attributes; ``X`` and layers are not copied) and each method's factors in the
slots its :class:`~pipeline.methods.base.AnnDataSlots` names — for PCA ``obsm/X_pca``
(``U·diag(S)``), ``varm/PCs`` (``Vtᵀ``) and ``uns/pca/{variance, variance_ratio}``, as
``scanpy.pp.pca`` writes them; for NMF ``obsm/X_nmf`` (``W``) and ``varm/NMF_H``
(``Hᵀ``). It is written in Zarr v3 with AnnData's encoding attributes (on-disk format of
anndata ≥ 0.8), so ``anndata.read_zarr`` opens it and
``scanpy.pp.neighbors(adata, use_rep="X_pca")`` works unchanged. Row factors are copied
block by block from ``factors.zarr``: memory is bounded by blocks.
"""

from __future__ import annotations

import logging
from typing import Any

import dask.array as da
import numpy as np
import zarr

from pipeline.io.stores import Location

log = logging.getLogger(__name__)

ADATA = "adata.zarr"
COPY_ROWS = 1 << 20  # entries of an obs/var column copied at once
# AnnData's encoding attributes (its on-disk format spec), shared with the sparse generator
ANNDATA = {"encoding-type": "anndata", "encoding-version": "0.1.0"}
DICT = {"encoding-type": "dict", "encoding-version": "0.1.0"}
_ARRAY = {"encoding-type": "array", "encoding-version": "0.2.0"}


def anndata_root(where: Location) -> Any | None:
    """The input's AnnData root group when ``where`` (``input.url``) is one, else ``None``."""
    store = where.zarr_store(read_only=True)
    try:
        root = zarr.open_group(store=store, mode="r")
    except Exception:  # an array, or not a group: not AnnData
        return None
    return root if root.attrs.get("encoding-type") == "anndata" else None


def _copy_tree(src: Any, dst: Any) -> None:
    """Copy a group's attributes, arrays and subgroups (obs/var dataframes)."""
    dst.attrs.update(dict(src.attrs))
    for name, node in src.members():
        if isinstance(node, zarr.Group):
            _copy_tree(node, dst.create_group(name))
            continue
        out = dst.create_array(
            name,
            shape=node.shape,
            dtype=node.dtype,
            chunks=node.chunks,
            attributes=dict(node.attrs),
        )
        if node.ndim == 0:
            out[...] = node[...]
            continue
        for i in range(0, node.shape[0], COPY_ROWS):
            out[i : i + COPY_ROWS] = node[i : i + COPY_ROWS]


def _write_small(group: Any, name: str, values: np.ndarray) -> None:
    arr = group.create_array(name, shape=values.shape, dtype=values.dtype, attributes=_ARRAY)
    arr[...] = values


def _write_rows(group: Any, name: str, x: da.Array) -> Any:
    """A lazy store of a tall factor into ``group/name`` (AnnData array encoding)."""
    x = x.rechunk({0: x.chunks[0][0], 1: -1})
    arr = group.create_array(
        name, shape=x.shape, dtype=x.dtype, chunks=(x.chunks[0][0], x.shape[1]), attributes=_ARRAY
    )
    return da.store(x, arr, lock=False, compute=False)


def _spectrum(uns: Any, name: str, result: dict[str, Any]) -> None:
    """``uns/<name>/``: PCA's variances as scanpy stores them, or the singular values."""
    group = uns.create_group(name, attributes=DICT)
    if "explained_variance" in result:
        _write_small(group, "variance", np.asarray(result["explained_variance"]))
        _write_small(group, "variance_ratio", np.asarray(result["explained_variance_ratio"]))
    else:
        _write_small(group, "singular_values", np.asarray(result["singular_values"]))


def write_anndata(
    source: Any, factors: Any, target: Any, slots: dict[str, Any], results: dict[str, Any]
) -> None:
    """Write ``adata.zarr`` into the open group ``target``.

    Parameters
    ----------
    source : the input's AnnData root group
    factors : the staging ``factors.zarr`` group
    target : an empty Zarr group (v3) for ``adata.zarr``
    slots : ``{method: AnnDataSlots}`` for the methods that name slots
    results : ``{method: metrics}``
    """
    target.attrs.update(ANNDATA)
    for part in ("obs", "var"):
        _copy_tree(source[part], target.create_group(part))
    obsm, varm = (target.create_group(g, attributes=DICT) for g in ("obsm", "varm"))
    uns = target.create_group("uns", attributes=DICT)
    stores = []
    for method, slot in slots.items():
        group = factors[method]
        if slot.obsm in obsm or slot.varm in varm:
            log.warning("adata.zarr: obsm/%s already written; %s not added", slot.obsm, method)
            continue
        if "W" in group:  # NMF: A ≈ W H
            rows, cols = da.from_zarr(group["W"]), np.asarray(group["H"][...]).T
        elif "S" not in group:  # ALS: r ≈ U Vᵀ
            rows, cols = da.from_zarr(group["U"]), np.asarray(group["V"][...])
        else:
            s = np.asarray(group["S"][...])
            rows, cols = da.from_zarr(group["U"]) * s[None, :], np.asarray(group["Vt"][...]).T
        stores.append(_write_rows(obsm, slot.obsm, rows))
        _write_small(varm, slot.varm, np.ascontiguousarray(cols))
        if slot.uns:
            _spectrum(uns, slot.uns, results[method])
    da.compute(*stores)


def index_names(where: Location, part: str, positions: list[int]) -> list[str] | None:
    """The ids at ``positions`` of the ``obs`` (rows) or ``var`` (columns) index of the
    AnnData store at ``where``; ``None`` when it is not one or has no such index."""
    root = anndata_root(where)
    if root is None or part not in root:
        return None
    frame = root[part]
    index = frame.get(frame.attrs.get("_index", "_index"))
    if index is None or not positions:
        return None
    picked = index.get_orthogonal_selection(np.asarray(positions, dtype=np.int64))
    return [str(x) for x in picked]


def write_anndata_output(
    run_output: Any, source_at: Location, methods: dict[str, Any], results: dict[str, Any]
) -> bool:
    """``adata.zarr`` in the staging folder when the input is an AnnData store.

    ``methods`` maps method names to their :class:`~pipeline.methods.base.AnnDataSlots`
    (methods without slots are left out). Returns whether it was written.
    """
    source = anndata_root(source_at)
    if source is None or not methods:
        return False
    store = run_output.out.at(f"{run_output.staging.rstrip('/')}/{ADATA}").zarr_store(
        read_only=False
    )
    target = zarr.open_group(store=store, mode="w", zarr_format=3)
    write_anndata(source, run_output.group, target, methods, results)
    log.info("AnnData result with obs/var of %s written to %s", source_at.display, ADATA)
    return True
