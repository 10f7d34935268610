"""Load a recipe: YAML file + `key=value` overrides -> validated `Recipe`.

Everything a user can get wrong is caught here, before any Ray worker starts, with a message that
names the key and the file (or "command line" for overrides).
"""

from __future__ import annotations

import difflib
import importlib.util
import os
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from nuance.orchestration import schema
from nuance.orchestration.schema import Recipe

DEFAULT_RECIPE = "quickstart"


class RecipeError(ValueError):
    """A user mistake in a recipe; the message names the key and where it came from."""


def shipped_recipe_dirs() -> list[Path]:
    """The folder of the recipes nuance ships (`nuance.recipes`, YAML only)."""
    import nuance.recipes

    return [Path(p) for p in nuance.recipes.__path__]


def resolve_recipe_path(name_or_path: str | None) -> Path:
    """A path to a YAML file, or the name of a recipe shipped in `recipes/` (e.g. 'quickstart')."""
    name = name_or_path or DEFAULT_RECIPE
    path = Path(name).expanduser()
    if path.is_file():
        return path
    for root in shipped_recipe_dirs():
        for candidate in (name, f"{name}.yaml"):
            if (root / candidate).is_file():
                return root / candidate
    raise RecipeError(f"recipe '{name}' not found: not a file, and not a recipe shipped in recipes/")


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in fields(cls):
        key = f"{prefix}{f.name}"
        keys.append(key)
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        if is_dataclass(default):
            keys.extend(_all_keys(type(default), f"{key}."))
    return keys


def _explain(err: OmegaConfBaseException, source: str) -> RecipeError:
    key = getattr(err, "full_key", None) or "?"
    if isinstance(err, ConfigKeyError):
        close = difflib.get_close_matches(key, _all_keys(Recipe), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return RecipeError(f"{source}: unknown key '{key}'{hint}")
    first_line = str(err).splitlines()[0]
    return RecipeError(f"{source}: bad value for '{key}': {first_line}")


def load_recipe(name_or_path: str | None = None, overrides: list[str] | None = None) -> tuple[Recipe, Path]:
    """Merge the YAML file and the overrides onto the schema and validate the result."""
    path = resolve_recipe_path(name_or_path)
    merged = OmegaConf.structured(Recipe)
    try:
        file_cfg = OmegaConf.load(path)
    except Exception as err:  # yaml syntax errors come in several types
        raise RecipeError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(file_cfg, type(merged)) and file_cfg is not None:
        raise RecipeError(f"{path}: a recipe is a mapping of keys, got a list")
    try:
        merged = OmegaConf.merge(merged, file_cfg)
    except OmegaConfBaseException as err:
        raise _explain(err, str(path)) from err
    for item in overrides or []:
        if "=" not in item:
            raise RecipeError(f"command line: override '{item}' is not of the form key=value")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as err:
            raise _explain(err, f"command line override '{item}'") from err
    recipe = OmegaConf.to_object(merged)
    assert isinstance(recipe, Recipe)
    validate(recipe, source=f"{path}" + (" + command line" if overrides else ""))
    return recipe, path


def _check(ok: bool, source: str, key: str, message: str) -> None:
    if not ok:
        raise RecipeError(f"{source}: '{key}' {message}")


def _choice(value: Any, choices: tuple, source: str, key: str) -> None:
    _check(value in choices, source, key, f"is '{value}'; expected one of {', '.join(map(str, choices))}")


def validate(recipe: Recipe, source: str = "recipe") -> None:
    """Checks of values and combinations that the types alone cannot express."""
    from nuance.trainers.models.presets import PRESETS, preset_family

    _choice(recipe.kind, schema.RECIPE_KINDS, source, "kind")
    _check(
        recipe.model.name in PRESETS,
        source,
        "model.name",
        f"is '{recipe.model.name}'; known presets: {', '.join(sorted(PRESETS))}",
    )
    family = preset_family(recipe.model.name)
    obj = recipe.objective
    _choice(obj.kind, schema.OBJECTIVES, source, "objective.kind")
    _choice(obj.schedule, schema.SCHEDULES, source, "objective.schedule")
    _check(
        not (obj.zero_terminal_snr and obj.kind == "eps"),
        source,
        "objective.zero_terminal_snr",
        "needs objective.kind v or x0: eps-prediction is undefined at zero terminal SNR (Lin et al. 2024)",
    )
    _check(0.0 <= obj.cond_dropout < 1.0, source, "objective.cond_dropout", "must be in [0, 1)")
    _check(obj.num_timesteps >= 2, source, "objective.num_timesteps", "must be >= 2")
    _check(
        0 < obj.beta_start < obj.beta_end < 1,
        source,
        "objective.beta_start",
        "and objective.beta_end must satisfy 0 < beta_start < beta_end < 1",
    )
    _check(obj.logit_std > 0, source, "objective.logit_std", "must be > 0")

    data = recipe.data
    _check(data.batch_size >= 1, source, "data.batch_size", "must be >= 1")
    _check(data.num_workers >= 0, source, "data.num_workers", "must be >= 0")
    _check(
        data.image_size >= 8 and data.image_size % 8 == 0,
        source,
        "data.image_size",
        "must be a multiple of 8 and >= 8",
    )
    _check(data.toy_samples >= 1, source, "data.toy_samples", "must be >= 1")
    _choice(data.mode, schema.DATA_MODES, source, "data.mode")
    _check(0 <= data.max_bad_fraction <= 1, source, "data.max_bad_fraction", "must be in [0, 1]")

    optim = recipe.optim
    _check(optim.lr > 0, source, "optim.lr", "must be > 0")
    _check(
        len(optim.betas) == 2 and all(0 <= b < 1 for b in optim.betas),
        source,
        "optim.betas",
        "must be two numbers in [0, 1)",
    )
    _choice(optim.decay, schema.LR_DECAYS, source, "optim.decay")
    _check(optim.warmup_steps >= 0, source, "optim.warmup_steps", "must be >= 0")
    _check(optim.grad_clip >= 0, source, "optim.grad_clip", "must be >= 0 (0 disables clipping)")
    _check(0 <= optim.min_lr_ratio <= 1, source, "optim.min_lr_ratio", "must be in [0, 1]")

    eng = recipe.engine
    _choice(eng.zero_stage, (0, 1, 2, 3), source, "engine.zero_stage")
    _choice(eng.precision, schema.PRECISIONS, source, "engine.precision")
    _check(eng.grad_accum >= 1, source, "engine.grad_accum", "must be >= 1")
    _check(
        not eng.offload_params or eng.zero_stage == 3,
        source,
        "engine.offload_params",
        "needs engine.zero_stage=3 (only ZeRO-3 partitions parameters)",
    )
    _check(
        not eng.offload_optimizer or eng.zero_stage >= 1,
        source,
        "engine.offload_optimizer",
        "needs engine.zero_stage >= 1",
    )
    _check(
        eng.precision != "fp16" or recipe.cluster.use_gpu,
        source,
        "engine.precision",
        "fp16 needs a GPU (cluster.use_gpu=true); use fp32 or bf16 on CPU",
    )

    train = recipe.train
    _check(train.max_steps >= 1, source, "train.max_steps", "must be >= 1")
    _check(train.log_every >= 1, source, "train.log_every", "must be >= 1")
    _check(train.ckpt_every >= 0, source, "train.ckpt_every", "must be >= 0 (0: only at the end)")
    _check(train.keep_checkpoints >= 1, source, "train.keep_checkpoints", "must be >= 1")
    _check(0 <= train.ema_decay < 1, source, "train.ema_decay", "must be in [0, 1)")
    _check(optim.decay_steps is None or optim.decay_steps >= 1, source, "optim.decay_steps", "must be >= 1")

    smp = recipe.sample
    _choice(smp.sampler, schema.SAMPLERS, source, "sample.sampler")
    valid = {"flow": ("default", "euler")}.get(obj.kind, ("default", "ddpm", "ddim"))
    _check(
        smp.sampler in valid,
        source,
        "sample.sampler",
        f"'{smp.sampler}' does not fit objective.kind={obj.kind}; use one of {', '.join(valid)}",
    )
    _check(
        smp.steps >= 1 and smp.num_per_condition >= 1 and smp.every >= 0,
        source,
        "sample",
        "needs steps >= 1, num_per_condition >= 1 and every >= 0",
    )

    cl = recipe.cluster
    _check(cl.num_workers >= 1, source, "cluster.num_workers", "must be >= 1")
    _check(cl.cpus_per_worker > 0, source, "cluster.cpus_per_worker", "must be > 0")
    _check(
        not cl.use_gpu or cl.gpus_per_worker > 0,
        source,
        "cluster.gpus_per_worker",
        "must be > 0 when cluster.use_gpu=true",
    )
    _choice(cl.placement_strategy, schema.PLACEMENT_STRATEGIES, source, "cluster.placement_strategy")
    _choice(recipe.tracking.mode, schema.TRACKING_MODES, source, "tracking.mode")
    _check(
        bool(recipe.name) and "/" not in recipe.name, source, "name", "must be a non-empty name without '/'"
    )

    if recipe.kind == "lora":
        _validate_lora(recipe, source)
    if recipe.kind in ("progressive_distill", "adversarial_distill"):
        _validate_distill(recipe, source)

    conditioning = {"dit": "class", "pixart": "text", "unet": "text"}[family]
    if conditioning == "class":
        num_classes = recipe.model.num_classes or PRESETS[recipe.model.name]["num_embeds_ada_norm"]
        _check(
            all(0 <= c < num_classes for c in smp.classes),
            source,
            "sample.classes",
            f"must be class ids in [0, {num_classes}) for model {recipe.model.name}",
        )


def _validate_lora(recipe: Recipe, source: str) -> None:
    """Kind lora: fine-tunes a local base with LoRA (Hu et al. 2021) / QLoRA (Dettmers et al. 2023)."""
    lora = recipe.lora
    _check(
        bool(recipe.model.pretrained),
        source,
        "model.pretrained",
        "is required for kind lora: the local diffusers folder of the base model to fine-tune",
    )
    _check(lora.rank >= 1, source, "lora.rank", "must be >= 1")
    _check(lora.alpha > 0, source, "lora.alpha", "must be > 0 (the update is scaled by alpha / rank)")
    _check(0 <= lora.dropout < 1, source, "lora.dropout", "must be in [0, 1)")
    _check(all(lora.target_modules), source, "lora.target_modules", "must not contain empty names")
    _check(
        recipe.engine.zero_stage <= 2,
        source,
        "engine.zero_stage",
        "must be 0, 1 or 2 for kind lora: ZeRO-3 would partition the frozen (and 4-bit) base weights",
    )
    _check(
        not lora.quantize_base or recipe.engine.precision in ("fp32", "bf16"),
        source,
        "lora.quantize_base",
        "needs engine.precision fp32 or bf16 (QLoRA computes in bf16 on GPUs, fp32 on CPUs)",
    )


def _validate_distill(recipe: Recipe, source: str) -> None:
    """Kinds progressive_distill (Salimans & Ho 2022) and adversarial_distill (Lin et al. 2024,
    SDXL-Lightning): the student is a v/x0 DDIM sampler of distill.student_steps steps."""
    dc, obj, kind = recipe.distill, recipe.objective, recipe.kind
    _check(
        bool(dc.teacher),
        source,
        "distill.teacher",
        f"is required for kind {kind}: the local diffusers folder of the teacher backbone",
    )
    _choice(dc.parameterization, ("v", "x0"), source, "distill.parameterization")
    _check(
        obj.kind == dc.parameterization,
        source,
        "objective.kind",
        f"is '{obj.kind}' but distill.parameterization is '{dc.parameterization}': they must agree, since "
        "the student is sampled as objective.kind (nuance sample / export read it); the first teacher's "
        "own parameterization is distill.teacher_prediction",
    )
    _choice(dc.teacher_prediction, (None, "eps", "v", "x0"), source, "distill.teacher_prediction")
    _check(
        not (dc.teacher_prediction == "eps" and obj.zero_terminal_snr),
        source,
        "distill.teacher_prediction",
        "eps needs objective.zero_terminal_snr=false: an eps teacher has no x0 at alpha_bar = 0 (Lin et al. "
        "2024); the student's first step starts from pure noise either way",
    )
    _choice(dc.weighting, ("truncated_snr", "snr_plus_one"), source, "distill.weighting")
    _check(dc.student_steps >= 1, source, "distill.student_steps", "must be >= 1")
    _check(
        dc.student_steps < dc.teacher_steps <= obj.num_timesteps,
        source,
        "distill.teacher_steps",
        f"must be > distill.student_steps ({dc.student_steps}) and <= objective.num_timesteps "
        f"({obj.num_timesteps})",
    )
    _check(
        recipe.sample.sampler in ("default", "ddim"),
        source,
        "sample.sampler",
        f"must be default or ddim for kind {kind}: the student is distilled into a deterministic DDIM step",
    )
    ratio = dc.teacher_steps // max(dc.student_steps, 1)
    if kind == "progressive_distill":
        _check(
            dc.teacher_steps % dc.student_steps == 0 and ratio & (ratio - 1) == 0,
            source,
            "distill.teacher_steps",
            f"must be distill.student_steps ({dc.student_steps}) times a power of two: each round halves it",
        )
        _check(dc.steps_per_round >= 1, source, "distill.steps_per_round", "must be >= 1")
        rounds = ratio.bit_length() - 1
        _check(
            recipe.train.max_steps <= rounds * dc.steps_per_round,
            source,
            "train.max_steps",
            f"is {recipe.train.max_steps}, more than the {rounds} rounds x distill.steps_per_round="
            f"{dc.steps_per_round} of distilling {dc.teacher_steps} -> {dc.student_steps} steps",
        )
    else:
        _check(
            dc.teacher_steps % dc.student_steps == 0,
            source,
            "distill.teacher_steps",
            f"must be a multiple of distill.student_steps ({dc.student_steps}): each student step is "
            "teacher_steps / student_steps teacher DDIM steps",
        )
        _check(dc.disc_lr > 0, source, "distill.disc_lr", "must be > 0")
        _check(dc.mse_weight >= 0, source, "distill.mse_weight", "must be >= 0")


def preflight(recipe: Recipe, source: str = "recipe") -> None:
    """Checks of the local paths a recipe names; run by `nuance train` before any worker starts
    (not by `recipe show`, so shipped recipes that name a user's paths still load)."""
    if recipe.vae != "none":
        _check(
            Path(os.path.expanduser(recipe.vae)).is_dir(),
            source,
            "vae",
            f"is '{recipe.vae}': expected 'none' or a local AutoencoderKL folder",
        )
    if recipe.model.pretrained:
        _check(
            Path(os.path.expanduser(recipe.model.pretrained)).is_dir(),
            source,
            "model.pretrained",
            f"is '{recipe.model.pretrained}': not a local folder",
        )
    if recipe.text_encoder.path != "minilm":
        _check(
            Path(os.path.expanduser(recipe.text_encoder.path)).is_dir(),
            source,
            "text_encoder.path",
            f"is '{recipe.text_encoder.path}': expected 'minilm' or a local CLIP/T5 folder",
        )
    if recipe.distill.teacher and recipe.kind.endswith("_distill"):
        _check(
            Path(os.path.expanduser(recipe.distill.teacher)).is_dir(),
            source,
            "distill.teacher",
            f"is '{recipe.distill.teacher}': not a local diffusers folder",
        )
    resume = recipe.train.resume
    _check(
        resume in ("auto", "never") or Path(os.path.expanduser(resume)).is_dir(),
        source,
        "train.resume",
        f"is '{resume}': expected auto, never or an existing checkpoint directory",
    )


def _absolute(path: str | None, keep: tuple[str, ...] = ()) -> str | None:
    if not path or path in keep or "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(path))


def with_absolute_paths(recipe: Recipe) -> Recipe:
    """A copy whose local paths are absolute: Ray Train workers run in their own working directory, and
    diffusers would read a relative folder name there as a Hub model id."""
    import copy

    recipe = copy.deepcopy(recipe)
    recipe.vae = _absolute(recipe.vae, ("none",))
    recipe.model.pretrained = _absolute(recipe.model.pretrained)
    recipe.text_encoder.path = _absolute(recipe.text_encoder.path, ("minilm",))
    recipe.distill.teacher = _absolute(recipe.distill.teacher)
    recipe.train.resume = _absolute(recipe.train.resume, ("auto", "never"))
    if not any(ch in recipe.data.source for ch in "{*?"):
        recipe.data.source = _absolute(recipe.data.source, ("toy",))
    recipe.data.cache_dir = _absolute(recipe.data.cache_dir)
    recipe.cluster.storage_path = _absolute(recipe.cluster.storage_path)
    return recipe


def recipe_to_dict(recipe: Recipe) -> dict:
    """Plain dict (what travels to Ray workers in `train_loop_config`)."""
    return OmegaConf.to_container(OmegaConf.structured(recipe), resolve=True)  # type: ignore[return-value]


def recipe_from_dict(config: dict) -> Recipe:
    recipe = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Recipe), config))
    assert isinstance(recipe, Recipe)
    return recipe


def recipe_to_yaml(recipe: Recipe) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(recipe))
