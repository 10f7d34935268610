"""LoRA / QLoRA fine-tuning of `model.pretrained`: the pretraining step on a frozen base with trainable
low-rank adapters (Hu et al. 2021), optionally over a 4-bit NF4 base (Dettmers et al. 2023).

Only the adapters reach the optimizer (the engines hand it the `requires_grad` parameters),
and only they are checkpointed: the frozen base is `model.pretrained`, fingerprinted in each
checkpoint's `lora/` folder, which also holds the adapters as stock diffusers / peft load them.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

from nuance.trainers.components import build_components
from nuance.trainers.config import RunConfig
from nuance.trainers.context import RunContext, seed_everything
from nuance.trainers.ema import EMA
from nuance.trainers.loops.harness import Harness
from nuance.trainers.lora import (
    apply_lora,
    base_fingerprint,
    check_base,
    check_quantized_base,
    compute_dtype,
    save_lora,
)


def _reporting_adapters(ctx: RunContext, recipe: RunConfig, backbone, ema_of) -> RunContext:
    """`ctx` whose report first writes the adapters (EMA weights when the run keeps an EMA, like sample
    and export) into the checkpoint's `lora/` on rank 0, so every checkpoint carries a ready LoRA."""
    info = {
        "base": str(Path(recipe.model.pretrained).expanduser().resolve()),
        "base_fingerprint": base_fingerprint(recipe.model.pretrained),
    }
    report = ctx.report

    def with_adapters(metrics: dict, checkpoint_dir: str | None) -> None:
        if checkpoint_dir and ctx.rank == 0:
            ema = ema_of()
            with ema.swapped_in() if ema is not None else contextlib.nullcontext():
                weights = {"weights": "ema" if ema is not None else "raw", "step": metrics["step"]}
                save_lora(backbone, Path(checkpoint_dir) / "lora", info={**info, **weights})
        report(metrics, checkpoint_dir)

    return dataclasses.replace(ctx, report=with_adapters)


def run(recipe: RunConfig, ctx: RunContext) -> dict:
    """Fine-tune the adapters of `model.pretrained` for train.max_steps optimizer steps (resuming)."""
    seed_everything(recipe.train.seed, ctx.rank)
    if ctx.resume_from:
        check_base(ctx.resume_from, recipe)
    comps = build_components(recipe, ctx.device)  # the base: model.pretrained (required for kind lora)
    dtype = compute_dtype(recipe.engine.precision)
    # The frozen base needs no fp32 master copy: under bf16 / fp16 it is held in that precision (half the
    # memory of an 8B-12B base; the adapters created below train in fp32 under the engine's autocast).
    comps.backbone.to(dtype)
    # The base moves to the device layer by layer as it is quantized (QLoRA never holds the full-precision
    # model there), before DeepSpeed sees the module, whose own .to(device) is then a no-op.
    adapted = apply_lora(comps.backbone, recipe.lora, dtype=dtype, device=ctx.device)
    for p in comps.backbone.parameters():  # peft makes adapters in the base's dtype: train them in fp32
        if p.requires_grad:
            p.data = p.data.float()
    trainable = sum(p.numel() for p in comps.backbone.parameters() if p.requires_grad)
    total = sum(p.numel() for p in comps.backbone.parameters())
    ctx.log(
        f"LoRA r={recipe.lora.rank} alpha={recipe.lora.alpha} on {len(adapted)} modules: "
        f"{trainable:,} trainable of {total:,} parameters"
        + (" (NF4 base)" if recipe.lora.quantize_base else "")
    )
    ema: EMA | None = None
    ctx = _reporting_adapters(ctx, recipe, comps.backbone, lambda: ema)
    h = Harness(recipe, ctx, comps)

    def loss_fn(model, batch):
        return comps.objective.loss(model, h.to_x0(batch), h.cond(batch))

    h.count_flops(lambda net, x0, cond: comps.objective.loss(net, x0, cond))
    engine = h.engine(comps.backbone, trainable_only=True)
    if recipe.lora.quantize_base:
        check_quantized_base(engine.module, dtype)
    ema, step = h.start(engine)
    return h.train_loop(engine, ema, step, loss_fn)
