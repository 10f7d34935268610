"""Recipe loading and validation: every shipped recipe loads; mistakes name the key and the file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nuance.orchestration.recipe import RecipeError, load_recipe, preflight, recipe_from_dict, recipe_to_dict
from nuance.orchestration.schema import Recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").rglob("*.yaml"))


def test_recipes_folder_is_not_empty():
    assert any(p.name == "quickstart.yaml" for p in RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_shipped_recipe_loads(path):
    recipe, resolved = load_recipe(str(path))
    assert isinstance(recipe, Recipe)
    assert resolved == path
    assert recipe_from_dict(recipe_to_dict(recipe)) == recipe  # survives the trip to Ray workers


def test_default_is_quickstart():
    recipe, path = load_recipe(None)
    assert path.name == "quickstart.yaml"
    assert recipe.name == "quickstart" and recipe.cluster.num_workers == 2 and recipe.engine.zero_stage == 2


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_unknown_key_names_key_file_and_suggestion(tmp_path):
    path = write(tmp_path, "model:\n  nmae: dit_debug\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(str(path))
    message = str(err.value)
    assert str(path) in message and "'model.nmae'" in message and "model.name" in message


def test_unknown_top_level_key(tmp_path):
    with pytest.raises(RecipeError, match=r"unknown key 'trian'.*did you mean 'train'"):
        load_recipe(str(write(tmp_path, "trian:\n  max_steps: 3\n")))


def test_wrong_type_names_key_and_file(tmp_path):
    path = write(tmp_path, "train:\n  max_steps: many\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(str(path))
    assert str(path) in str(err.value) and "'train.max_steps'" in str(err.value)


def test_override_errors_name_the_override():
    with pytest.raises(RecipeError, match=r"command line override 'engine.zero_stag=3'.*engine.zero_stage"):
        load_recipe("quickstart", ["engine.zero_stag=3"])
    with pytest.raises(RecipeError, match="not of the form key=value"):
        load_recipe("quickstart", ["engine.zero_stage"])


def test_overrides_apply():
    recipe, _ = load_recipe(
        "quickstart", ["engine.zero_stage=3", "train.max_steps=7", "optim.betas=[0.8,0.9]"]
    )
    assert recipe.engine.zero_stage == 3 and recipe.train.max_steps == 7 and recipe.optim.betas == [0.8, 0.9]


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["objective.kind=eps", "objective.zero_terminal_snr=true"], "objective.zero_terminal_snr"),
        (["engine.offload_params=true", "engine.zero_stage=2"], "engine.offload_params"),
        (["engine.zero_stage=5"], "engine.zero_stage"),
        (["engine.precision=fp16"], "engine.precision"),
        (["model.name=dit_huge"], "model.name"),
        (["objective.kind=flow", "sample.sampler=ddim"], "sample.sampler"),
        (["model.name=dit_debug", "model.num_classes=12", "sample.classes=[3,12]"], "sample.classes"),
        (["data.image_size=30"], "data.image_size"),
        (["objective.cond_dropout=1.0"], "objective.cond_dropout"),
        (["name=a/b"], "name"),
    ],
)
def test_invalid_combinations_fail_with_the_key(overrides, key):
    with pytest.raises(RecipeError) as err:
        load_recipe("quickstart", overrides)
    assert f"'{key}'" in str(err.value) and "quickstart.yaml" in str(err.value)


def test_preflight_checks_local_paths(tmp_path):
    recipe, _ = load_recipe("quickstart", [f"vae={tmp_path / 'missing'}"])
    with pytest.raises(RecipeError, match="'vae'"):
        preflight(recipe, "r.yaml")
    recipe, _ = load_recipe("quickstart", [f"train.resume={tmp_path / 'nope'}"])
    with pytest.raises(RecipeError, match="'train.resume'"):
        preflight(recipe, "r.yaml")


def test_cli_recipe_show_prints_resolved_recipe():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "nuance.orchestration.cli",
            "recipe",
            "show",
            "quickstart",
            "train.max_steps=9",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "max_steps: 9" in out and "name: quickstart" in out


def test_cli_bad_recipe_exits_2_with_one_line():
    proc = subprocess.run(
        [sys.executable, "-m", "nuance.orchestration.cli", "recipe", "show", "quickstart", "model.nmae=x"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("nuance: error:") and "model.nmae" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_local_paths_become_absolute_for_the_workers(tmp_path, monkeypatch):
    from nuance.orchestration.recipe import with_absolute_paths

    monkeypatch.chdir(tmp_path)
    recipe, _ = load_recipe("quickstart", ["vae=models/vae", "data.source=shards/", "model.pretrained=base"])
    fixed = with_absolute_paths(recipe)
    assert fixed.vae == str(tmp_path / "models/vae") and fixed.model.pretrained == str(tmp_path / "base")
    assert fixed.data.source == str(tmp_path / "shards")
    assert fixed.text_encoder.path == "minilm" and fixed.train.resume == "auto"  # keywords stay
    s3, _ = load_recipe("quickstart", ["data.source=s3://b/x/", "cluster.storage_path=s3://b/runs"])
    assert with_absolute_paths(s3).data.source == "s3://b/x/" and recipe.vae == "models/vae"  # a copy


class _Conditioner:
    """Just enough of a Conditioner for `generate` to reach the guidance step."""

    def for_sampling(self, prompts, classes):
        return {"class_labels": torch.tensor(classes)}, [str(c) for c in classes]

    def null(self, batch):
        return {"class_labels": torch.zeros(batch, dtype=torch.long)}


def _scale_generate_uses(monkeypatch, objective_kind: str, cfg: float | None) -> float:
    from nuance.trainers import sampling
    from nuance.trainers.diffusion import build_objective

    class Scale(Exception):
        pass

    def guidance(model, cond, null, scale):
        raise Scale(scale)

    monkeypatch.setattr(sampling, "classifier_free_guidance", guidance)
    with pytest.raises(Scale) as seen:
        sampling.generate(
            None, build_objective(objective_kind), _Conditioner(), None, prompts=[], classes=[0],
            num_per_condition=1, latent_shape=(3, 8, 8), steps=1, cfg=cfg,
        )  # fmt: skip
    return seen.value.args[0]


def test_guidance_defaults_to_the_objectives_measured_scale(monkeypatch):
    """sample.cfg unset (null) is the objective's scale (DEFAULT_CFG_FOR, measured: README "Sample
    quality"); a set one wins, the recipe's or --cfg. `generate` resolves it for the training grids and
    eval, `nuance sample` and `nuance eval` alike."""
    from nuance.trainers.config import DEFAULT_CFG_FOR, ObjectiveKind, SampleConfig, guidance_scale

    assert SampleConfig().cfg is None and set(DEFAULT_CFG_FOR) == set(ObjectiveKind)
    assert [guidance_scale(k, None) for k in ("flow", "eps", "v", "x0")] == [2.0, 4.0, 4.0, 4.0]
    assert guidance_scale(ObjectiveKind.flow, 1.0) == 1.0 and guidance_scale("eps", 0.0) == 0.0
    for kind in ("flow", "eps", "x0"):
        assert _scale_generate_uses(monkeypatch, kind, None) == DEFAULT_CFG_FOR[kind]
        assert _scale_generate_uses(monkeypatch, kind, 1.5) == 1.5

    recipe, _ = load_recipe("quickstart", ["objective.kind=eps", "sample.cfg=null"])
    assert recipe.sample.cfg is None and guidance_scale(recipe.objective.kind, recipe.sample.cfg) == 4.0
    assert load_recipe("quickstart")[0].sample.cfg == 2.0  # a recipe's own value stays
