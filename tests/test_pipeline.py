"""Pipeline parallelism (engine.pipeline_stages): layer lists, recipe checks, PP / DP x PP equivalence to
the plain model over gloo, exact resume, and the quickstart under Ray with a 2-stage pipeline."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
import torch.multiprocessing as mp

from nuance.orchestration.recipe import RecipeError, load_recipe
from nuance.trainers.config import EngineConfig, ModelConfig, OptimConfig
from nuance.trainers.diffusion import build_objective
from nuance.trainers.models.backbone import build_backbone
from nuance.trainers.pipeline.layers import pipeline_inputs, pipeline_layers
from nuance.trainers.pipeline.plan import num_pipeline_layers
from tests.conftest import free_port

MICRO, SIZE, TEXT = 2, 8, 16  # examples per micro batch, latent side, text width


def _backbone(name: str):
    torch.manual_seed(0)
    return build_backbone(ModelConfig(name=name), in_channels=4, sample_size=SIZE, cond_dim=TEXT)


def _batch(family: str, seed: int, n: int = MICRO) -> dict:
    g = torch.Generator().manual_seed(seed)
    batch = {"x0": torch.randn(n, 4, SIZE, SIZE, generator=g)}
    if family == "dit":
        batch["cond"] = {"class_labels": torch.randint(0, 1001, (n,), generator=g)}
    else:
        mask = (torch.arange(5)[None] < torch.randint(1, 6, (n, 1), generator=g)).long()
        batch["cond"] = {
            "encoder_hidden_states": torch.randn(n, 5, TEXT, generator=g),
            "encoder_attention_mask": mask,
        }
    return batch


@pytest.mark.parametrize(
    "name", ["dit_debug", "pixart_debug", "unet_debug", "unet_sdxl_debug", "mmdit_debug", "flux_debug"]
)
def test_layer_list_computes_the_backbone_exactly(name):
    backbone = _backbone(name)
    family = backbone.family
    batch = _batch(family, 1, n=3)
    cond = dict(batch["cond"])
    if backbone.uses_pooled:
        cond["pooled"] = torch.randn(3, TEXT)
    if backbone.uses_time_ids:
        cond["time_ids"] = torch.rand(3, 6) * 16
    x, t = batch["x0"], torch.tensor([10.0, 500.0, 990.0])
    layers = pipeline_layers(backbone)
    assert len(layers) == num_pipeline_layers(name)
    state = pipeline_inputs(family, x, t, cond, torch.zeros_like(x))
    for layer in layers:
        state = layer(state)
    assert len(state) == 2 and torch.equal(state[0], backbone(x, t, **cond))
    owned = [id(p) for layer in layers for p in layer.parameters()]
    assert sorted(owned) == sorted(id(p) for p in backbone.parameters())  # each weight in one layer


@pytest.mark.parametrize(
    ("overrides", "key", "says"),
    [
        (["engine.pipeline_stages=2", "engine.zero_stage=2"], "engine.zero_stage", "ZeRO 0 or 1"),
        (["engine.grad_accum=2"], "engine.grad_accum", "renamed to engine.micro_batches"),
        (["engine.pipeline_stages=3", "engine.zero_stage=1"], "cluster.num_workers", "not a multiple"),
        (
            ["engine.pipeline_stages=8", "engine.zero_stage=1", "cluster.num_workers=8"],
            "engine.pipeline_stages",
            "more than the 7 pipeline layers",
        ),
        (
            ["engine.pipeline_stages=2", "engine.zero_stage=1", "kind=lora"],
            "kind",
            "trains kind pretrain",
        ),
        (
            ["engine.pipeline_stages=2", "engine.zero_stage=1", "engine.pipeline_partition=[0,3,5]"],
            "engine.pipeline_partition",
            "last boundary",
        ),
        (
            ["engine.pipeline_stages=2", "engine.zero_stage=1", "engine.pipeline_partition=[0,5]"],
            "engine.pipeline_partition",
            "increasing",
        ),
    ],
)
def test_recipe_check_refuses_pipelines_that_cannot_run(overrides, key, says):
    with pytest.raises(RecipeError) as err:
        load_recipe("quickstart", overrides)
    message = str(err.value)
    assert "quickstart.yaml" in message and f"'{key}'" in message and says in message, message
    assert "\n" not in message


def test_recipe_accepts_a_manual_partition():
    recipe, _ = load_recipe(
        "quickstart", ["engine.pipeline_stages=2", "engine.zero_stage=1", "engine.pipeline_partition=[0,4,7]"]
    )
    assert recipe.engine.pipeline_partition == [0, 4, 7] and recipe.engine.micro_batches == 1


# -- equivalence over gloo ---------------------------------------------------------------------------
STEPS = 3  # the last step's loss and the weights after it depend on the updates before


def _prepare(objective, family):
    def prepare(batch):
        x_t, t_model, target = objective.noised(batch["x0"])
        return pipeline_inputs(family, x_t, t_model, batch["cond"], target)

    return prepare


def _step_batches(family: str, step: int, dp_rank: int, micro_batches: int) -> list[dict]:
    return [_batch(family, 1000 * step + 10 * dp_rank + m) for m in range(micro_batches)]


def _run_pipeline(
    name, stages, micro_batches, steps, *, seed=None, engine=None, checkpointing=False, partition="parameters"
):
    from nuance.trainers.pipeline.engine import PipelineEngine

    world = torch.distributed.get_world_size()
    if engine is None:
        config = EngineConfig(
            pipeline_stages=stages, zero_stage=1, micro_batches=micro_batches, pipeline_partition=partition
        )
        engine = PipelineEngine(
            _backbone(name), config, OptimConfig(lr=1e-3), micro_batch=MICRO, world_size=world,
            total_steps=100, activation_checkpointing=checkpointing,
        )  # fmt: skip
    if seed is not None:  # after building (which seeds the weights' init)
        torch.manual_seed(seed + engine.dp_rank)  # the data-parallel rank's stream, as the loop seeds it
    objective = build_objective("flow")
    family = "dit" if name.startswith("dit") else "pixart"
    losses = []
    for step in steps:
        batches = _step_batches(family, step, engine.dp_rank, micro_batches)
        losses.append(float(engine.train_step(batches, _prepare(objective, family)).loss))
    return engine, losses


def _reference(name: str, dp: int, micro_batches: int, steps: int) -> tuple[list[float], dict]:
    """The plain backbone (PP=1), data parallel emulated: each replica's RNG stream, mean gradient."""
    backbone = _backbone(name)
    optimizer = torch.optim.AdamW(backbone.parameters(), lr=1e-3, weight_decay=0.0)  # OptimConfig's
    objective, family = build_objective("flow"), backbone.family
    rng = {r: None for r in range(dp)}
    losses = []
    for step in range(steps):
        total = 0.0
        for r in range(dp):
            torch.manual_seed(100 + r) if rng[r] is None else torch.set_rng_state(rng[r])
            for batch in _step_batches(family, step, r, micro_batches):
                loss = objective.loss(backbone, batch["x0"], batch["cond"])
                (loss / (dp * micro_batches)).backward()
                total += float(loss) / (dp * micro_batches)
            rng[r] = torch.get_rng_state()
        torch.nn.utils.clip_grad_norm_(backbone.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(total)
    return losses, {k: v.detach().clone() for k, v in backbone.state_dict().items()}


def _compare(engine, losses, name, dp, micro_batches) -> dict:
    engine.gather_full()
    if torch.distributed.get_rank() != 0:
        return {}
    ref_losses, ref_weights = _reference(name, dp, micro_batches, len(losses))
    full = engine.full_state["model"]
    return {
        "ref_losses": ref_losses,
        # Attention key biases have an exactly zero gradient (softmax ignores a per-query constant): their
        # rounding noise, normalized by Adam, moves them by up to lr per step in either engine.
        "max_weight_diff": max(
            float((full[k] - v).abs().max()) for k, v in ref_weights.items() if not k.endswith("to_k.bias")
        ),
        "moved": max(
            float((v - _backbone(name).state_dict()[k]).abs().max()) for k, v in ref_weights.items()
        ),
    }


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="4",
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="4", DS_ACCELERATOR="cpu")  # fmt: skip
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=4)
    from nuance.trainers.checkpoint import rng_state, set_rng_state

    results = {}
    cases = [
        ("dit_debug", 4, 4, {}),
        ("dit_debug", 2, 2, {"partition": [0, 3, 4]}),
        ("pixart_debug", 4, 4, {"checkpointing": True}),
        ("pixart_debug", 2, 2, {"partition": "uniform"}),
    ]
    ckpt = os.path.join(out_dir, "ckpt")
    for name, stages, micro, kwargs in cases:
        dp = 4 // stages
        engine, losses = _run_pipeline(name, stages, micro, range(1), seed=100, **kwargs)
        resume_here = name == "dit_debug" and stages == 2
        if resume_here:  # checkpoint after the first step; the resumed run must replay the rest
            engine.save(ckpt)
            rng = rng_state()
        losses += _run_pipeline(name, stages, micro, range(1, STEPS), engine=engine)[1]
        results[f"{name} pp={stages} dp={dp}"] = {
            "losses": losses,
            **_compare(engine, losses, name, dp, micro),
        }
        if resume_here:
            fresh, _ = _run_pipeline(
                name, stages, micro, range(0), seed=12345, **kwargs
            )  # other weights, RNG
            fresh.load(ckpt)
            set_rng_state(rng)
            resumed = _run_pipeline(name, stages, micro, range(1, STEPS), engine=fresh)[1]
            results["resume"] = {"straight": losses[1:], "resumed": resumed}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    torch.distributed.destroy_process_group()
    os._exit(0)  # see tests/test_engine.py: skip C++ static destructors at interpreter exit


@pytest.mark.slow
def test_pipeline_equals_the_plain_model_and_resumes_exactly(tmp_path):
    mp.start_processes(_worker, args=(free_port(), str(tmp_path)), nprocs=4, join=True, start_method="spawn")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]
    for case, result in ranks[0].items():
        if case == "resume":
            continue
        assert result["moved"] > 1e-4, case  # the steps changed the weights, so equal weights mean something
        assert result["losses"] == pytest.approx(result["ref_losses"], rel=1e-5, abs=1e-6), case
        assert result["max_weight_diff"] < 2e-5, (case, result["max_weight_diff"])
        for other in ranks[1:]:  # every stage reports the same (data-parallel mean) loss
            assert other[case]["losses"] == result["losses"], case
    for rank in ranks:
        assert rank["resume"]["resumed"] == rank["resume"]["straight"]


# -- the acceptance command under Ray -----------------------------------------------------------------
def _metrics(run_dir) -> dict[int, tuple[float, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in rows if "loss" in r}


@pytest.mark.slow
def test_quickstart_trains_with_a_two_stage_pipeline_on_ray(tmp_path, toy_cache, nuance_cli):
    """The acceptance command (few steps), its sample grid and export. (Exact resume of a pipeline run,
    stream position, per-stage EMA, RNG and pipeline state, is checked over gloo above, without Ray's
    ~25 s of start-up for a second run.)"""
    storage = tmp_path / "runs"
    cmd = [*nuance_cli, "train", "quickstart", "engine.pipeline_stages=2", "engine.zero_stage=1",
           f"cluster.storage_path={storage}", f"data.cache_dir={toy_cache}", "train.max_steps=4",
           "train.log_every=1", "train.ckpt_every=2", "sample.every=0", "sample.eval_per_condition=0",
           "sample.steps=2", "engine.micro_batches=4", "data.batch_size=4",
           "tracking.mode=disabled"]  # fmt: skip
    train = subprocess.run([*cmd, "name=pp"], capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr[-3000:] + train.stdout[-3000:]
    log = train.stdout + train.stderr
    assert "pipeline engine: 2 stages x 1 data-parallel" in log, log[-3000:]
    straight = _metrics(storage / "pp")
    assert sorted(straight) == [1, 2, 3, 4] and all(0 < loss < 10 for loss, _ in straight.values())
    last = storage / "pp" / "step_00000004"
    assert (last / "deepspeed" / "state" / "pipeline_full.safetensors").is_file()
    assert (storage / "pp" / "samples" / "step_00000004.png").is_file()
    export = tmp_path / "export"
    proc = subprocess.run(
        [*nuance_cli, "export", str(last), str(export)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    from diffusers import UNet2DConditionModel

    from nuance.trainers.checkpoint import model_state_dict

    unet = UNet2DConditionModel.from_pretrained(export / "unet")
    ema, raw = model_state_dict(last), model_state_dict(last, use_ema=False)
    assert all(torch.equal(p, ema[f"net.{n}"]) for n, p in unet.state_dict().items())
    assert any(not torch.equal(raw[k], ema[k]) for k in ema)  # both weight sets are kept, not aliased
