"""LoRA / QLoRA: adapters on the diffusers backbones, their files loaded by stock diffusers / peft, the
DeepSpeed engine over a 4-bit base, and (slow) fine-tuning runs under Ray that resume, sample and export.
"""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from nuance.data.config import DataConfig
from nuance.orchestration.recipe import RecipeError, load_recipe
from nuance.trainers import lora as L
from nuance.trainers.config import LoraConfig, ModelConfig
from nuance.trainers.models.backbone import NET_CLASSES, build_backbone
from nuance.trainers.models.presets import preset_conditioning
from nuance.trainers.quality import Evaluator, load_real
from nuance.trainers.safe_load import torch_load
from tests.conftest import free_port

TEXT_DIM = 384  # width of the offline MiniLM text encoder
FAMILIES = {"dit_debug": "dit", "pixart_debug": "pixart", "unet_debug": "unet"}


def tiny_backbone(name: str, seed: int = 0, channels: int = 4, size: int = 16):
    """A random-init debug backbone. DiT zero-inits its adaLN gates and output layer (every branch a
    LoRA adapts would be multiplied by 0), so all weights get a small perturbation."""
    torch.manual_seed(seed)
    cond_dim = TEXT_DIM if preset_conditioning(name) == "text" else None
    backbone = build_backbone(
        ModelConfig(name=name, num_classes=12), in_channels=channels, sample_size=size, cond_dim=cond_dim
    )
    with torch.no_grad():
        for p in backbone.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return backbone.eval()


def inputs(backbone, batch: int = 2, channels: int = 4) -> tuple[torch.Tensor, torch.Tensor, dict]:
    g = torch.Generator().manual_seed(7)
    x, t = torch.randn(batch, channels, 16, 16, generator=g), torch.tensor([100.0, 700.0])[:batch]
    if backbone.conditioning == "class":
        return x, t, {"class_labels": torch.tensor([1, 5])[:batch]}
    cond = {
        "encoder_hidden_states": torch.randn(batch, 8, TEXT_DIM, generator=g),
        "encoder_attention_mask": torch.ones(batch, 8),
    }
    if backbone.uses_time_ids:
        cond.update(
            pooled=torch.randn(batch, TEXT_DIM, generator=g), time_ids=torch.randn(batch, 6, generator=g)
        )
    return x, t, cond


def stock_forward(net, family: str, x, t, cond) -> torch.Tensor:
    """The diffusers model called the way a stock pipeline calls it (no nuance code in between)."""
    with torch.no_grad():
        if family == "dit":
            out = net(x, timestep=t, class_labels=cond["class_labels"]).sample
        elif family == "pixart":
            out = net(
                x,
                encoder_hidden_states=cond["encoder_hidden_states"],
                timestep=t,
                encoder_attention_mask=cond["encoder_attention_mask"],
                added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            ).sample
        else:
            added = (
                {"text_embeds": cond["pooled"], "time_ids": cond["time_ids"]} if "pooled" in cond else None
            )
            out = net(
                x,
                t,
                encoder_hidden_states=cond["encoder_hidden_states"],
                encoder_attention_mask=cond["encoder_attention_mask"],
                added_cond_kwargs=added,
            ).sample
    return out[:, : x.shape[1]].float()


def perturb_adapters(backbone, seed: int = 3) -> None:
    """B = 0 at init makes every adapter a no-op; give B values so the adapters change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in backbone.named_parameters():
            if ".lora_B." in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def run(backbone, x, t, cond) -> torch.Tensor:
    with torch.no_grad():
        return backbone(x, t, **cond)


# -- adapters ---------------------------------------------------------------------------------------
def test_default_targets_are_attention_and_mlp_linears():
    assert L.default_target_modules("pixart") == L.default_target_modules("dit")
    assert {"to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"} <= set(
        L.default_target_modules("dit")
    )
    assert {"proj_in", "proj_out"} <= set(L.default_target_modules("unet"))
    assert "proj_out" not in L.default_target_modules("pixart")  # the output layer stays frozen
    assert {"add_q_proj", "to_add_out", "ff_context.net.2"} <= set(L.default_target_modules("mmdit"))
    assert "proj_out" not in L.default_target_modules("flux")  # Flux's output layer stays frozen too
    with pytest.raises(ValueError, match="family"):
        L.default_target_modules("vqgan")


@pytest.mark.parametrize("name", list(FAMILIES))
def test_apply_lora_freezes_base_and_adds_rank_r_adapters(name):
    backbone = tiny_backbone(name)
    x, t, cond = inputs(backbone)
    before = run(backbone, x, t, cond)
    adapted = L.apply_lora(backbone, LoraConfig(rank=4, alpha=8.0))
    targets = L.default_target_modules(FAMILIES[name])
    assert adapted and all(any(n.endswith(f".{target}") for target in targets) for n in adapted)
    assert "proj_out" not in adapted  # DiT / PixArt: the output layer stays frozen
    trainable = {n: p for n, p in backbone.named_parameters() if p.requires_grad}
    assert len(trainable) == 2 * len(adapted)
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    for name_, layer in L.lora_layers(backbone.net):
        a, b = layer.lora_A[L.ADAPTER].weight, layer.lora_B[L.ADAPTER].weight
        assert a.shape[0] == 4 and b.shape[1] == 4, name_  # A: r x in (x k x k for convs), B: out x r
        assert not b.any()  # B = 0: training starts exactly at the base model (Hu et al. 2021, sec. 4.1)
        assert layer.scaling[L.ADAPTER] == 2.0  # alpha / r
    torch.testing.assert_close(run(backbone, x, t, cond), before, rtol=0, atol=0)
    backbone.train()
    backbone(x, t, **cond).square().mean().backward()
    assert all(p.grad is not None for p in trainable.values())
    assert all(p.grad is None for p in backbone.parameters() if not p.requires_grad)


@pytest.mark.parametrize("name", ["pixart_debug", "unet_debug"])  # unet_debug: 1x1 conv proj_in/out
def test_merged_equals_unmerged(name):
    backbone = tiny_backbone(name)
    L.apply_lora(backbone, LoraConfig(rank=4, alpha=16.0))
    perturb_adapters(backbone)
    x, t, cond = inputs(backbone)
    adapted = run(backbone.eval(), x, t, cond)
    base = tiny_backbone(name)
    assert (adapted - run(base, x, t, cond)).abs().max() > 1e-3  # the adapters do change the output
    L.merge_lora(backbone)
    assert not list(L.lora_layers(backbone.net)) and type(backbone.net) is type(base.net)
    assert set(backbone.state_dict()) == set(base.state_dict())  # a plain diffusers model again
    torch.testing.assert_close(run(backbone, x, t, cond), adapted, rtol=1e-4, atol=1e-5)


def test_qlora_base_is_nf4_and_trains_on_cpu():
    import bitsandbytes as bnb

    backbone = tiny_backbone("pixart_debug")
    adapted = L.apply_lora(backbone, LoraConfig(rank=4, alpha=4.0, quantize_base=True), dtype=torch.float32)
    for name in adapted:
        base = backbone.net.get_submodule(name).get_base_layer()
        assert isinstance(base, bnb.nn.Linear4bit) and base.weight.quant_type == "nf4", name
        assert base.weight.dtype == torch.uint8 and base.compute_dtype == torch.float32
    assert L.check_quantized_base(backbone.net, torch.float32) == len(adapted)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in backbone.net.proj_out.modules())
    x, t, cond = inputs(backbone)
    backbone.train()
    loss = backbone(x, t, **cond).square().mean()
    loss.backward()
    grads = [p.grad for p in backbone.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)  # A gets no gradient while B = 0; B does
    backbone.eval()
    base = copy.deepcopy(backbone)
    L.unload_lora(base)  # the dequantized NF4 base, without adapters
    torch.testing.assert_close(run(backbone, x, t, cond), run(base, x, t, cond), rtol=1e-5, atol=1e-6)
    # The NF4 base is close to, not equal to, the fp32 one; merging dequantizes it exactly.
    perturb_adapters(backbone)
    qlora = run(backbone, x, t, cond)
    full = run(tiny_backbone("pixart_debug"), x, t, cond)
    assert 0 < (qlora - full).abs().max() < 0.5
    L.merge_lora(backbone)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in backbone.modules())
    torch.testing.assert_close(run(backbone, x, t, cond), qlora, rtol=1e-4, atol=1e-5)


def test_adapter_state_dict_and_files_hold_only_adapters(tmp_path):
    from safetensors import safe_open

    backbone = tiny_backbone("unet_debug")
    adapted = L.apply_lora(backbone, LoraConfig(rank=2, alpha=4.0))
    state = L.lora_state_dict(backbone)
    assert len(state) == 2 * len(adapted)
    assert all(k.startswith("unet.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in state)
    assert all(v.dtype == torch.float32 for v in state.values())
    L.save_lora(backbone, tmp_path, info={"step": 3})
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {L.LORA_WEIGHT_NAME, L.PEFT_WEIGHT_NAME, L.PEFT_CONFIG_NAME, L.INFO_NAME}
    with safe_open(tmp_path / L.LORA_WEIGHT_NAME, "pt") as f:
        assert set(f.keys()) == set(state)
        meta = json.loads(f.metadata()[L.METADATA_KEY])
    assert meta["unet.r"] == 2 and meta["unet.lora_alpha"] == 4.0
    info = json.loads((tmp_path / L.INFO_NAME).read_text())
    assert info["step"] == 3 and info["scale"] == 2.0 and not info["quantized_base"]
    assert sum(p.stat().st_size for p in tmp_path.iterdir()) < 0.2 * sum(
        p.numel() * 4 for p in backbone.parameters()
    )


@pytest.mark.parametrize("name", list(FAMILIES))
def test_stock_diffusers_loads_the_lora(tmp_path, name):
    """Base saved with save_pretrained (an exported base), adapters saved by nuance, both loaded into a
    fresh stock model: U-Nets through diffusers' own LoRA loaders, DiT / PixArt (no diffusers LoRA loader
    in 0.42) through peft."""
    from peft import PeftModel

    family = FAMILIES[name]
    backbone = tiny_backbone(name)
    backbone.net.save_pretrained(tmp_path / "base")
    L.apply_lora(backbone, LoraConfig(rank=4, alpha=8.0))
    perturb_adapters(backbone)
    L.save_lora(backbone, tmp_path / "lora")
    x, t, cond = inputs(backbone)
    ours = run(backbone.eval(), x, t, cond)
    cls = NET_CLASSES[family]
    assert (
        ours - stock_forward(cls.from_pretrained(tmp_path / "base"), family, x, t, cond)
    ).abs().max() > 1e-3

    def fresh():
        return cls.from_pretrained(tmp_path / "base").eval()

    peft_model = PeftModel.from_pretrained(fresh(), tmp_path / "lora").eval()
    torch.testing.assert_close(stock_forward(peft_model, family, x, t, cond), ours)
    if family == "unet":
        from diffusers import StableDiffusionXLPipeline

        unet = fresh()
        unet.load_lora_adapter(tmp_path / "lora", prefix="unet", use_safetensors=True)
        torch.testing.assert_close(stock_forward(unet, family, x, t, cond), ours)
        # What `StableDiffusionXLPipeline.load_lora_weights(dir)` runs, minus the text encoders.
        unet = fresh()
        state, alphas, meta = StableDiffusionXLPipeline.lora_state_dict(
            tmp_path / "lora", return_lora_metadata=True
        )
        StableDiffusionXLPipeline.load_lora_into_unet(state, alphas, unet, metadata=meta)
        torch.testing.assert_close(stock_forward(unet, family, x, t, cond), ours)


# -- recipes ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["kind=lora"], "model.pretrained"),
        (["kind=lora", "model.pretrained=/m", "lora.rank=0"], "lora.rank"),
        (["kind=lora", "model.pretrained=/m", "lora.alpha=0"], "lora.alpha"),
        (["kind=lora", "model.pretrained=/m", "lora.dropout=1.0"], "lora.dropout"),
        (["kind=lora", "model.pretrained=/m", "engine.zero_stage=3"], "engine.zero_stage"),
        (
            [
                "kind=lora",
                "model.pretrained=/m",
                "lora.quantize_base=true",
                "cluster.use_gpu=true",
                "engine.precision=fp16",
            ],
            "lora.quantize_base",
        ),
    ],
)
def test_lora_recipe_mistakes_name_the_key(overrides, key):
    with pytest.raises(RecipeError) as err:
        load_recipe("quickstart", overrides)
    assert f"'{key}'" in str(err.value)


def test_unknown_target_module_names_the_key():
    with pytest.raises(ValueError, match="lora.target_modules"):
        L.apply_lora(tiny_backbone("pixart_debug"), LoraConfig(target_modules=["to_qq"]))


# -- DeepSpeed over a 4-bit base ----------------------------------------------------------------------
def _engine_worker(rank: int, port: int, out_dir: str) -> None:
    """One gloo rank: ZeRO-2 in bf16 over an NF4 base, save after 2 steps, continue, reload, replay."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        LOCAL_WORLD_SIZE="1",
        DS_ACCELERATOR="cpu",
    )
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    from nuance.trainers.config import EngineConfig, OptimConfig
    from nuance.trainers.diffusion import build_objective
    from nuance.trainers.engine import AdapterEngine

    def make():
        backbone = tiny_backbone("pixart_debug", channels=3)
        L.apply_lora(backbone, LoraConfig(rank=4, alpha=4.0, quantize_base=True), dtype=torch.bfloat16)
        engine = EngineConfig(zero_stage=2, precision="bf16")
        return AdapterEngine(
            backbone.train(), engine, OptimConfig(lr=1e-2), micro_batch=2, world_size=1, total_steps=10
        )

    objective = build_objective("flow")

    def steps(engine, span):
        losses = []
        for step in span:
            torch.manual_seed(step)
            x, t, cond = inputs(engine.module, channels=3)
            stats = engine.train_step([(x, cond)], lambda m, b: objective.loss(m, b[0], b[1]))
            losses.append(stats.as_floats()[0])
        return losses

    engine = make()
    quantized = L.check_quantized_base(engine.module, torch.bfloat16)  # DeepSpeed's bf16 cast spared NF4
    dtypes = sorted({str(p.dtype) for p in engine.module.parameters() if p.requires_grad})
    straight = steps(engine, range(2))
    engine.save(os.path.join(out_dir, "ckpt"))
    straight += steps(engine, range(2, 4))
    fresh = make()
    fresh.load(os.path.join(out_dir, "ckpt"))
    resumed = steps(fresh, range(2, 4))
    result = {"quantized": quantized, "dtypes": dtypes, "straight": straight, "resumed": resumed}
    Path(out_dir, "result.json").write_text(json.dumps(result))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_zero2_bf16_engine_trains_adapters_over_nf4_base_and_resumes(tmp_path):
    mp.start_processes(
        _engine_worker, args=(free_port(), str(tmp_path)), nprocs=1, join=True, start_method="spawn"
    )
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["quantized"] == 20  # every adapted linear of pixart_debug is still NF4 after bf16 casting
    assert result["dtypes"] == ["torch.bfloat16"]  # ... while the adapters were cast
    assert (
        all(math.isfinite(x) for x in result["straight"]) and result["straight"][0] != result["straight"][1]
    )
    assert result["resumed"] == result["straight"][2:]  # adapters + optimizer state restored exactly
    saved = torch_load(tmp_path / "ckpt" / "state" / "mp_rank_00_model_states.pt")["module"]
    params = [k for k in saved if k.endswith(("weight", "bias"))]
    assert params and all(".lora_" in k for k in params)  # adapters only: no frozen base weights


# -- end to end under Ray -------------------------------------------------------------------------------
PROMPTS = ["a red circle", "a blue square", "a green triangle"]


def mean_rgb(images) -> np.ndarray:
    """Mean colour (R, G, B) in [0, 1] of images: a tensor (N, 3, H, W) in [0, 1] or PNG paths."""
    if isinstance(images, torch.Tensor):
        return images.mean(dim=(0, 2, 3)).numpy()
    return np.mean(
        [np.asarray(Image.open(p).convert("RGB"), np.float32).mean((0, 1)) / 255 for p in images], 0
    )


@pytest.fixture(scope="module")
def red_world(tmp_path_factory):
    """A random-init pixart_debug base (saved like an export) and the quickstart's toy shapes restricted
    to red ones, as WebDataset shards, with their mean colour."""
    import webdataset as wds

    from nuance.data.toy import _png_bytes, draw_sample

    root = tmp_path_factory.mktemp("lora-world")
    tiny_backbone("pixart_debug", channels=3, size=32).net.save_pretrained(root / "base")
    red, colours = [], []
    for i in range(800):
        image, caption, label = draw_sample(np.random.default_rng([0, i]), 32)
        if caption.startswith("a red "):
            red.append({"__key__": f"{i:06d}", "png": _png_bytes(image), "txt": caption.encode()})
            red[-1]["cls"] = str(label).encode()
            colours.append(np.asarray(image, np.float32).mean((0, 1)) / 255)
    (root / "red").mkdir()
    for shard in range(4):  # every rank needs shards of its own
        with wds.TarWriter(str(root / "red" / f"red-{shard:06d}.tar"), mtime=0, encoder=False) as sink:
            for sample in red[shard::4]:
                sink.write(sample)
    np.save(root / "red_mean_rgb.npy", np.mean(colours, 0))
    return root


def lora_recipe(world: Path, storage: Path, name: str, *overrides: str):
    recipe, _ = load_recipe(
        "lora_pixart_debug",
        [
            f"name={name}",
            f"model.pretrained={world / 'base'}",
            f"data.source={world / 'red'}",
            "data.num_workers=0",  # no DataLoader processes: these runs are seconds long
            f"cluster.storage_path={storage}",
            "tracking.mode=disabled",
            "train.log_every=1",
            "sample.steps=2",
            *overrides,
        ],
    )
    return recipe


def assert_samples_moved_to_red(ckpt: Path, world: Path, out: Path, toy_cache: Path) -> None:
    """Samples of the LoRA checkpoint (`nuance sample`'s code path) against its base model's for the
    same prompts and noise: redder, mean (R - B), and closer in mean colour to the red fine-tuning set."""
    from nuance.trainers.components import build_components
    from nuance.trainers.inference import load_checkpoint_model, sample_from_checkpoint
    from nuance.trainers.sampling import generate

    kw = dict(prompts=PROMPTS, classes=[], num_per_condition=8, steps=8, cfg=1.0)
    tuned_paths = sample_from_checkpoint(ckpt, out=out, seed=0, **kw)
    tuned = mean_rgb(tuned_paths)
    recipe, _ = load_checkpoint_model(ckpt)
    base = build_components(recipe)  # model.pretrained, no adapters
    images, _ = generate(
        base.backbone.eval(), base.objective, base.conditioner, base.autoencoder,
        latent_shape=base.latent_shape, seed=0, **kw
    )  # fmt: skip
    before = mean_rgb(images)
    target = np.load(world / "red_mean_rgb.npy")
    assert tuned[0] - tuned[2] > before[0] - before[2], (tuned, before)
    assert np.abs(tuned - target).sum() < 0.6 * np.abs(before - target).sum(), (tuned, before, target)
    # nuance's quality metric: KID to the red fine-tuning set falls (features of the toy-data classifier).
    evaluator = Evaluator.for_data(DataConfig(cache_dir=str(toy_cache), image_size=32))
    red = (load_real(DataConfig(source=str(world / "red"), image_size=32), 400).images + 1) / 2
    pngs = torch.stack([torch.from_numpy(np.asarray(Image.open(p), np.float32) / 255).permute(2, 0, 1)
                        for p in tuned_paths])  # fmt: skip
    kid_tuned, kid_before = evaluator.kid_to(pngs, red), evaluator.kid_to(images, red)
    assert kid_tuned < 0.9 * kid_before, (kid_tuned, kid_before)  # measured: 2.40-2.62 vs 3.14


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_lora_finetune_resumes_moves_samples_to_the_data_and_exports(
    tmp_path, red_world, ray_cluster, toy_cache
):
    from diffusers import PixArtTransformer2DModel
    from peft import PeftModel

    from nuance.orchestration.cli import main as cli_main
    from nuance.orchestration.launch import train
    from nuance.trainers.inference import export_diffusers, load_checkpoint_model

    steps = 12
    first = lora_recipe(red_world, tmp_path, "red", "train.max_steps=2")
    assert train(first).error is None
    second = lora_recipe(red_world, tmp_path, "red", f"train.max_steps={steps}")
    assert train(second).error is None
    run_dir = tmp_path / "red"
    launches = (run_dir / "workers" / "rank00000.jsonl").read_text().splitlines()
    assert [bool(json.loads(line)["resume_from"]) for line in launches] == [False, True]  # resumed
    assert [row["step"] for row in read_metrics(run_dir)] == list(range(1, steps + 1))
    ckpt = run_dir / f"step_{steps:08d}"
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["kind"] == "lora" and meta["world_size"] == 2
    info = json.loads((ckpt / "lora" / L.INFO_NAME).read_text())
    assert info["step"] == steps and info["base"] == str((red_world / "base").resolve())
    assert (ckpt / "lora" / L.LORA_WEIGHT_NAME).is_file() and (run_dir / "samples").is_dir()
    assert_samples_moved_to_red(ckpt, red_world, tmp_path / "samples", toy_cache)

    # Export: stock diffusers computes what nuance's LoRA checkpoint computes.
    _, comps = load_checkpoint_model(ckpt)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([300.0, 700.0])
    cond = comps.conditioner.from_captions(["a red circle", "a blue square"])
    ours = run(comps.backbone, x, t, cond)
    merged = tmp_path / "merged"
    assert cli_main(["export", str(ckpt), str(merged), "--merge-lora"]) == 0
    assert not (merged / "lora").exists()
    assert json.loads((merged / "nuance_export.json").read_text())["lora"] == "merged"
    stock = PixArtTransformer2DModel.from_pretrained(merged / "transformer").eval()
    torch.testing.assert_close(stock_forward(stock, "pixart", x, t, cond), ours, rtol=1e-4, atol=1e-5)
    plain = export_diffusers(ckpt, tmp_path / "plain")
    assert json.loads((plain / "nuance_export.json").read_text())["lora"] == "adapters"
    base = PixArtTransformer2DModel.from_pretrained(plain / "transformer").eval()
    with_lora = PeftModel.from_pretrained(base, plain / "lora").eval()
    torch.testing.assert_close(stock_forward(with_lora, "pixart", x, t, cond), ours)


@pytest.mark.slow
def test_qlora_finetune_moves_samples_and_merges(tmp_path, red_world, ray_cluster, toy_cache):
    import bitsandbytes as bnb
    from diffusers import PixArtTransformer2DModel

    from nuance.orchestration.launch import train
    from nuance.trainers.inference import export_diffusers, load_checkpoint_model

    overrides = (
        "lora.quantize_base=true",
        "train.max_steps=12",
        "cluster.num_workers=1",
        "train.ema_decay=0.5",
    )
    assert train(lora_recipe(red_world, tmp_path, "qred", *overrides)).error is None
    ckpt = tmp_path / "qred" / "step_00000012"
    info = json.loads((ckpt / "lora" / L.INFO_NAME).read_text())
    assert info["quantized_base"] and info["weights"] == "ema"  # the EMA of the adapters, as sampled
    _, comps = load_checkpoint_model(ckpt)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in comps.backbone.modules())  # sampled as trained
    assert_samples_moved_to_red(ckpt, red_world, tmp_path / "samples", toy_cache)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([300.0, 700.0])
    cond = comps.conditioner.from_captions(["a red circle", "a blue square"])
    ours = run(comps.backbone, x, t, cond)
    merged = export_diffusers(ckpt, tmp_path / "merged", merge_lora=True)  # dequantized NF4 base + B A
    stock = PixArtTransformer2DModel.from_pretrained(merged / "transformer").eval()
    torch.testing.assert_close(stock_forward(stock, "pixart", x, t, cond), ours, rtol=1e-4, atol=1e-5)
