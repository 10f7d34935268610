"""The stock diffusers pipeline a trained model exports as: parts in, `save_pretrained`-able pipeline out.

A model whose text encoder is a stock pipeline folder's text stack (`trainers.models.text_stacks`) is
exported as that pipeline, with the trained backbone in place of the folder's: SDXL U-Net + CLIP-L/G ->
`StableDiffusionXLPipeline`, MMDiT + CLIP-L/G + T5 -> `StableDiffusion3Pipeline`, Flux + CLIP-L + T5 ->
`FluxPipeline`; a class-conditional DiT in latent space -> `DiTPipeline`. `DiffusionPipeline.
from_pretrained(out)` (or the class itself) then loads and samples it (tests/test_stock_export.py).
"""

from __future__ import annotations

from torch import nn

# (backbone family, text stack kind) -> the pipeline class, by name (diffusers is imported lazily).
PIPELINE_FOR = {
    ("unet", "sdxl"): "StableDiffusionXLPipeline",
    ("mmdit", "sd3"): "StableDiffusion3Pipeline",
    ("flux", "flux"): "FluxPipeline",
    ("dit", None): "DiTPipeline",
}
BACKBONE_PART = {"unet": "unet", "mmdit": "transformer", "flux": "transformer", "dit": "transformer"}


def pipeline_class_name(family: str, stack_kind: str | None, pixel_space: bool) -> str | None:
    """The stock pipeline class of a model, or None when no stock pipeline fits it (then export writes
    the parts' folders without `model_index.json`)."""
    if pixel_space:
        return None
    return PIPELINE_FOR.get((family, stack_kind))


def stock_pipeline(net: nn.Module, family: str, scheduler, vae: nn.Module | None, text_encoder):
    """The stock pipeline of these parts, or None when none fits. `text_encoder`: a TextStack (its
    `parts` are the pipeline's text_encoder[_2, _3] / tokenizer[_2, _3]) or None."""
    import diffusers

    kind = getattr(text_encoder, "kind", None)
    name = pipeline_class_name(family, kind, vae is None)
    if name is None:
        return None
    parts = dict(text_encoder.parts) if text_encoder is not None else {}
    parts.update({BACKBONE_PART[family]: net, "scheduler": scheduler, "vae": vae})
    if name == "StableDiffusionXLPipeline":
        # nuance's null condition is the empty caption's embedding (what condition dropout trained with),
        # not the zeros SDXL's pipeline substitutes by default.
        parts["force_zeros_for_empty_prompt"] = False
    return getattr(diffusers, name)(**parts)
