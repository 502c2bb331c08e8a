"""The example jobs in configs/ that use small packaged data run end to end."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from tests.conftest import REPO


def _localised(name: str, tmp_path, client) -> dict:
    job = yaml.safe_load((REPO / "configs" / name).read_text())
    job["input"]["url"] = str(tmp_path / "in.zarr")
    job["output"]["url"] = str(tmp_path / "out")
    job["cluster"] = {"kind": "address", "address": client.scheduler.address}
    return job


def test_image_compression_example(tmp_path, client):
    from pipeline import run_job

    report = run_job(_localised("image-compression.yaml", tmp_path, client), client=client)
    r = report["methods"]["rsvd"]
    assert report["input"]["shape"] == [427, 640]
    from sklearn.datasets import load_sample_image

    grey = load_sample_image("china.jpg").astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    s = np.linalg.svd(grey, compute_uv=False)
    # A photo's spectrum decays slowly: the leading values are exact, the tail within 3 %.
    np.testing.assert_allclose(r["singular_values"][:10], s[:10], rtol=1e-5)
    np.testing.assert_allclose(r["singular_values"], s[:40], rtol=3e-2)
    assert r["energy_retained"] == pytest.approx(np.sum(s[:40] ** 2) / np.sum(s**2), rel=1e-3)
    optimal = np.sqrt(np.sum(s[40:] ** 2) / np.sum(s**2))
    assert optimal <= r["residual_rel"] <= 1.01 * optimal


def test_digits_nmf_example(tmp_path, client):
    from pipeline import run_job

    report = run_job(_localised("digits-nmf.yaml", tmp_path, client), client=client)
    r = report["methods"]["nmf"]
    assert report["input"]["shape"] == [1797, 64]
    assert r["residual_rel"] < 0.3 and r["history"] == sorted(r["history"], reverse=True)


@pytest.mark.parametrize("kind", ["digits", "sample-image"])
def test_packaged_kinds_refuse_a_shape(kind):
    from pipeline.config import SyntheticSpec

    with pytest.raises(ValueError, match="fixed shape"):
        SyntheticSpec(kind=kind, shape=(3, 3))


def test_exact_pca_example_equals_sklearn(tmp_path, client):
    from sklearn.datasets import load_digits
    from sklearn.decomposition import PCA

    from pipeline import run_job

    report = run_job(_localised("exact-pca-digits.yaml", tmp_path, client), client=client)
    r = report["methods"]["svd"]
    pca = PCA(n_components=10, svd_solver="full").fit(load_digits().data)
    np.testing.assert_allclose(
        r["explained_variance_ratio"], pca.explained_variance_ratio_, rtol=1e-10
    )
    np.testing.assert_allclose(r["singular_values"], pca.singular_values_, rtol=1e-10)
    assert r["orthogonality_u"] < 1e-13
    tail = PCA(svd_solver="full").fit(load_digits().data).explained_variance_ratio_[10:].sum()
    assert r["residual_rel_centered"] == pytest.approx(np.sqrt(tail), rel=1e-8)


@pytest.mark.parametrize("name", ["cells-pca.yaml", "counts-nmf.yaml"])
def test_sparse_examples_generate_and_factorize_their_input(tmp_path, client, name):
    """The sparse examples at a reduced shape: the input is generated (an AnnData store for
    cells-pca, a bare CSR group for counts-nmf) and factorized without densifying."""
    import anndata as ad

    from pipeline import run_job

    job = _localised(name, tmp_path, client)
    job["input"]["create_if_missing"]["shape"] = [2000, 300]
    job["methods"][0]["rank"] = 5
    report = run_job(job, client=client)
    assert report["input"]["format"] == "csr" and 0.01 < report["input"]["density"] < 0.06
    adata = tmp_path / "out" / job["name"] / "adata.zarr"
    assert adata.exists() == (name == "cells-pca.yaml")
    if adata.exists():
        out = ad.read_zarr(adata)
        assert out.obsm["X_pca"].shape == (2000, 5) and out.obs_names[0] == "cell_0"


def test_compress_llm_example_makes_its_checkpoint_and_meets_its_budget(tmp_path, client):
    """configs/compress-llm.yaml: the synthetic decoder is written on first run (then reused),
    its projections factored within the budget, embeddings and norms kept."""
    from pipeline import run_job
    from pipeline.datasets import transformer_tensors

    job = _localised("compress-llm.yaml", tmp_path, client)
    job["input"]["url"] = str(tmp_path / "tiny-llm.safetensors")
    r = run_job(job, client=client)["methods"]["compress"]
    names = dict(transformer_tensors(4, 256))
    assert r["params_before"] == sum(int(np.prod(s)) for s in names.values())
    assert r["params_ratio"] <= 0.6 and r["passes"] == 2
    assert {x["name"] for x in r["layers"]} == {n for n in names if "_proj" in n}
    # attention spectra decay faster: the budget gives them lower ranks than the MLP's
    rank = {x["name"]: x["rank"] for x in r["layers"]}
    assert (
        rank["model.layers.0.self_attn.q_proj.weight"] < rank["model.layers.0.mlp.up_proj.weight"]
    )
    job["name"] = "again"  # the checkpoint exists now: read, not written again
    stamp = (tmp_path / "tiny-llm.safetensors").stat().st_mtime_ns
    run_job(job, client=client)
    assert (tmp_path / "tiny-llm.safetensors").stat().st_mtime_ns == stamp


def test_ratings_als_example_reaches_near_the_noise_floor(tmp_path, client):
    """configs/ratings-als.yaml as shipped (it generates a 20,000 × 5,000 log of ~1 M
    ratings): validation RMSE within 20 % of the generator's noise (the best any model can
    do; users with few ratings keep it above), far below the global mean's, and each
    user's top items unseen."""
    import anndata as ad
    import zarr

    from pipeline import run_job

    job = _localised("ratings-als.yaml", tmp_path, client)
    r = run_job(job, client=client)["methods"]["als"]
    store = ad.read_zarr(tmp_path / "in.zarr")
    noise = store.uns["synthetic"]["noise_rmse"]
    assert r["converged"] and r["validation_rmse"] < 1.2 * noise
    x = store.X.tocsr()
    spread = np.sqrt(np.mean((x.data - x.data.mean()) ** 2))  # the global mean's RMSE
    assert r["validation_rmse"] < 0.75 * spread
    top = zarr.open_group(str(tmp_path / "out" / "ratings-als" / "factors.zarr"))["als/top_items"]
    first = top[:200]
    for user, items in enumerate(first):
        assert not x[user, items].nnz
