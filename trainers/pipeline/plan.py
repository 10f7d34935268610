"""How a backbone becomes a pipeline: which families have a layer list, how many layers, how the stages
are cut. Pure data (no diffusers, no DeepSpeed import), so the recipe check stays cheap.

A family's layer list is `embeddings -> one layer per transformer block -> final layer` (see
`trainers.pipeline.layers`), or for the U-Net `embeddings -> down blocks -> mid -> up blocks -> output`
with the skip tensors in the tuple; MMDiT / Flux: `embeddings -> joint (then Flux's single-stream)
blocks -> output`. Conditioning is computed once, on the first stage.
"""

from __future__ import annotations

from nuance.trainers.models.presets import PRESETS, preset_family

PIPELINE_FAMILIES = ("dit", "pixart", "unet", "mmdit", "flux")


def num_pipeline_layers(model_name: str) -> int:
    """Layers of the preset's pipeline: embeddings + one per transformer block + final layer."""
    preset = PRESETS[model_name]
    if preset["family"] == "unet":  # down blocks, the mid block, up blocks
        return len(preset["down_block_types"]) + 1 + len(preset["up_block_types"]) + 2
    return preset["num_layers"] + preset.get("num_single_layers", 0) + 2  # Flux: + single-stream blocks


def pipeline_problem(
    kind: str, model_name: str, stages: int, num_workers: int, partition
) -> tuple[str, str] | None:
    """(recipe key, message) of the first reason the pipeline cannot run, or None when it can."""
    if kind != "pretrain":
        return (
            "kind",
            f"is {kind}; pipeline parallelism (engine.pipeline_stages={stages}) trains kind pretrain",
        )
    family = preset_family(model_name)
    if family not in PIPELINE_FAMILIES:
        return (
            "engine.pipeline_stages",
            f"is {stages}, but model {model_name} ({family}) has no pipeline layer list yet; "
            f"pipeline parallelism supports the {', '.join(PIPELINE_FAMILIES)} families",
        )
    if num_workers % stages:
        return (
            "cluster.num_workers",
            f"is {num_workers}, not a multiple of engine.pipeline_stages={stages} "
            "(workers = data-parallel x pipeline stages)",
        )
    layers = num_pipeline_layers(model_name)
    if layers < stages:
        return (
            "engine.pipeline_stages",
            f"is {stages}, more than the {layers} pipeline layers of model {model_name}",
        )
    if not isinstance(partition, str) and partition[-1] != layers:
        return (
            "engine.pipeline_partition",
            f"is {partition}; the last boundary must be the number of layers, {layers} for {model_name}",
        )
    return None
