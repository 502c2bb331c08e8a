"""Ratings input: ``factorize import-ratings`` (CSV and Parquet logs → an AnnData-layout CSR
store) and ``generate --kind ratings|clicks`` (synthetic logs with their true factors).

The import is compared exactly with a pandas reference (groupby per policy, then pivot),
with tiny read chunks, scan reads and user blocks so every boundary is crossed; malformed
logs must exit 2 with one line naming the file and the line an editor shows.
"""

from __future__ import annotations

import logging
import os
import signal

import numpy as np
import pytest

from tests.conftest import one_line_exit

# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module", autouse=True)
def _imported():
    """anndata (h5py asks ``uname -p`` once, a process) imported before the fast tier's
    no-process guard of each test."""
    import anndata  # noqa: F401
    import pyarrow.parquet  # noqa: F401


@pytest.fixture
def factorize(capfd, monkeypatch):
    """``pipeline.cli.main`` in this process (``--log-level WARNING``): ``(exit code,
    stdout, stderr)``; what ``main`` changes for its process (fd 2, the root logger, the
    SIGTERM handler, two variables) is put back after each call."""
    from pipeline import cli

    for var in ("DASK_LOGGING__DISTRIBUTED", "DASK_LOGGING__BOKEH"):
        monkeypatch.setenv(var, os.environ.get(var, "warning"))
    root = logging.getLogger()

    def call(*args):
        handlers, level = root.handlers[:], root.level
        sigterm = signal.getsignal(signal.SIGTERM)
        capfd.readouterr()
        fd2 = os.dup(2)
        try:
            code = cli.main(["--log-level", "WARNING", *map(str, args)])
        finally:
            os.dup2(fd2, 2)
            os.close(fd2)
            if cli._verdict is not None:
                cli._verdict.close()
                cli._verdict = None
            root.handlers[:] = handlers
            root.setLevel(level)
            signal.signal(signal.SIGTERM, sigterm)
        out, err = capfd.readouterr()
        return code, out, err

    return call


def error_line(result, code=2) -> str:
    """The one stderr line of a refused call."""
    got, out, err = result
    assert got == code, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out + err, err
    return lines[0]


@pytest.fixture
def small(monkeypatch):
    """Read 37 lines a chunk, scan 64 bytes a read, sort 50 ratings a user block."""
    from pipeline import ratings_import

    monkeypatch.setattr(ratings_import, "READ_ROWS", 37)
    monkeypatch.setattr(ratings_import, "SCAN_BYTES", 64)
    monkeypatch.setattr(ratings_import, "BLOCK_ENTRIES", 50)


def random_log(seed, users, items, lines, with_rating=True):
    """A MovieLens-layout log: many repeated (user, item) pairs, timestamps, half stars."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "userId": rng.choice(np.array(users, dtype=object), lines),
            "movieId": rng.choice(np.array(items, dtype=object), lines),
            "rating": rng.integers(1, 11, lines) / 2,
            "timestamp": 964982703 + np.arange(lines),
        }
    )
    return frame if with_rating else frame.drop(columns="rating")


def in_order(ids):
    """Rows' (columns') order: numeric when every id is an integer, else by string."""
    ids = sorted(set(map(str, ids)))
    return sorted(ids, key=int) if all(i.lstrip("-").isdigit() for i in ids) else ids


def reference(frame, policy, value="rating"):
    """The expected matrix, dense, NaN where nothing is stored."""
    frame = frame.astype({"userId": str, "movieId": str})
    if value not in frame:
        frame = frame.assign(**{value: 1.0})
    grouped = frame.groupby(["userId", "movieId"], sort=False)[value]
    agg = getattr(grouped, policy)()  # last: the last in file order
    dense = agg.unstack()
    return dense.reindex(index=in_order(frame.userId), columns=in_order(frame.movieId)).astype(
        float
    )


def stored(path):
    """The store read by anndata: (its matrix, dense, NaN where nothing is stored; adata)."""
    import anndata

    adata = anndata.read_zarr(str(path))
    x = adata.X.tocoo()
    dense = np.full(adata.shape, np.nan, dtype=adata.X.dtype)
    dense[x.row, x.col] = x.data
    return dense, adata


# --------------------------------------------------------------------------- import-ratings

USERS_STR = ["alice", "bob", "Carol", "u10", "u9", "zed", "émile", "x y"]
USERS_INT = [str(i) for i in (3, 1, 10, 2, 100, 27, 9, 11)]
ITEMS_INT = [str(i) for i in (1, 2, 10, 31, 1029, 7, 99, 100, 5, 4, 3, 12)]
ITEMS_STR = ["tt01", "tt10", "tt2", "A", "b", "Zz", "m_7", "m_70"]

IMPORTS = [
    # name, users, items, --duplicates (None: the default, last), --dtype
    ("string users, integer items, default last", USERS_STR, ITEMS_INT, None, "float64"),
    ("integer users, string items, sum", USERS_INT, ITEMS_STR, "sum", "float64"),
    ("mean in float32", USERS_STR, ITEMS_STR, "mean", "float32"),
    ("last in float32", USERS_INT, ITEMS_INT, "last", "float32"),
]


@pytest.mark.parametrize(
    "users, items, policy, dtype", [c[1:] for c in IMPORTS], ids=[c[0] for c in IMPORTS]
)
def test_import_matches_a_pandas_pivot(factorize, small, tmp_path, users, items, policy, dtype):
    log = random_log(7, users, items, 400)
    source = tmp_path / "ratings.csv"
    log.to_csv(source, index=False)
    out = tmp_path / "r.zarr"
    args = ["import-ratings", source, "--out", out, "--dtype", dtype]
    code, text, err = factorize(*args, *(["--duplicates", policy] if policy else []))
    assert code == 0, err
    expected = reference(log, policy or "last")
    got, adata = stored(out)
    assert list(adata.obs_names) == list(expected.index)
    assert list(adata.var_names) == list(expected.columns)
    np.testing.assert_array_equal(got, expected.to_numpy(dtype=dtype))
    assert adata.X.dtype == np.dtype(dtype) and adata.X.has_canonical_format
    dropped = len(log) - int(np.isfinite(got).sum())
    assert dropped > 0  # the log has repeats
    assert text.strip().splitlines()[-1] == (
        f"wrote {out}: {len(users)} users × {len(items)} items, {len(log) - dropped} ratings "
        f"from {len(log)} lines ({dropped} duplicates resolved: {policy or 'last'}), "
        f"density {(len(log) - dropped) / (len(users) * len(items)):.3g}"
    )
    meta = adata.uns["ratings_import"]
    assert meta["duplicates"] == (policy or "last") and meta["duplicates_resolved"] == dropped
    assert meta["lines"] == len(log) and meta["rating_column"] == "rating"


def test_without_a_rating_each_line_counts_one(factorize, small, tmp_path):
    log = random_log(3, USERS_INT, ITEMS_INT, 300, with_rating=False)
    source = tmp_path / "clicks.csv"
    log.to_csv(source, index=False)
    assert factorize("import-ratings", source, "--out", tmp_path / "a.zarr")[0] == 0
    got, adata = stored(tmp_path / "a.zarr")
    np.testing.assert_array_equal(got, reference(log, "sum").to_numpy(np.float32))
    assert got[np.isfinite(got)].max() > 1  # repeats were counted
    assert adata.uns["ratings_import"]["rating_column"] == ""
    # --no-rating ignores a rating column; --duplicates still applies
    rated = random_log(3, USERS_INT, ITEMS_INT, 300)
    rated.to_csv(source, index=False)
    args = ["--out", tmp_path / "b.zarr", "--no-rating", "--duplicates", "last"]
    assert factorize("import-ratings", source, *args)[0] == 0
    got, _ = stored(tmp_path / "b.zarr")
    assert set(np.unique(got[np.isfinite(got)])) == {1.0}


def test_other_columns_separator_and_compression(factorize, tmp_path):
    log = random_log(5, USERS_STR, ITEMS_STR, 120).rename(
        columns={"userId": "user", "movieId": "item", "rating": "stars"}
    )
    source = tmp_path / "log.tsv.gz"
    log.to_csv(source, sep="\t", index=False)
    args = ["--user", "user", "--item", "item", "--rating", "stars", "--duplicates", "mean"]
    code, _, err = factorize("import-ratings", source, "--out", tmp_path / "t.zarr", *args)
    assert code == 0, err
    expected = reference(
        log.rename(columns={"user": "userId", "item": "movieId"}), "mean", value="stars"
    )
    np.testing.assert_array_equal(stored(tmp_path / "t.zarr")[0], expected.to_numpy(np.float32))


def test_parquet_input_equals_the_csv_one(factorize, small, tmp_path):
    log = random_log(11, [int(u) for u in USERS_INT], ITEMS_STR, 250)
    log.to_csv(tmp_path / "r.csv", index=False)
    log.to_parquet(tmp_path / "r.parquet", row_group_size=60)
    for name in ("r.csv", "r.parquet"):
        code, _, err = factorize(
            "import-ratings", tmp_path / name, "--out", tmp_path / f"{name}.zarr"
        )
        assert code == 0, err
    csv_x, csv_a = stored(tmp_path / "r.csv.zarr")
    pq_x, pq_a = stored(tmp_path / "r.parquet.zarr")
    np.testing.assert_array_equal(csv_x, pq_x)
    assert list(pq_a.obs_names) == list(csv_a.obs_names) == in_order(USERS_INT)
    assert list(pq_a.var_names) == list(csv_a.var_names)
    log.loc[130, "movieId"] = None  # a null id: row 131 of the file
    log.to_parquet(tmp_path / "null.parquet", row_group_size=60)
    line = error_line(
        factorize("import-ratings", tmp_path / "null.parquet", "--out", tmp_path / "n.zarr")
    )
    assert (
        line
        == f"factorize: error: {tmp_path / 'null.parquet'}: row 131: empty item id (column movieId)"
    )


HEADER = "userId,movieId,rating,timestamp"
GOOD = [f"{u},{i},{(u + i) % 9 / 2 + 1},97898{u}" for u in range(1, 9) for i in range(1, 4)]

MALFORMED = [
    # name, lines after the header (a None marks where GOOD continues), the line, message
    ("a field too many", ["1,31,2.5,1,9"], "5 fields, expected 4 as in the header"),
    ("a field missing", ["1,31,2.5"], "3 fields, expected 4 as in the header"),
    ("one field", ["garbage"], "1 field, expected 4 as in the header"),
    ("rating not a number", ["1,31,abc,1"], "rating 'abc' is not a number (column rating)"),
    ("NaN rating", ["1,31,NaN,1"], "rating is NaN (column rating)"),
    ("infinite rating", ["1,31,inf,1"], "rating 'inf' is not finite (column rating)"),
    ("empty rating", ["1,31,,1"], "empty rating (column rating)"),
    ("empty user id", [",31,4,1"], "empty user id (column userId)"),
    ("blank item id", ["1, ,4,1"], "empty item id (column movieId)"),
    ("empty line", [""], "empty line (only the end of the file may have them)"),
]


@pytest.mark.parametrize("bad, message", [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
@pytest.mark.parametrize("where", [3, 20])
def test_a_malformed_line_is_named(factorize, small, tmp_path, bad, message, where):
    """Exit 2, one line naming the file and the line (1-based, the header is line 1), in
    the first read chunk or a later one; nothing written."""
    lines = [HEADER, *GOOD[: where - 2], *bad, *GOOD[where - 2 :]]
    source = tmp_path / "ml.csv"
    source.write_text("\n".join(lines) + "\n")
    line = error_line(factorize("import-ratings", source, "--out", tmp_path / "o.zarr"))
    assert line == f"factorize: error: {source}: line {where}: {message}"
    assert not (tmp_path / "o.zarr").exists() and os.listdir(tmp_path) == ["ml.csv"]


def test_line_numbers_with_quotes_and_the_first_error_wins(factorize, small, tmp_path):
    source = tmp_path / "q.csv"
    quoted = [HEADER, '1,"a,b",4,1', '2,"two', 'lines",3,1', "3,c,4,1"]
    cases = [
        (["4,d,abc,1"], "line 6: rating 'abc' is not a number (column rating)"),
        (["4,d,4"], "line 6: 3 fields, expected 4 as in the header"),
        (["4,d,4,1", "", "5,e,4,1"], "line 7: empty line (only the end of the file may have them)"),
        (["4,d,,1", "5,e,4"], "line 6: empty rating (column rating)"),  # before the field count
    ]
    for tail, message in cases:
        source.write_text("\n".join(quoted + tail) + "\n")
        line = error_line(factorize("import-ratings", source, "--out", tmp_path / "o.zarr"))
        assert line == f"factorize: error: {source}: {message}"
    plain = tmp_path / "p.csv"  # the same without quotes: the numpy scan
    plain.write_text("\n".join([HEADER, *GOOD[:5], "1,2,3", "1,2,x,4"]) + "\n")
    line = error_line(factorize("import-ratings", plain, "--out", tmp_path / "o.zarr"))
    assert line.endswith("p.csv: line 7: 3 fields, expected 4 as in the header")
    source.write_text("\n".join(quoted) + "\n\n\r\n")  # trailing empty lines are fine
    assert factorize("import-ratings", source, "--out", tmp_path / "o.zarr")[0] == 0
    _, adata = stored(tmp_path / "o.zarr")
    assert list(adata.var_names) == ["a,b", "c", "two\nlines"]


def test_bad_options_and_logs(factorize, tmp_path):
    good = tmp_path / "g.csv"
    good.write_text("\n".join([HEADER, *GOOD]) + "\n")
    (tmp_path / "header.csv").write_text(HEADER + "\n")
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "afile").write_text("not a store")
    out = str(tmp_path / "o.zarr")
    cases = [
        (
            ["--user", "uid"],
            f"{good}: no column 'uid' (columns: userId, movieId, rating, "
            "timestamp); name it with --user",
        ),
        (["--item", "title"], f"{good}: no column 'title'"),
        (["--rating", "score"], f"{good}: no column 'score'"),
        (["--item", "userId"], "--user and --item name the same column 'userId'"),
        (["--sep", "::"], "--sep: one character, got '::'"),
    ]
    for extra, needle in cases:
        line = error_line(factorize("import-ratings", good, "--out", out, *extra))
        assert line.startswith(f"factorize: error: {needle}"), line
    for name, needle in [
        ("header.csv", "no ratings (only a header)"),
        ("empty.csv", "empty file (no header line)"),
        ("missing.csv", "no such file"),
    ]:
        line = error_line(factorize("import-ratings", tmp_path / name, "--out", out))
        assert line == f"factorize: error: {tmp_path / name}: {needle}"
    line = error_line(factorize("import-ratings", good, "--out", "memory://r.zarr"))
    assert "--out: import-ratings writes a local path" in line
    line = error_line(factorize("import-ratings", good, "--out", tmp_path / "afile", "--overwrite"))
    assert line.endswith("afile exists and is not a Zarr store; it is not replaced")
    assert not os.path.exists(out)


def test_an_existing_store_is_kept_unless_overwrite(factorize, tmp_path):
    source = tmp_path / "g.csv"
    source.write_text("\n".join([HEADER, *GOOD]) + "\n")
    out = tmp_path / "o.zarr"
    assert factorize("import-ratings", source, "--out", out)[0] == 0
    line = error_line(factorize("import-ratings", source, "--out", out, "--no-rating"))
    assert line == f"factorize: error: --out: {out} exists; pass --overwrite to replace it"
    assert stored(out)[1].uns["ratings_import"]["rating_column"] == "rating"
    assert factorize("import-ratings", source, "--out", out, "--no-rating", "--overwrite")[0] == 0
    assert stored(out)[1].uns["ratings_import"]["rating_column"] == ""
    assert sorted(os.listdir(tmp_path)) == ["g.csv", "o.zarr"]  # nothing left aside


def test_the_command_says_one_line_without_traceback(cli, tmp_path):
    """As users run it: a malformed line → exit 2, exactly one stderr line; a good log →
    exit 0 and the summary."""
    source = tmp_path / "ml.csv"
    source.write_text("\n".join([HEADER, *GOOD[:4], "2,5,four,1", *GOOD[4:]]) + "\n")
    proc = cli("import-ratings", source, "--out", tmp_path / "o.zarr")
    line = one_line_exit(proc)
    assert (
        line == f"factorize: error: {source}: line 6: rating 'four' is not a number (column rating)"
    )
    assert not (tmp_path / "o.zarr").exists()


# --------------------------------------------------------------------------- generate


def test_successive_sampling_law_in_rounds_and_in_the_fallback(monkeypatch):
    """Two of three items ∝ (0.5, 0.3, 0.2) without replacement: P({1, 2}) =
    0.3·0.2/0.7 + 0.2·0.3/0.8 = 0.1607, by the rounds and by the exact fallback alone."""
    from pipeline import rating_datasets as rd

    p = np.array([0.5, 0.3, 0.2])
    rows = 40_000
    for rounds in (rd.SAMPLE_ROUNDS, 0):
        monkeypatch.setattr(rd, "SAMPLE_ROUNDS", rounds)
        counts = np.full(rows, 2)
        counts[:100] = [0, 1, 3, 3] * 25
        r, c = rd.sample_without_replacement(np.random.default_rng(0), counts, p, np.cumsum(p))
        assert np.array_equal(np.bincount(r, minlength=rows), counts)
        assert len(set(zip(r.tolist(), c.tolist(), strict=True))) == r.size  # distinct
        lacks_0 = np.bincount(r[c == 0], minlength=rows)[100:] == 0
        assert abs(lacks_0.mean() - (0.06 / 0.7 + 0.06 / 0.8)) < 0.006, (rounds, lacks_0.mean())


def test_generate_ratings(factorize, tmp_path):
    """Density within 20 % of asked, popular items hold far more than their share, the
    stored ratings are the kept model plus noise, the same seed gives the same store."""
    m, n, density = 2000, 600, 0.04
    args = ["--kind", "ratings", "--shape", m, n, "--density", density, "--rank", 4]
    code, out, err = factorize("generate", tmp_path / "a.zarr", *args, "--seed", 3)
    assert code == 0, err
    assert out.strip() == f"wrote ratings float64 matrix to {tmp_path / 'a.zarr'}"
    dense, adata = stored(tmp_path / "a.zarr")
    x, truth = adata.X, adata.uns["synthetic"]
    assert list(adata.obs_names[:2]) == ["user_0", "user_1"] and adata.var_names[-1] == "item_599"
    assert abs(x.nnz / (m * n) / density - 1) < 0.2
    per_item = np.sort(np.bincount(x.indices, minlength=n))[::-1]
    assert per_item[: n // 100].sum() / x.nnz > 0.05  # top 1 % of items: > 5× their share
    per_user = np.diff(x.indptr)
    assert per_user.max() > 10 * np.median(per_user)  # heavy users
    assert set(np.unique(x.data)) <= set(np.arange(1.0, 5.01, 0.5))
    u, v = adata.obsm["true_U"], adata.varm["true_V"]
    assert u.shape == (m, 4) and v.shape == (n, 4) and truth["rank"] == 4
    coo = x.tocoo()
    model = truth["global_mean"] + truth["user_bias"][coo.row] + truth["item_bias"][coo.col]
    model += np.einsum("ij,ij->i", u[coo.row], v[coo.col])
    rmse = np.sqrt(np.mean((coo.data - model) ** 2))
    assert rmse == pytest.approx(truth["noise_rmse"], rel=1e-12)
    assert truth["noise_sigma"] == 0.5 and 0.45 < rmse < 0.55  # σ and half-star rounding
    assert np.corrcoef(coo.data, model)[0, 1] > 0.7
    assert factorize("generate", tmp_path / "b.zarr", *args, "--seed", 3)[0] == 0
    np.testing.assert_array_equal(stored(tmp_path / "b.zarr")[0], dense)
    assert factorize("generate", tmp_path / "c.zarr", *args, "--seed", 4)[0] == 0
    other = stored(tmp_path / "c.zarr")[0]
    assert not np.array_equal(np.isnan(other), np.isnan(dense))


def test_generate_clicks(tmp_path):
    """Positive integer counts at about the asked density, their total and their mean
    where stored as the kept Poisson rates say."""
    import anndata

    from pipeline.datasets import write_synthetic
    from pipeline.sections import SyntheticSpec

    m, n = 1500, 500
    spec = SyntheticSpec(kind="clicks", shape=(m, n), density=0.03, seed=2, dtype="float32")
    write_synthetic(str(tmp_path / "c.zarr"), spec, array="X")
    adata = anndata.read_zarr(str(tmp_path / "c.zarr"))
    x, truth = adata.X, adata.uns["synthetic"]
    assert x.dtype == np.float32 and truth["kind"] == "clicks" and truth["rank"] == 10
    assert abs(x.nnz / (m * n) / 0.03 - 1) < 0.2
    assert (x.data >= 1).all() and (x.data == np.round(x.data)).all() and x.data.max() > 1
    rates = truth["scale"] * np.outer(truth["user_activity"], truth["item_popularity"])
    rates *= adata.obsm["true_U"] @ adata.varm["true_V"].T
    assert x.sum() == pytest.approx(rates.sum(), rel=0.03)
    coo = x.tocoo()
    lam = rates[coo.row, coo.col]
    assert coo.data.mean() == pytest.approx(np.mean(lam / -np.expm1(-lam)), rel=0.05)
    per_item = np.sort(np.bincount(x.indices, minlength=n))[::-1]
    assert per_item[: n // 100].sum() / x.nnz > 0.05


def test_ratings_kinds_in_the_config_and_on_object_stores(factorize, tmp_path):
    from pipeline.datasets import write_synthetic
    from pipeline.errors import InputError
    from pipeline.io.preflight import check_input_creatable
    from pipeline.sections import SPARSE_KINDS, InputSpec, SyntheticSpec

    line = error_line(factorize("generate", tmp_path / "g.zarr", "--shape", 5, 5, "--rank", 2))
    assert "rank is used by kinds ratings and clicks only (kind is 'gaussian')" in line
    spec = SyntheticSpec(kind="ratings", shape=(40, 30), density=0.2)
    assert spec.rank is None and spec.kind in SPARSE_KINDS  # plans wait for the store
    with pytest.raises(InputError, match="'ratings' is written to local paths only"):
        write_synthetic("memory://r.zarr", spec)
    huge = {"kind": "ratings", "shape": [1_000_000, 1_000_000], "density": 1e-5}
    check_input_creatable(InputSpec(url=str(tmp_path / "h.zarr"), create_if_missing=huge))
    assert not (tmp_path / "h.zarr").exists()  # 4 TB dense, ~0.3 GB as CSR with factors
