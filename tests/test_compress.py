"""``method: compress`` end to end: checkpoints written by the real ``safetensors`` package,
jobs run by ``run_job`` on a LocalCluster, results read back by ``safetensors`` and by our
loader, every figure checked against numpy's optimal truncated SVD on the same matrix.

Fast tier (``client``: threads in this process); the CLI, process-cluster and S3 cases are
at the end, marked e2e through their fixtures.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import safetensors
from safetensors.numpy import load_file

from pipeline.errors import InputError
from tests.conftest import job_dict, one_line_exit, write_job

RNG = np.random.default_rng(22)
DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def save(path: Path, tensors: dict[str, np.ndarray], code: str = "F32") -> Path:
    """A checkpoint written by safetensors; float tensors in ``code`` (BF16: the float32
    values rounded by truncation of their low 16 bits, given to safetensors as raw bits)."""
    keep = {}
    for name, x in tensors.items():
        if code == "BF16" and x.dtype.kind == "f":
            keep[name] = (np.ascontiguousarray(x, "<f4").view("<u2")[..., 1::2].copy(), "bfloat16")
        elif x.dtype.kind == "f":
            keep[name] = (np.ascontiguousarray(x, DTYPES[code]), DTYPES[code])
        else:
            keep[name] = (np.ascontiguousarray(x), {"i": "int64"}[x.dtype.kind])
    specs = {
        name: safetensors.TensorSpec(
            dtype=dt, shape=list(tensors[name].shape), data_ptr=u.ctypes.data, data_len=u.nbytes
        )
        for name, (u, dt) in keep.items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.serialize_file(specs, str(path), metadata={"format": "pt"})
    return path


def raw_tensors(path: Path) -> dict[str, dict]:
    """``{name: {dtype, shape, data}}`` as the safetensors package reads the file (its
    numpy loader has no bfloat16)."""
    return dict(safetensors.deserialize(path.read_bytes()))


def as_stored(x: np.ndarray, code: str) -> np.ndarray:
    """``x`` as ``save`` stores it, in float64."""
    if code == "BF16":
        bits = np.ascontiguousarray(x, "<f4").view("<u4") & 0xFFFF0000
        return bits.view("<f4").astype(np.float64)
    return x.astype(DTYPES[code]).astype(np.float64)


def decaying(m: int, n: int, tau: float, seed: int, noise: float = 0.0) -> np.ndarray:
    """``m × n`` with singular values ``exp(−i/τ)`` (and a little noise)."""
    rng = np.random.default_rng(seed)
    k = min(m, n)
    u, _ = np.linalg.qr(rng.standard_normal((m, k)))
    v, _ = np.linalg.qr(rng.standard_normal((n, k)))
    x = (u * np.exp(-np.arange(k) / tau)) @ v.T
    return x + noise * rng.standard_normal((m, n)) / np.sqrt(m * n)


def low_rank(m: int, n: int, r: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((m, r)) @ rng.standard_normal((r, n)) / np.sqrt(r)


def optimal(w: np.ndarray, k: int) -> float:
    """Eckart–Young: the best rank-``k`` relative Frobenius error."""
    s = np.linalg.svd(w, compute_uv=False)
    return float(np.sqrt(np.sum(s[k:] ** 2) / np.sum(s**2)))


def run(tmp_path: Path, url: Path | str, client, name: str = "c", **method) -> dict:
    from pipeline import run_job

    job = job_dict(tmp_path, str(url), name=name, methods=[{"method": "compress", **method}])
    return run_job(job, client=client)["methods"]["compress"]


def layers_of(metrics: dict) -> dict[str, dict]:
    return {r["name"]: r for r in metrics["layers"]}


# --------------------------------------------------------------------------- exact recovery


@pytest.mark.parametrize("code", ["F32", "F16", "BF16"])
def test_exact_rank_is_recovered_and_everything_else_kept_as_it_was(tmp_path, client, code):
    from pipeline.io.safetensors import load_compressed

    tensors = {
        "embed.weight": low_rank(300, 64, 4, 1),
        "block.0.attn.weight": low_rank(96, 80, 4, 2),
        "block.0.attn.bias": RNG.standard_normal(96),
        "block.0.conv.weight": low_rank(48, 4 * 9, 4, 3).reshape(48, 4, 3, 3),
        "block.0.norm.weight": RNG.standard_normal((8, 8)),  # too small to gain at rank 4
        "position_ids": np.arange(12, dtype=np.int64).reshape(1, 12),
    }
    src = save(tmp_path / "model.safetensors", tensors, code)
    m = run(tmp_path, src, client, rank=4, conv="reshape")
    out = tmp_path / "out" / "c" / "compressed.safetensors"
    stored = raw_tensors(out)  # safetensors reads what we wrote
    original = raw_tensors(src)
    factored = ["embed.weight", "block.0.attn.weight", "block.0.conv.weight"]
    assert sorted(layers_of(m)) == sorted(factored)
    kept = {k["name"]: k["reason"] for k in m["kept"]}
    assert set(kept) == {"block.0.attn.bias", "block.0.norm.weight", "position_ids"}
    assert "rank 4 saves nothing here" in kept["block.0.norm.weight"]
    for name in kept:  # kept tensors: same name, dtype, shape and bytes
        assert stored[name] == original[name]
    for name in factored:  # factors in the layer's dtype
        assert stored[f"{name}.lowrank_B"]["dtype"] == code
    dense = load_compressed(str(out))
    pairs = load_compressed(str(out), dense=False)
    tol = {"F32": 1e-6, "F16": 2e-3, "BF16": 1.5e-2}[code]
    for name in factored:
        w = as_stored(tensors[name], code)
        b, a = pairs[name]
        assert b.shape == (w.shape[0], 4) and a.shape == (4, int(np.prod(w.shape[1:])))
        assert dense[name].shape == w.shape
        err = np.linalg.norm(w - dense[name].astype(np.float64)) / np.linalg.norm(w)
        assert err < tol, (name, err)
        assert layers_of(m)[name]["rel_error"] == pytest.approx(err, rel=1e-3, abs=1e-7)
    meta = json.loads(safetensors.safe_open(str(out), "numpy").metadata()["zarr_factorize"])
    assert meta["ranks"] == dict.fromkeys(factored, 4)
    assert m["params_after"] < m["params_before"]
    assert m["params_ratio"] == pytest.approx(m["params_after"] / m["params_before"])
    total_after = sum(int(np.prod(x["shape"])) for x in stored.values())
    assert total_after == m["params_after"]  # the file holds exactly what metrics count


# --------------------------------------------------------------------------- references


SPECTRA = [  # (shape, tau, noise): layers of an LLM-like checkpoint, tall, wide, square
    ((200, 120), 6.0, 0.01),
    ((90, 240), 15.0, 0.0),
    ((160, 160), 40.0, 0.02),
]


def spectra_checkpoint(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    tensors = {
        f"layers.{i}.weight": decaying(*shape, tau, seed=i, noise=noise)
        for i, (shape, tau, noise) in enumerate(SPECTRA)
    }
    return save(tmp_path / "ckpt" / "model.safetensors", tensors, "F64"), tensors


@pytest.mark.parametrize("solver,bound", [("svd", 1 + 1e-6), ("rsvd", 1.01)])
def test_errors_are_numpys_optimal_truncation(tmp_path, client, solver, bound):
    src, tensors = spectra_checkpoint(tmp_path)
    m = run(tmp_path, src.parent, client, rank=12, solver=solver)
    for name, w in tensors.items():
        r = layers_of(m)[name]
        best = optimal(w, 12)
        assert r["solver"] == solver and r["rank"] == 12
        assert best * (1 - 1e-6) <= r["rel_error"] <= bound * best, (name, r["rel_error"], best)
        s = np.linalg.svd(w, compute_uv=False)
        kept = np.sum(s[:12] ** 2) / np.sum(s**2)
        assert r["energy_retained"] == pytest.approx(kept, rel=1e-6 if solver == "svd" else 1e-3)


@pytest.mark.parametrize("rule", [{"energy": 0.9}, {"rel_error": 0.2}])
def test_rules_give_the_smallest_qualifying_rank_per_layer(tmp_path, client, rule):
    src, tensors = spectra_checkpoint(tmp_path)
    m = run(tmp_path, src, client, rank=rule)
    for name, w in tensors.items():
        s = np.linalg.svd(w, compute_uv=False)
        share = np.cumsum(s**2) / np.sum(s**2)
        ok = share >= rule["energy"] if "energy" in rule else 1 - share <= rule["rel_error"] ** 2
        want = int(np.argmax(ok)) + 1
        r = layers_of(m)[name]
        assert r["rank"] == want, (name, r["rank"], want)
        assert r["rule_met"]
    assert not m["warnings"]


def test_a_rule_not_met_at_its_max_is_a_warning(tmp_path, client, caplog):
    src, _ = spectra_checkpoint(tmp_path)
    m = run(tmp_path, src, client, rank={"energy": 0.999, "max": 3})
    assert all(r["rank"] == 3 and not r["rule_met"] for r in m["layers"])
    assert len(m["warnings"]) == 3 and "not met" in m["warnings"][0]
    assert "not met" in caplog.text
    report = (tmp_path / "out" / "c" / "report.md").read_text()
    assert "**Warning**: layer layers.0.weight: the rank rule" in report


# --------------------------------------------------------------------------- budget


def test_global_budget_is_met_and_beats_equal_ranks(tmp_path, client):
    src, tensors = spectra_checkpoint(tmp_path)
    ratio = 0.35
    budget = run(tmp_path, src, client, name="budget", rank={"params_ratio": ratio})
    assert budget["params_ratio"] <= ratio and budget["passes"] == 2
    total = sum(w.size for w in tensors.values())
    # equal ranks with the same parameter count at most
    r = int(ratio * total // sum(sum(w.shape) for w in tensors.values()))
    equal = run(tmp_path, src, client, name="equal", rank=r)
    assert equal["params_after"] <= ratio * total
    ranks = sorted(x["rank"] for x in budget["layers"])
    assert len(set(ranks)) > 1  # different spectra, different ranks

    def kept_energy(m):
        return sum(x["energy_retained"] for x in m["layers"])

    assert kept_energy(budget) > kept_energy(equal) + 0.01, (
        kept_energy(budget),
        kept_energy(equal),
    )


def test_a_budget_below_rank_one_everywhere_is_refused(tmp_path, client):
    src, _ = spectra_checkpoint(tmp_path)
    with pytest.raises(InputError, match=r"params_ratio: 0\.001 cannot be met"):
        run(tmp_path, src, client, rank={"params_ratio": 0.001})
    assert not (tmp_path / "out" / "c").exists()


# --------------------------------------------------------------------------- modes


def test_delta_mode_writes_a_peft_adapter_reproducing_the_finetuned_weights(tmp_path, client):
    base = {
        "model.layers.0.q_proj.weight": RNG.standard_normal((64, 48)),
        "model.layers.0.v_proj.weight": RNG.standard_normal((64, 48)),
        "model.norm.weight": RNG.standard_normal(64),
    }
    tuned = dict(base)
    tuned["model.layers.0.q_proj.weight"] = base["model.layers.0.q_proj.weight"] + low_rank(
        64, 48, 3, 5
    )
    tuned["model.layers.0.v_proj.weight"] = (
        base["model.layers.0.v_proj.weight"] + low_rank(64, 48, 6, 6) + 1e-3 * RNG.random((64, 48))
    )
    b_path = save(tmp_path / "base.safetensors", base)
    t_path = save(tmp_path / "tuned.safetensors", tuned)
    m = run(
        tmp_path,
        t_path,
        client,
        rank={"rel_error": 0.01},
        include=["*_proj.weight"],
        base=str(b_path),
    )
    folder = tmp_path / "out" / "c" / "adapter"
    config = json.loads((folder / "adapter_config.json").read_text())
    weights = load_file(str(folder / "adapter_model.safetensors"))
    assert config["peft_type"] == "LORA"
    assert set(config["target_modules"]) == {"model.layers.0.q_proj", "model.layers.0.v_proj"}
    ranks = {**dict.fromkeys(config["target_modules"], config["r"]), **config["rank_pattern"]}
    alphas = {**dict.fromkeys(config["target_modules"], config["lora_alpha"])}
    alphas.update(config["alpha_pattern"])
    assert ranks["model.layers.0.q_proj"] == 3 and ranks["model.layers.0.v_proj"] >= 6
    for module in config["target_modules"]:
        a = weights[f"base_model.model.{module}.lora_A.weight"].astype(np.float64)
        b = weights[f"base_model.model.{module}.lora_B.weight"].astype(np.float64)
        r = ranks[module]
        assert a.shape == (r, 48) and b.shape == (64, r)
        name = f"{module}.weight"
        w_base, w_tuned = as_stored(base[name], "F32"), as_stored(tuned[name], "F32")
        rebuilt = w_base + (alphas[module] / r) * b @ a
        delta = w_tuned - w_base
        err = np.linalg.norm(w_tuned - rebuilt) / np.linalg.norm(delta)
        assert err == pytest.approx(layers_of(m)[name]["rel_error"], rel=1e-3, abs=1e-7)
        assert err <= 0.01
    assert not (tmp_path / "out" / "c" / "compressed.safetensors").exists()


def test_whitened_mode_lowers_the_activation_weighted_error(tmp_path, client):
    """Inputs with a few strong directions: factoring W·S keeps what the layer does to
    them, so ‖(W − BA)S‖/‖WS‖ is lower than plain SVD's at the same rank."""
    n_in, n_out, tokens = 64, 48, 2000
    mix = RNG.standard_normal((n_in, n_in)) * np.exp(-np.arange(n_in) / 6.0)[None, :]
    x = RNG.standard_normal((tokens, n_in)) @ mix.T  # correlated activations
    w = RNG.standard_normal((n_out, n_in))
    src = save(tmp_path / "model.safetensors", {"lin.weight": w})
    grams = save(tmp_path / "grams.safetensors", {"lin.weight": x.T @ x}, "F64")
    plain = run(tmp_path, src, client, name="plain", rank=8)
    white = run(tmp_path, src, client, name="white", rank=8, whiten={"grams": str(grams)})
    w32 = as_stored(w, "F32")

    def weighted(name: str) -> float:
        from pipeline.io.safetensors import load_compressed

        approx = load_compressed(str(tmp_path / "out" / name / "compressed.safetensors"))
        approx = approx["lin.weight"].astype(np.float64)
        return np.linalg.norm((w32 - approx) @ x.T) / np.linalg.norm(w32 @ x.T)

    assert white["mode"] == "whitened"
    assert weighted("white") < 0.7 * weighted("plain"), (weighted("white"), weighted("plain"))
    assert layers_of(white)["lin.weight"]["weighted_rel_error"] == pytest.approx(
        weighted("white"), rel=0.02
    )
    # the plain error of the whitened factors is larger: it optimises another norm
    assert layers_of(white)["lin.weight"]["rel_error"] > layers_of(plain)["lin.weight"]["rel_error"]


def test_skip_if_complete_notices_a_changed_checkpoint_or_base(tmp_path, client):
    import os

    from pipeline import run_job

    base = save(tmp_path / "base.safetensors", {"w.weight": low_rank(40, 30, 3, 1)})
    tuned = save(tmp_path / "tuned.safetensors", {"w.weight": low_rank(40, 30, 3, 2)})
    method = {"method": "compress", "rank": 3, "base": str(base)}
    job = job_dict(tmp_path, str(tuned), methods=[method], skip_if_complete=True)
    job["output"]["overwrite"] = True
    assert not run_job(job, client=client).get("skipped")
    assert run_job(job, client=client).get("skipped")
    stamp = os.stat(base).st_mtime_ns
    save(base, {"w.weight": low_rank(40, 30, 3, 3)})
    os.utime(base, ns=(stamp + 10**9, stamp + 10**9))
    assert not run_job(job, client=client).get("skipped")  # the base changed
    save(tuned, {"w.weight": low_rank(40, 30, 3, 4)})
    os.utime(tuned, ns=(stamp + 2 * 10**9, stamp + 2 * 10**9))
    assert not run_job(job, client=client).get("skipped")  # the checkpoint changed


# --------------------------------------------------------------------------- layouts


def test_sharded_input_and_sharded_output(tmp_path, client):
    from pipeline.io.safetensors import load_compressed

    tensors = {f"h.{i}.weight": low_rank(128, 96, 5, i) for i in range(4)}
    folder = tmp_path / "sharded"
    weight_map = {}
    for i, name in enumerate(tensors):
        shard = f"model-0000{i // 2 + 1}-of-00002.safetensors"
        weight_map[name] = shard
        if i % 2 == 0:
            save(folder / shard, {n: tensors[n] for n in list(tensors)[i : i + 2]})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map})
    )
    m = run(tmp_path, folder, client, rank=5, max_shard_bytes=2**20)
    out = tmp_path / "out" / "c"
    assert len(m["layers"]) == 4
    # 4 × 5 × (128 + 96) × 4 bytes ≈ 18 KiB: one shard under the limit
    assert (out / "compressed.safetensors").exists()
    dense = load_compressed(str(out / "compressed.safetensors"))
    for name, x in tensors.items():
        np.testing.assert_allclose(dense[name], x, atol=1e-5 * np.abs(x).max())


def test_output_is_sharded_above_the_limit(tmp_path, client):
    from pipeline.io.safetensors import load_compressed

    tensors = {f"h.{i}.weight": low_rank(2000, 1500, 40, i) for i in range(3)}
    src = save(tmp_path / "model.safetensors", tensors)
    run(tmp_path, src, client, rank=40, max_shard_bytes=2**20)  # ≈ 547 KiB per layer
    out = tmp_path / "out" / "c"
    index = json.loads((out / "compressed.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and all((out / s).exists() for s in shards)
    assert not (out / "compressed.safetensors").exists()
    assert set(index["weight_map"]) == {f"h.{i}.weight.lowrank_{x}" for i in range(3) for x in "AB"}
    dense = load_compressed(str(out / "compressed.safetensors.index.json"))
    for name, x in tensors.items():
        np.testing.assert_allclose(dense[name], x, atol=1e-4 * np.abs(x).max())


def test_a_layer_too_large_for_one_task_is_factored_distributed(tmp_path, client):
    src, tensors = spectra_checkpoint(tmp_path)
    m = run(tmp_path, src, client, rank=12, task_bytes=1)
    for name, w in tensors.items():
        r = layers_of(m)[name]
        assert r["solver"] == "rsvd-distributed"
        assert r["rel_error"] <= 1.01 * optimal(w, 12)
    plan = json.loads((tmp_path / "out" / "c" / "metrics.json").read_text())["plan"]
    assert all(layer["distributed"] for layer in plan["methods"][0]["layers"])


def test_a_budget_over_distributed_layers_spreads_the_same_ranks(tmp_path, client):
    src, _ = spectra_checkpoint(tmp_path)
    one_task = run(tmp_path, src, client, name="one", rank={"params_ratio": 0.35})
    spread = run(tmp_path, src, client, name="spread", rank={"params_ratio": 0.35}, task_bytes=1)
    assert all(r["solver"] == "rsvd-distributed" for r in spread["layers"])
    assert [r["rank"] for r in spread["layers"]] == [r["rank"] for r in one_task["layers"]]
    assert spread["params_ratio"] <= 0.35


# --------------------------------------------------------------------------- refusals


def test_config_refusals_of_model_jobs():
    from pipeline.config import parse_config
    from pipeline.errors import ConfigError

    base = {"name": "x", "input": {"url": "m.safetensors"}}
    compress = {"method": "compress", "rank": 4}
    cases = [
        ({"methods": [compress, {"method": "tsqr"}]}, "list it alone in its job"),
        ({"methods": [compress], "compute": {"backend": "cupy"}}, "remove compute.backend"),
        ({"methods": [compress], "input": {"url": "m", "array": "X"}}, "remove input.array"),
        (
            {
                "methods": [{"method": "tsqr"}],
                "input": {
                    "url": "m",
                    "create_if_missing": {"kind": "transformer", "shape": [2, 8]},
                },
            },
            "writes a model checkpoint",
        ),
        ({"methods": [{**compress, "base": "b", "rank": {"params_ratio": 0.5}}]}, "a LoRA adapter"),
    ]
    for over, message in cases:
        with pytest.raises(ConfigError, match=message) as err:
            parse_config({**base, **over}, source="x.yaml")
        assert "\n" not in str(err.value)


def test_refusals_are_one_line_and_leave_nothing(tmp_path, client):
    src, _ = spectra_checkpoint(tmp_path)
    other = save(tmp_path / "other.safetensors", {"layers.0.weight": np.ones((10, 10))})
    cases = [
        ({"rank": 4, "include": ["decoder.*"]}, r"include: 'decoder\.\*' matches no tensor"),
        ({"rank": 4, "base": str(other)}, r"base: tensor 'layers\.0\.weight' has shape \[10, 10\]"),
        (
            {"rank": 4, "whiten": {"grams": str(other)}},
            r"whiten\.grams: the Gram of 'layers\.0\.weight' has shape \[10, 10\]",
        ),
        ({"rank": 4, "exclude": ["*"]}, r"no tensor .* to factor"),
    ]
    for method, message in cases:
        with pytest.raises(InputError, match=message) as err:
            run(tmp_path, src, client, **method)
        assert "\n" not in str(err.value)
    with pytest.raises(InputError, match=r"input\.url: .*missing\.safetensors.* does not exist"):
        run(tmp_path, tmp_path / "missing.safetensors", client, rank=4)
    assert not (tmp_path / "out" / "c").exists()


# --------------------------------------------------------------------------- end to end


def test_validate_plan_run_and_bad_checkpoints_through_the_cli(tmp_path, cli):
    src, _ = spectra_checkpoint(tmp_path)
    job = job_dict(tmp_path, str(src), name="cli", methods=[{"method": "compress", "rank": 8}])
    job["cluster"] = {"kind": "local", "n_workers": 2, "threads_per_worker": 1}
    path = write_job(tmp_path, job)
    out = cli("validate", "--plan", path)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    lines = out.stdout.splitlines()
    assert "safetensors checkpoint, 3 tensors (3 F64), 71,200 parameters" in lines[0]
    assert "compress: 3 layers factored (71,200 of 71,200 parameters)" in out.stdout
    assert "    layers.0.weight: 200×120 F64, rank 8, rsvd, one task" in out.stdout
    done = cli("run", path)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((tmp_path / "out" / "cli" / "metrics.json").read_text())
    from pipeline.plan import ModelJobPlan, format_plan, plan_job

    recorded = ModelJobPlan.from_dict(metrics["plan"])
    from pipeline.config import load_config

    planned = plan_job(load_config(path))
    assert recorded.methods == planned.methods  # the same layers, kept tensors, passes
    assert format_plan(recorded)[2:] == format_plan(planned)[2:]
    assert (tmp_path / "out" / "cli" / "report.md").read_text().count("| `layers.") == 3

    truncated = tmp_path / "bad" / "model.safetensors"
    truncated.parent.mkdir()
    truncated.write_bytes(src.read_bytes()[:1000])
    bf = tmp_path / "ints.safetensors"
    save(bf, {"ids": np.arange(20, dtype=np.int64).reshape(4, 5)})
    cases = [
        (str(tmp_path / "nope.safetensors"), {"rank": 4}, "does not exist"),
        (str(truncated), {"rank": 4}, "input.url"),
        (str(bf), {"rank": 4}, "no tensor"),
        (str(src), {"rank": 4, "include": ["x.*"]}, "matches no tensor"),
        (str(src), {"rank": 4, "base": str(bf)}, "methods[0].base"),
        (str(src), {"rank": {"energy": 0.9, "params_ratio": 0.5}}, "exactly one of"),
    ]
    for i, (url, method, message) in enumerate(cases):
        bad = job_dict(tmp_path, url, name=f"bad{i}", methods=[{"method": "compress", **method}])
        # run refuses through the same precheck as validate: twice is enough to show it
        for command in ("validate", "run") if i < 2 else ("validate",):
            proc = cli(command, write_job(tmp_path, bad, f"bad{i}.yaml"))
            line = one_line_exit(proc)
            assert message in line, (command, line)
        assert not (tmp_path / "out" / f"bad{i}").exists()


def test_a_checkpoint_on_s3_is_read_by_ranges_and_compressed_to_s3(tmp_path, s3, client):
    from pipeline import run_job
    from pipeline.io.safetensors import load_compressed

    src, tensors = spectra_checkpoint(tmp_path)
    bucket = s3.make_bucket("compress-ckpt")
    fs = s3.filesystem()
    fs.put(str(src), f"{bucket}/model/model.safetensors")
    opts = s3.storage_options()
    job = {
        "name": "s3c",
        "input": {"url": f"{bucket}/model", "storage_options": opts},
        "output": {"url": f"{bucket}/out", "storage_options": opts},
        "methods": [{"method": "compress", "rank": 12}],
    }
    m = run_job(job, client=client)["methods"]["compress"]
    for name, w in tensors.items():
        assert layers_of(m)[name]["rel_error"] <= 1.01 * optimal(w, 12)
    dense = load_compressed(f"{bucket}/out/s3c/compressed.safetensors", opts)
    for name, w in tensors.items():
        err = np.linalg.norm(w - dense[name]) / np.linalg.norm(w)
        assert err == pytest.approx(layers_of(m)[name]["rel_error"], rel=1e-6)
    text = json.dumps(json.loads(fs.cat(f"{bucket}/out/s3c/metrics.json")))
    assert s3.storage_options()["secret"] not in text
