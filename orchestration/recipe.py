"""Load a recipe: YAML file + `key=value` overrides -> validated `Recipe`.

Everything a user can get wrong is caught here, before any Ray worker starts, with a message that
names the key and the file (or "command line" for overrides).
"""

from __future__ import annotations

import difflib
import os
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from nuance.data.config import ConfigError
from nuance.orchestration.schema import Recipe
from nuance.trainers.config import (
    RENAMED_KEYS,
    SAMPLERS_FOR,
    ObjectiveKind,
    Precision,
    RecipeKind,
    Sampler,
    config_from_dict,
    config_to_dict,
    config_to_yaml,
    objective_family,
)
from nuance.trainers.models.presets import FLOW_ONLY_FAMILIES, PRESETS, preset_conditioning, preset_family
from nuance.trainers.pipeline.plan import pipeline_problem

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


def _kind_mismatch(schema: Any, given: Any, prefix: str = "") -> str:
    """The first key whose value is a mapping where the schema has a list, or the reverse ("?" if none)."""
    if not isinstance(schema, dict) or not isinstance(given, dict):
        return "?"
    for key, value in given.items():
        want = schema.get(key)
        if (
            isinstance(want, (dict, list))
            and isinstance(value, (dict, list))
            and type(want) is not type(value)
        ):
            return f"{prefix}{key}"
        found = _kind_mismatch(want, value, f"{prefix}{key}.")
        if found != "?":
            return found
    return "?"


def _merge(merged: Any, given: Any, source: str) -> Any:
    """``given`` merged onto ``merged``; a RecipeError naming the key when it does not fit the schema."""
    try:
        return OmegaConf.merge(merged, given)
    except OmegaConfBaseException as err:
        raise _explain(err, source) from err
    except TypeError as err:  # OmegaConf: "Cannot merge incompatible container types" (list vs mapping)
        schema, values = OmegaConf.to_container(merged), OmegaConf.to_container(given)
        key = _kind_mismatch(schema, values)
        raise RecipeError(
            f"{source}: bad value for '{key}': a mapping where a list belongs, or the reverse"
        ) from err


def _explain(err: OmegaConfBaseException, source: str) -> RecipeError:
    key = getattr(err, "full_key", None) or "?"
    if isinstance(err, ConfigKeyError) and key in RENAMED_KEYS:
        return RecipeError(f"{source}: '{key}' was renamed to {RENAMED_KEYS[key]}")
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
        message = " ".join(str(err).split())  # YAML's messages span lines; the CLI prints one
        raise RecipeError(f"{path}: not valid YAML: {message}") from err
    if not isinstance(file_cfg, type(merged)) and file_cfg is not None:
        raise RecipeError(f"{path}: a recipe is a mapping of keys, got a list")
    merged = _merge(merged, file_cfg, str(path))
    for item in overrides or []:
        if "=" not in item:
            raise RecipeError(f"command line: override '{item}' is not of the form key=value")
        source = f"{path} + command line override '{item}'"
        try:
            given = OmegaConf.from_dotlist([item])
        except OmegaConfBaseException as err:
            raise _explain(err, source) from err
        merged = _merge(merged, given, source)
    source = f"{path}" + (" + command line" if overrides else "")
    recipe = _instantiate(merged, source)
    validate(recipe, source=source)
    return recipe, path


def _instantiate(merged: Any, source: str) -> Recipe:
    """The typed recipe; a section's own check (`ConfigError` from its `__post_init__`) is reported with
    the section's name, so every message names the full key."""
    for f in fields(Recipe):
        if is_dataclass(getattr(merged, f.name, None)) or OmegaConf.is_config(merged[f.name]):
            try:
                OmegaConf.to_object(merged[f.name])
            except ConfigError as err:
                raise RecipeError(f"{source}: '{f.name}.{err.key}' {err.message}") from err
    try:
        recipe = OmegaConf.to_object(merged)
    except ConfigError as err:  # the top level's own keys (name)
        raise RecipeError(f"{source}: {err}") from err
    assert isinstance(recipe, Recipe)
    return recipe


def _check(ok: bool, source: str, key: str, message: str) -> None:
    if not ok:
        raise RecipeError(f"{source}: '{key}' {message}")


def validate(recipe: Recipe, source: str = "recipe") -> None:
    """Checks across sections (each section checks its own values when it is built)."""
    if recipe.engine.pipeline_stages > 1:
        eng = recipe.engine
        problem = pipeline_problem(
            str(recipe.kind), recipe.model.name, eng.pipeline_stages, recipe.cluster.num_workers,
            eng.pipeline_partition,
        )  # fmt: skip
        if problem:
            _check(False, source, *problem)
    if recipe.kind == RecipeKind.lora:
        _validate_lora(recipe, source)
    if recipe.kind in (RecipeKind.progressive_distill, RecipeKind.adversarial_distill):
        _validate_distill(recipe, source)
    _check(
        recipe.engine.precision != Precision.fp16 or recipe.cluster.use_gpu,
        source,
        "engine.precision",
        "fp16 needs a GPU (cluster.use_gpu=true); use fp32 or bf16 on CPU",
    )
    obj, smp = recipe.objective, recipe.sample
    _validate_family(recipe, source)
    valid = SAMPLERS_FOR[objective_family(obj.kind)]
    _check(
        smp.sampler in valid,
        source,
        "sample.sampler",
        f"'{smp.sampler}' does not fit objective.kind={obj.kind}; use one of {', '.join(valid)}",
    )
    if preset_conditioning(recipe.model.name) == "class":
        num_classes = recipe.model.num_classes or PRESETS[recipe.model.name]["num_embeds_ada_norm"]
        _check(
            all(0 <= c < num_classes for c in smp.classes),
            source,
            "sample.classes",
            f"must be class ids in [0, {num_classes}) for model {recipe.model.name}",
        )


def _validate_family(recipe: Recipe, source: str) -> None:
    """MMDiT (SD3) and Flux are rectified-flow models (Esser et al. 2024); no LoRA targets for them yet."""
    name = recipe.model.name
    family = preset_family(name)
    if family not in FLOW_ONLY_FAMILIES:
        return
    _check(
        recipe.objective.kind == ObjectiveKind.flow,
        source,
        "objective.kind",
        f"is '{recipe.objective.kind}'; model {name} ({family}) trains with rectified flow: use flow",
    )
    if recipe.vae == "none":
        _check(
            recipe.data.image_size % 2 == 0,
            source,
            "data.image_size",
            f"is {recipe.data.image_size}; model {name} ({family}) takes 2x2 patches: use an even size",
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
    _check(
        obj.kind in (ObjectiveKind.v, ObjectiveKind.x0),
        source,
        "objective.kind",
        f"is '{obj.kind}'; kind {kind} needs v or x0, the student's parameterization (Salimans & Ho "
        "2022 sec. 4; nuance sample / export read it); the first teacher's own is distill.teacher_prediction",
    )
    _check(
        not (dc.teacher_prediction == "eps" and obj.zero_terminal_snr),
        source,
        "distill.teacher_prediction",
        "eps needs objective.zero_terminal_snr=false: an eps teacher has no x0 at alpha_bar = 0 (Lin et al. "
        "2024); the student's first step starts from pure noise either way",
    )
    _check(
        dc.student_steps < dc.teacher_steps <= obj.num_timesteps,
        source,
        "distill.teacher_steps",
        f"must be > distill.student_steps ({dc.student_steps}) and <= objective.num_timesteps "
        f"({obj.num_timesteps})",
    )
    _check(
        recipe.sample.sampler in (Sampler.default, Sampler.ddim),
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
    return config_to_dict(recipe)


def recipe_from_dict(config: dict) -> Recipe:
    return config_from_dict(Recipe, config)


def recipe_to_yaml(recipe: Recipe) -> str:
    return config_to_yaml(recipe)
