"""What ``method: compress`` writes: the compressed checkpoint and the LoRA adapter.

Each factored layer's task left its ``B`` then ``A`` bytes (in the layer's dtype) in a part
file of the staging folder; these functions stream them, with the tensors kept as they
were, into safetensors files in the checkpoint's tensor order
(:func:`pipeline.io.safetensors.write_checkpoint`: one tensor in memory at a time).
"""

from __future__ import annotations

import json
from collections import Counter
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.io.safetensors import Checkpoint
    from pipeline.model_plan import LayerPlan


def factor_outputs(
    layer: LayerPlan, res: dict[str, Any], part: tuple[Any, str], names: tuple[str, str]
) -> list[Any]:
    """The two tensors of a factored layer, read back from its part file when written."""
    from pipeline.io.safetensors import TensorOut

    fs, path = part
    out, inp = layer.matrix
    k, code, nb, na = res["rank"], layer.dtype, res["b_bytes"], res["a_bytes"]
    b_shape, a_shape = (out, k), (k, inp)
    if len(layer.shape) == 4 and names[0].endswith("lora_B.weight"):
        b_shape, a_shape = (out, k, 1, 1), (k, *layer.shape[1:])  # PEFT's conv LoRA
    return [
        TensorOut(names[0], code, b_shape, nb, lambda: fs.cat_file(path, start=0, end=nb)),
        TensorOut(names[1], code, a_shape, na, lambda: fs.cat_file(path, start=nb, end=nb + na)),
    ]


def write_compressed(
    ckpt: Checkpoint,
    fs: Any,
    stem: str,
    layers: list[LayerPlan],
    results: list[dict[str, Any]],
    part_of: dict[int, tuple[Any, str]],
    mode: str,
    max_shard_bytes: int,
) -> list[str]:
    """``compressed.safetensors``: the checkpoint's tensors in order, each factored one as
    ``X.lowrank_B`` / ``X.lowrank_A``, the others (and layers kept dense) as they were."""
    from pipeline.io.safetensors import TensorOut, read_bytes, write_checkpoint

    factored = {layer.name: i for i, layer in enumerate(layers) if results[i]["rank"]}
    tensors = []
    for name, info in ckpt.tensors.items():
        i = factored.get(name)
        if i is None:
            tensors.append(
                TensorOut(name, info.dtype, tuple(info.shape), info.nbytes,
                          lambda name=name: read_bytes(ckpt, name))
            )  # fmt: skip
        else:
            names = (f"{name}.lowrank_B", f"{name}.lowrank_A")
            tensors += factor_outputs(layers[i], results[i], part_of[i], names)
    shapes = {layers[i].name: list(layers[i].shape) for i in factored.values()}
    meta = {
        "format": "pt",
        "zarr_factorize": json.dumps(
            {
                "method": "compress",
                "mode": mode,
                "ranks": {layers[i].name: results[i]["rank"] for i in factored.values()},
                "shapes": shapes,
            }
        ),
    }
    folder, base = stem.rsplit("/", 1)
    return write_checkpoint(fs, folder, base, tensors, meta, max_shard_bytes)


def _module(name: str) -> str:
    return name[: -len(".weight")] if name.endswith(".weight") else name


def write_adapter(
    fs: Any,
    folder: str,
    layers: list[LayerPlan],
    results: list[dict[str, Any]],
    part_of: dict[int, tuple[Any, str]],
) -> list[str]:
    """A PEFT LoRA adapter folder: ``adapter_model.safetensors`` with
    ``base_model.model.<module>.lora_A.weight`` (r × in) and ``.lora_B.weight`` (out × r)
    per factored layer, and ``adapter_config.json`` with each module's rank and
    ``alpha = r`` (PEFT scales ``B·A`` by ``alpha / r``: 1 here)."""
    from pipeline.io.safetensors import write_checkpoint

    fs.makedirs(folder, exist_ok=True)
    tensors, ranks = [], {}
    for i, layer in enumerate(layers):
        if results[i]["rank"]:
            prefix = f"base_model.model.{_module(layer.name)}"
            names = (f"{prefix}.lora_B.weight", f"{prefix}.lora_A.weight")
            b, a = factor_outputs(layer, results[i], part_of[i], names)
            tensors += [a, b]
            ranks[_module(layer.name)] = results[i]["rank"]
    files = write_checkpoint(fs, folder, "adapter_model", tensors, {"format": "pt"}, 2**62)
    common = Counter(ranks.values()).most_common(1)[0][0] if ranks else 1
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "r": common,
        "lora_alpha": common,
        "target_modules": sorted(ranks),
        "rank_pattern": {m: r for m, r in ranks.items() if r != common},
        "alpha_pattern": {m: r for m, r in ranks.items() if r != common},
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "base_model_name_or_path": None,
    }
    fs.pipe_file(f"{folder}/adapter_config.json", json.dumps(config, indent=2).encode())
    folder_name = folder.rstrip("/").rsplit("/", 1)[-1]
    return [f"{folder_name}/{f}" for f in [*files, "adapter_config.json"]]
