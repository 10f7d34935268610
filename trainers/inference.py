"""Use a trained checkpoint: sample PNGs, or export a diffusers-format folder that stock diffusers loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from omegaconf import OmegaConf

from nuance.trainers import checkpoint
from nuance.trainers.components import Components, build_components
from nuance.trainers.config import RunConfig, config_from_dict
from nuance.trainers.models.backbone import SUBFOLDER
from nuance.trainers.models.stock_pipelines import stock_pipeline
from nuance.trainers.sampling import generate, save_images

PREDICTION_TYPE = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
BETA_SCHEDULE = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}


def local_checkpoint(ckpt_dir: str | Path) -> Path:
    """A local copy of a checkpoint: itself when local, else downloaded (s3://) into a cache folder."""
    ckpt = str(ckpt_dir)
    if "://" not in ckpt or ckpt.startswith("file://"):
        return Path(ckpt.removeprefix("file://"))
    import hashlib
    import os

    from nuance.data import storage

    target = (
        Path(os.path.expanduser("~/.cache/nuance/checkpoints"))
        / hashlib.sha256(ckpt.encode()).hexdigest()[:16]
    )
    if not (target / "meta.json").is_file():
        storage.get_folder(ckpt, target)
    return target


def checkpoint_images(
    recipe: RunConfig,
    comps: Components,
    prompts: list[str],
    classes: list[int],
    num_per_condition: int,
    steps: int | None,
    cfg: float | None,
    sampler: str,
    seed: int,
    device: torch.device,
) -> tuple[torch.Tensor, list[str]]:
    """Images of a loaded checkpoint, with the recipe's sampling steps and guidance unless given (a recipe
    without sample.cfg: the objective's default guidance, resolved by `generate`)."""
    return generate(
        comps.backbone,
        comps.objective,
        comps.conditioner,
        comps.autoencoder,
        prompts=prompts,
        classes=classes,
        num_per_condition=num_per_condition,
        latent_shape=comps.latent_shape,
        steps=steps or recipe.sample.steps,
        cfg=recipe.sample.cfg if cfg is None else cfg,
        sampler=sampler,
        seed=seed,
        device=device,
    )


def load_checkpoint_model(
    ckpt_dir: str | Path, use_ema: bool = True, device: torch.device | str = "cpu"
) -> tuple[RunConfig, Components]:
    ckpt_dir = local_checkpoint(ckpt_dir)
    meta = checkpoint.read_meta(ckpt_dir)
    recipe = config_from_dict(RunConfig, OmegaConf.to_container(OmegaConf.load(ckpt_dir / "recipe.yaml")))
    if recipe.kind == "lora":  # adapter-only checkpoint: the base is model.pretrained
        from nuance.trainers.lora import load_lora_checkpoint

        return recipe, load_lora_checkpoint(ckpt_dir, recipe, use_ema, device)
    # The checkpoint holds every weight: build its architecture only, the one it records (checkpoints
    # from before it did: the preset's, or model.pretrained's config when that folder is still here).
    architecture = meta.get("architecture") or _pretrained_architecture(recipe)
    recipe.model.pretrained = None
    comps = build_components(recipe, device, architecture=architecture)
    comps.backbone.load_state_dict(checkpoint.model_state_dict(ckpt_dir, use_ema=use_ema))
    comps.backbone.to(device).eval()
    return recipe, comps


def _pretrained_architecture(recipe: RunConfig) -> dict | None:
    """The architecture of `model.pretrained` (its config, no weights) when that folder exists."""
    from nuance.data.model_folders import model_folder
    from nuance.trainers.models.backbone import NET_CLASSES
    from nuance.trainers.models.presets import preset_family

    if not recipe.model.pretrained:
        return None
    family = preset_family(recipe.model.name)
    folder = Path(model_folder(recipe.model.pretrained, SUBFOLDER[family]))
    if not (folder / "config.json").is_file():
        return None
    return {"family": family, "config": dict(NET_CLASSES[family].load_config(folder))}


def sample_from_checkpoint(
    ckpt_dir: str | Path,
    *,
    prompts: list[str],
    classes: list[int],
    steps: int | None = None,
    cfg: float | None = None,
    sampler: str = "default",
    num_per_condition: int = 4,
    seed: int = 0,
    out: str | Path = "samples",
    use_ema: bool = True,
) -> list[Path]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    recipe, comps = load_checkpoint_model(ckpt_dir, use_ema, device)
    if comps.conditioner.conditioning == "text" and not prompts:
        prompts = list(recipe.sample.prompts)
    if comps.conditioner.conditioning == "class" and not classes:
        classes = list(recipe.sample.classes)
    images, titles = checkpoint_images(
        recipe, comps, prompts, classes, num_per_condition, steps, cfg, sampler, seed, device
    )
    paths = []
    for i, title in enumerate(dict.fromkeys(titles)):
        stem = title.replace(" ", "_").replace("/", "_")[:60]
        chunk = images[i * num_per_condition : (i + 1) * num_per_condition]
        paths += save_images(chunk, out, stem)
    return paths


def diffusers_scheduler(recipe: RunConfig, sampler: str | None = None):
    """The stock diffusers scheduler that samples what nuance's sampler samples for this recipe.

    `sampler` (None: the recipe's `sample.sampler`; `default`: the objective's own) picks the class:
    ddim -> DDIMScheduler, ddpm -> DDPMScheduler, euler (flow) -> FlowMatchEulerDiscreteScheduler. Each is
    configured to walk nuance's grid (`trailing` spacing: the first step is t = T - 1) and to end where
    nuance ends, at alpha_bar = 1 / sigma = 0, i.e. the clean x0 estimate: DDIM with
    `set_alpha_to_one=True` (`final_alpha_cumprod = 1`, as in diffusers' DiT conversion; SD's configs use
    False and end at alpha_bar_0), DDPMScheduler always does so. tests/test_sampler_parity.py checks that
    nuance's samplers and these schedulers give the same samples."""
    from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

    from nuance.trainers.config import Sampler
    from nuance.trainers.diffusion import resolve_sampler

    obj = recipe.objective
    name = resolve_sampler(obj.kind, recipe.sample.sampler if sampler is None else sampler)
    if name == Sampler.euler:
        # FlowObjective feeds the model t = sigma * num_timesteps; the scheduler's timesteps are the same,
        # and its `shift` is the objective's time shift (nuance samples on the same shifted grid).
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=obj.num_timesteps, shift=obj.shift)
    common = dict(
        num_train_timesteps=obj.num_timesteps,
        beta_start=obj.beta_start,
        beta_end=obj.beta_end,
        beta_schedule=BETA_SCHEDULE[obj.schedule],
        prediction_type=PREDICTION_TYPE[obj.kind],
        rescale_betas_zero_snr=obj.zero_terminal_snr,
        timestep_spacing="trailing",
        clip_sample=False,
    )
    if name == Sampler.ddpm:
        return DDPMScheduler(**common, variance_type="fixed_small")  # nuance's beta_tilde posterior variance
    return DDIMScheduler(**common, set_alpha_to_one=True)


def export_diffusers(
    ckpt_dir: str | Path, out: str | Path, use_ema: bool = True, merge_lora: bool = False
) -> Path:
    """Write `out/` as diffusers expects: the backbone (`transformer/` or `unet/`), `scheduler/`, `vae/`,
    the text encoder(s) and tokenizer(s) when the model is text-conditional, and `model_index.json` when a
    stock pipeline fits (trainers.models.stock_pipelines: DiT + VAE -> DiTPipeline; an SDXL U-Net / MMDiT
    / Flux trained with a stock pipeline folder's text stack -> StableDiffusionXLPipeline /
    StableDiffusion3Pipeline / FluxPipeline, which load and sample it).

    A kind-lora checkpoint exports the base backbone plus its adapters in `lora/` (see trainers/lora.py),
    or with `merge_lora` the backbone with W0 + (alpha/r) B A folded in; a QLoRA base is dequantized."""
    recipe, comps = load_checkpoint_model(ckpt_dir, use_ema)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"export target {out} is not empty")
    lora = None
    if recipe.kind == "lora":
        from nuance.trainers.lora import export_lora

        lora = export_lora(comps.backbone, out / "lora", merge=merge_lora)  # leaves a plain backbone
    elif merge_lora:
        raise ValueError(f"--merge-lora: {ckpt_dir} is a kind {recipe.kind} checkpoint, not kind lora")
    family = comps.backbone.family
    scheduler = diffusers_scheduler(recipe)
    vae = comps.autoencoder.vae if recipe.vae != "none" else None
    pipeline = stock_pipeline(comps.backbone.net, family, scheduler, vae, comps.text_encoder)
    if pipeline is not None:
        pipeline.save_pretrained(out)
    else:
        comps.backbone.net.save_pretrained(out / SUBFOLDER[family])
        scheduler.save_pretrained(out / "scheduler")
        if vae is not None:
            vae.save_pretrained(out / "vae")
        for name, part in (comps.text_encoder.parts if comps.text_encoder is not None else {}).items():
            part.save_pretrained(out / name)
    shutil.copy(local_checkpoint(ckpt_dir) / "recipe.yaml", out / "nuance_recipe.yaml")
    (out / "nuance_export.json").write_text(
        json.dumps(
            {
                "checkpoint": str(ckpt_dir),
                "ema": use_ema,
                "backbone": SUBFOLDER[family],
                "pixel_space": recipe.vae == "none",
                "objective": recipe.objective.kind,
                "lora": lora,
            },
            indent=1,
        )
    )
    return out
