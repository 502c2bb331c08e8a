"""What ``validate`` can know it refuses: bounds on the job file, on every number, and on
where the run will write (pipeline/io/preflight.py). The CLI rows are in test_cli's
``_bad_cases``; here are the generic rules, the read-only output and the YAML bomb's
time and memory."""

from __future__ import annotations

import os
import resource
import subprocess
import time
import typing
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import (
    YAML_MAX_VALUES,
    ClusterSpec,
    InputSpec,
    SyntheticSpec,
    config_from_any,
    load_config,
    parse_config,
)
from pipeline.errors import ConfigError, InputError
from pipeline.io.stores import location_of
from pipeline.methods import METHODS
from tests.conftest import factorize_cmd, job_dict, one_line_exit, write_array, write_job


def alias_bomb_yaml(input_url: str, levels: int = 9) -> str:
    """A job whose ``storage_options`` hold 9 levels of 9 aliases: 9⁹ ≈ 387 million
    strings once expanded, a few hundred bytes as text."""
    rows = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        rows.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]")
    options = "\n".join(f"    {row}" for row in rows)
    return (
        f"name: bomb\ninput:\n  url: {input_url}\n  storage_options:\n{options}\n"
        "methods: [{method: tsqr}]\n"
    )


# --------------------------------------------------------------------------- generic rules

SECTIONS = {  # where each model sits in a job, and a valid entry to put the field in
    ClusterSpec: ("cluster", {}),
    SyntheticSpec: ("input.create_if_missing", {"shape": [10, 3]}),
    **{m.spec: (f"methods[0] ({name})", m.example) for name, m in METHODS.items()},
}


def _numeric_fields() -> Iterator[tuple[type, str, set]]:
    from pipeline.sections import _leaf_types

    for model in SECTIONS:
        for name, info in model.model_fields.items():
            leaves = set()
            for leaf in _leaf_types(info.annotation):  # tuple[int, int] → int
                leaves |= _leaf_types(typing.get_args(leaf)[0]) if typing.get_args(leaf) else {leaf}
            if leaves & {int, float} and bool not in leaves:
                yield model, name, leaves


def _job_with(model: type, field: str, value: object) -> dict:
    if model is ClusterSpec:
        return {"name": "x", "input": {"url": "a"}, "methods": [{"method": "tsqr"}],
                "cluster": {field: value}}  # fmt: skip
    if model is SyntheticSpec:
        recipe = {"shape": [10, 3], field: value}
        return {"name": "x", "input": {"url": "a", "create_if_missing": recipe},
                "methods": [{"method": "tsqr"}]}  # fmt: skip
    entry = {**SECTIONS[model][1], field: value}
    return {"name": "x", "input": {"url": "a"}, "methods": [entry]}


NUMERIC = list(_numeric_fields())


def test_the_generic_rules_see_every_numeric_field():
    """The list below is built from the models: a new numeric field is covered by itself."""
    names = {f"{m.__name__}.{f}" for m, f, _ in NUMERIC}
    expected = {"ClusterSpec.n_workers", "ClusterSpec.connect_timeout", "NMFSpec.tol"}
    expected |= {"RSVDSpec.rank", "SVDSpec.rank", "NMFSpec.max_iter", "SyntheticSpec.shape"}
    assert expected <= names, expected - names


@pytest.mark.parametrize("model,field,leaves", NUMERIC, ids=lambda x: getattr(x, "__name__", x))
def test_no_number_takes_a_boolean(model, field, leaves):
    value = [True, 3] if field in ("shape", "chunks") else True
    with pytest.raises(ConfigError) as err:
        parse_config(_job_with(model, field, value), source="j.yaml")
    msg = str(err.value)
    assert f"{field}: must be " in msg and "not a boolean" in msg, msg


@pytest.mark.parametrize(
    "model,field", [(m, f) for m, f, leaves in NUMERIC if float in leaves], ids=str
)
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_no_float_is_infinite_or_nan(model, field, value):
    with pytest.raises(ConfigError, match=rf"{field}: input should be a finite number"):
        parse_config(_job_with(model, field, value), source="j.yaml")


def test_good_values_still_pass():
    cfg = parse_config(
        {
            "name": "run_1.v2-final",
            "input": {"url": "a", "create_if_missing": {"shape": [10, 3], "seed": 7}},
            "methods": [{"method": "nmf", "rank": 2, "tol": 0.0, "max_iter": 5}],
            "cluster": {"memory_limit": "1.5 GiB", "connect_timeout": 0.5, "n_workers": 2},
        }
    )
    assert cfg.cluster.memory_limit == "1.5 GiB" and cfg.methods[0].tol == 0.0
    assert parse_config({**cfg.model_dump(), "name": "n" * 200}).name == "n" * 200
    assert parse_config({**cfg.model_dump(), "cluster": {"memory_limit": 2**28}})


@pytest.mark.e2e
def test_a_memory_limit_above_the_machine_is_refused_for_local_workers(tmp_path: Path):
    """``1e26 PiB`` passed validate and became the machine's memory without a word
    (distributed caps it). Local kinds refuse it, naming the machine's memory; clusters
    whose workers start elsewhere keep their own limit."""
    from pipeline.memory import machine_memory

    total = machine_memory()
    write_array(tmp_path / "in.zarr", np.ones((10, 3)))
    job = job_dict(tmp_path, str(tmp_path / "in.zarr"), cluster={"memory_limit": "1e26 PiB"})
    path = write_job(tmp_path, job)
    proc = subprocess.run(
        [*factorize_cmd(), "validate", str(path)], capture_output=True, text=True, timeout=120
    )
    assert one_line_exit(proc) == (
        f"factorize: error: {path}: cluster.memory_limit: must be at most this machine's "
        f"memory, {total / 2**30:.1f} GiB ({total} bytes), for cluster.kind local, "
        "got '1e26 PiB'"
    )
    for kind in ("local", "local-cuda"):
        with pytest.raises(ConfigError, match=rf"at most this machine's memory, .* {kind}, got"):
            parse_config({**job, "cluster": {"kind": kind, "memory_limit": total + 1}})
        assert parse_config({**job, "cluster": {"kind": kind, "memory_limit": total}})
    remote = {"kind": "address", "address": "tcp://10.0.0.5:8786", "memory_limit": "1 PiB"}
    assert parse_config({**job, "cluster": remote}).cluster.memory_limit == "1 PiB"


# --------------------------------------------------------------------------- YAML bounds


@pytest.mark.e2e
def test_alias_bomb_fails_fast_with_bounded_memory(tmp_path: Path):
    """Unbounded, the bomb made validate grow to 3.5 GB in 40 s. The CLI runs under a
    1 GiB address-space limit: any walk of the expanded data would die of MemoryError."""
    write_array(tmp_path / "in.zarr", np.ones((10, 3)))
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(alias_bomb_yaml(str(tmp_path / "in.zarr")))

    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        load_config(bomb)
    assert time.perf_counter() - t0 < 5  # measured 0.2 s on a loaded 2-core machine
    assert str(err.value) == (
        f"{bomb}: YAML expands to more than {YAML_MAX_VALUES} values (aliases?); "
        "a job holds a few dozen"
    )

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    proc = subprocess.run(
        [*factorize_cmd(), "validate", str(bomb)],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=limit,
        env=env,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"factorize: error: {err.value}"]


def test_fifty_megabytes_refused_before_parsing(tmp_path: Path):
    big = tmp_path / "big.yaml"
    big.write_text("name: big\nx:\n" + "- 1\n" * 12_500_000)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=r"big.yaml: larger than 1 MiB"):
        load_config(big)
    assert time.perf_counter() - t0 < 1
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 64 * 1024  # reads 1 MiB + 1 byte, never the whole file


def test_flow_parameters_as_yaml_text_are_bounded(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"^config: YAML expands to more than 100000"):
        config_from_any(alias_bomb_yaml("in.zarr"))
    with pytest.raises(ConfigError, match=r"^config: larger than 1 MiB"):
        config_from_any("name: x\nnote: " + "é" * 600_000 + "\n")  # 1.2 MB in UTF-8
    shared = ["x"] * 1000  # a mapping from Python may share objects as well
    with pytest.raises(ConfigError, match=r"^config: YAML expands"):
        config_from_any({"name": "x", "input": {"url": "a"}, "l": [shared] * 200})


# --------------------------------------------------------------------------- preflight


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A folder this process cannot write into, whoever it runs as.

    ``chmod`` stops ordinary users but not root, who writes anyway (so the preflight
    rightly lets root through, see the next test). As root the folder is a read-only
    tmpfs mount instead: a read-only filesystem stops root too.
    """
    path = tmp_path / "ro"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
        return
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.fail(
            "running as root without the right to mount: cannot make a folder root cannot "
            f"write ({mounted.stderr.strip()}); run the tests as an ordinary user"
        )
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


@pytest.mark.e2e
def test_read_only_output_is_refused_by_validate(tmp_path: Path, read_only_dir: Path):
    from pipeline.io.preflight import check_input_creatable
    from pipeline.jobs import precheck

    with pytest.raises(OSError):  # the condition is real: nothing can be created there
        (read_only_dir / "probe").mkdir()
    write_array(tmp_path / "in.zarr", np.ones((10, 3)))
    job = job_dict(tmp_path, str(tmp_path / "in.zarr"), output={"url": str(read_only_dir / "o")})
    path = write_job(tmp_path, job)
    with pytest.raises(ConfigError, match=rf"output.url: cannot write to {read_only_dir} \("):
        precheck(load_config(path))
    proc = subprocess.run(
        [*factorize_cmd(), "validate", str(path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "read-only filesystem or no permission" in lines[0], lines

    created = {"url": str(read_only_dir / "new.zarr"), "create_if_missing": {"shape": [10, 3]}}
    with pytest.raises(ConfigError, match=rf"input.url: cannot write to {read_only_dir} \("):
        check_input_creatable(InputSpec.model_validate(created))


def test_preflight_agrees_with_what_the_os_allows(tmp_path: Path):
    """A chmod 555 folder: refused for an ordinary user, accepted for root, who can write
    there — the verdict must match what actually happens."""
    from pipeline.io.preflight import check_output_writable

    folder = tmp_path / "r-x"
    folder.mkdir()
    folder.chmod(0o555)
    spec = parse_config({**job_dict(tmp_path, "a"), "output": {"url": str(folder)}}).output
    try:
        try:
            check_output_writable(location_of(spec), "job")
            verdict = True
        except ConfigError:
            verdict = False
        try:
            (folder / ".probe").mkdir()
            (folder / ".probe").rmdir()
            can_write = True
        except PermissionError:
            can_write = False
    finally:
        folder.chmod(0o755)
    assert verdict == can_write == (os.geteuid() == 0)


def test_output_and_input_paths_blocked_by_files(tmp_path: Path):
    from pipeline.io.preflight import check_input_creatable, check_output_writable

    (tmp_path / "file").write_text("x")
    under_file = parse_config({**job_dict(tmp_path, "a"), "output": {"url": f"{tmp_path}/file/o"}})
    with pytest.raises(ConfigError, match=rf"output.url: {tmp_path}/file is a file, not a folder"):
        check_output_writable(location_of(under_file.output), "job")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "job").write_text("x")
    spec = parse_config({**job_dict(tmp_path, "a"), "output": {"url": f"{tmp_path}/out"}}).output
    with pytest.raises(ConfigError, match=r"out/job exists and is not a result folder"):
        check_output_writable(location_of(spec), "job")
    check_output_writable(location_of(spec), "other")  # a sibling name is fine
    recipe = {"url": f"{tmp_path}/file/in.zarr", "create_if_missing": {"shape": [10, 3]}}
    with pytest.raises(ConfigError, match=r"input.url: .*file is a file"):
        check_input_creatable(InputSpec.model_validate(recipe))
    memory = parse_config({**job_dict(tmp_path, "a"), "output": {"url": "memory://o/file/x"}})
    check_output_writable(location_of(memory.output), "job")  # object stores: nothing to check here


def test_created_input_must_fit_the_free_space(tmp_path: Path):
    from pipeline.io.preflight import check_input_creatable, format_size

    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    rows = free // (8 * 1000) + 1  # one row more than fits at 1000 float64 columns
    spec = {"url": str(tmp_path / "a" / "b.zarr"), "create_if_missing": {"shape": [rows, 1000]}}
    with pytest.raises(InputError) as err:
        check_input_creatable(InputSpec.model_validate(spec))
    msg = str(err.value)
    assert msg.startswith(f"input.create_if_missing: a {rows}×1000 float64 matrix needs ")
    assert f"needs {format_size(rows * 8000)} but {tmp_path} has " in msg
    assert msg.endswith(" free; make shape smaller or point input.url elsewhere")
    spec["create_if_missing"]["shape"] = [1000, 1000]  # 7.6 MiB
    check_input_creatable(InputSpec.model_validate(spec))
    assert not (tmp_path / "a").exists()  # looked, wrote nothing


def test_format_size():
    from pipeline.io.preflight import format_size

    assert [format_size(n) for n in (0, 1023, 1536, 2**40, 8 * 10**18)] == [
        "0 B",
        "1023 B",
        "1.5 KiB",
        "1.0 TiB",
        "6.9 EiB",
    ]


def test_validate_never_writes(tmp_path: Path):
    """validate on jobs refused by the preflight leaves the filesystem as it was."""
    from pipeline.jobs import precheck

    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    job = job_dict(tmp_path, str(tmp_path / "x" / "in.zarr"))
    job["input"]["create_if_missing"] = {"shape": [10**9, 10**9]}
    with pytest.raises(InputError):
        precheck(parse_config(job))
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
