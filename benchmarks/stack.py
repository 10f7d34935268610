"""The full training stack against the plain loops, side by side in one call: one artifact.

Rows (`config`), each for `--model` at `--batch` per GPU on 256-token latents (4 x 32 x 32, DiT-XL/2 at
256 px), bf16, one GPU:

  diffusers_anchor  a plain 40-line loop over diffusers' DiTTransformer2DModel: torch.compile,
                    autocast bf16, fused AdamW, eps-prediction MSE on random latents; what a user writes
  plain_compile     the same loop over nuance's Backbone and objective (+ grad clipping)
  nuance_step       nuance's engine step (trainers.engine.build_engine: TorchEngine, compile) + EMA
                    update, on random latents: the product's step without Ray, data and logging
  nuance_train      `nuance train recipes/dit_xl2_256.yaml` through the CLI: Ray Train (NCCL), latent
                    shards streamed from a local SeaweedFS s3:// bucket, EMA 0.9999, checkpoint cadence
                    and logging as shipped; img/s, MFU, data wait and peak memory read from the run's
                    metrics.jsonl (median of the log windows after warm-up), MFU also from its W&B run
  loader            the same s3:// latent stream alone (no GPU work): the loader's headroom

MFU = FLOPs per image (FlopCounterMode, forward + backward, counted once on 2 examples) x img/s / peak
(989 TFLOP/s dense bf16 on H100 / H200 SXM, or --peak-tflops). Every GPU row runs in its own process.

  python3 benchmarks/stack.py --model dit_xl2 --batch 128 --json $OUT/stack_h100.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOOP_CONFIGS = ("diffusers_anchor", "plain_compile", "nuance_step")
LATENT = (4, 32, 32)
NUM_CLASSES = 1000
# --model: latent shape per image, and the condition: class labels (DiT) or text tokens x width (SD2's
# OpenCLIP-H: 77 x 1024). The U-Net rows are the loop configs (random latents and text embeddings).
MODELS = {
    "dit_xl2": {"latent": (4, 32, 32), "text": None, "objective": "eps"},
    "unet_sd2": {"latent": (4, 64, 64), "text": (77, 1024), "objective": "v"},
}


# ------------------------------------------------------------------------------------------ loop rows
def _backbone(model_name: str):
    from nuance.trainers.config import ModelConfig
    from nuance.trainers.models.backbone import build_backbone

    spec = MODELS[model_name]
    cfg = ModelConfig(name=model_name, num_classes=NUM_CLASSES if spec["text"] is None else None)
    cond_dim = spec["text"][1] if spec["text"] else None
    return build_backbone(cfg, in_channels=4, sample_size=spec["latent"][1], cond_dim=cond_dim)


def _inputs(model_name: str, batch: int, device: str):
    """(x0, cond) of random latents and the model's condition."""
    import torch

    spec = MODELS[model_name]
    x0 = torch.randn(batch, *spec["latent"], device=device)
    if spec["text"] is None:
        return x0, {"class_labels": torch.randint(0, NUM_CLASSES, (batch,), device=device)}
    return x0, {"encoder_hidden_states": torch.randn(batch, *spec["text"], device=device)}


def _flops_per_image(model_name: str) -> float:
    import torch

    from nuance.trainers.diffusion import build_objective
    from nuance.trainers.tracking import train_flops_per_sample

    device = "cuda" if torch.cuda.is_available() else "cpu"
    net = _backbone(model_name).to(device)
    x0, cond = _inputs(model_name, 2, device)
    objective = build_objective(MODELS[model_name]["objective"])
    return train_flops_per_sample(lambda: objective.loss(net, x0, cond), 2)


def _anchor_net(model_name: str):
    """The diffusers class itself, built from the preset's arguments (no nuance code in the loop)."""
    from diffusers import DiTTransformer2DModel, UNet2DConditionModel

    from nuance.trainers.models.presets import PRESETS

    kw = {k: v for k, v in PRESETS[model_name].items() if k != "family"}
    if model_name == "dit_xl2":
        return DiTTransformer2DModel(**kw, in_channels=4, out_channels=8, sample_size=32)
    return UNet2DConditionModel(**kw, in_channels=4, out_channels=4, sample_size=64, cross_attention_dim=1024)


def _anchor_step(model_name: str):
    """diffusers' model, compiled, autocast bf16, fused AdamW, eps-prediction: the plain loop users write."""
    import torch
    import torch.nn.functional as F

    net = _anchor_net(model_name).cuda().train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)
    fwd = torch.compile(net)
    alpha_bar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, device="cuda"), 0)
    channels = MODELS[model_name]["latent"][0]

    def step(x0, cond):
        t = torch.randint(0, 1000, (x0.shape[0],), device="cuda")
        eps = torch.randn_like(x0)
        ab = alpha_bar[t].view(-1, 1, 1, 1)
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if "class_labels" in cond:
                out = fwd(x_t, timestep=t, class_labels=cond["class_labels"]).sample
            else:
                out = fwd(x_t, t, encoder_hidden_states=cond["encoder_hidden_states"]).sample
        F.mse_loss(out[:, :channels].float(), eps).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _plain_step(model_name: str):
    import torch

    from nuance.trainers.diffusion import build_objective

    net = _backbone(model_name).cuda().train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)
    fwd, objective = torch.compile(net), build_objective(MODELS[model_name]["objective"])

    def step(x0, cond):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = objective.loss(fwd, x0, cond)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _nuance_step(model_name: str, batch: int):
    from nuance.trainers.config import EngineConfig, OptimConfig
    from nuance.trainers.diffusion import build_objective
    from nuance.trainers.ema import EMA
    from nuance.trainers.engine import build_engine

    engine = build_engine(
        _backbone(model_name).cuda(),
        EngineConfig(precision="bf16", compile=True),
        OptimConfig(),
        micro_batch=batch,
        world_size=1,
        total_steps=10**6,
    )
    ema, objective = EMA(engine.module, 0.9999), build_objective(MODELS[model_name]["objective"])

    def loss_fn(model, b):
        return objective.loss(model, b[0], b[1])

    def step(x0, cond):
        engine.train_step([(x0, cond)], loss_fn)
        ema.update()

    return step


def run_loop(model_name: str, config: str, batch: int, warmup: int, steps: int) -> dict:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(0)
    if config == "nuance_step":
        step = _nuance_step(model_name, batch)
    else:
        step = {"diffusers_anchor": _anchor_step, "plain_compile": _plain_step}[config](model_name)
    inputs = [_inputs(model_name, batch, "cuda") for _ in range(4)]
    for i in range(warmup):
        step(*inputs[i % 4])
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    chunk, times = 10, []
    for c in range(steps // chunk):
        start = time.perf_counter()
        for i in range(chunk):
            step(*inputs[(c + i) % 4])
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) / chunk)
    result = {
        "img_s": batch / statistics.median(times),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
    }
    profile_dir = os.environ.get("STACK_PROFILE_DIR")
    if profile_dir:  # where one step's time goes: a torch.profiler table of 3 steps per config
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for i in range(3):
                step(*inputs[i % 4])
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=60)
        Path(profile_dir, f"profile_{model_name}_{config}.txt").write_text(table)
    return result


# ----------------------------------------------------------------------------------- the full stack
def write_latent_shards(folder: Path, shards: int, per_shard: int) -> None:
    """Random latents in the product's latent-shard format (mean + logvar float16, `cls` label)."""
    import numpy as np
    import webdataset as wds

    from nuance.data.precompute import npy_bytes

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with wds.TarWriter(str(folder / f"lat-{s:06d}.tar"), mtime=0, encoder=False) as sink:
            for i in range(per_shard):
                sink.write({
                    "__key__": f"{s:06d}-{i:06d}",
                    "latent_mean.npy": npy_bytes(rng.standard_normal(LATENT).astype(np.float16)),
                    "latent_logvar.npy": npy_bytes(np.full(LATENT, -6.0, np.float16)),
                    "cls": str(int(rng.integers(NUM_CLASSES))).encode(),
                })  # fmt: skip


def tiny_vae(path: Path) -> Path:
    """A random 4-channel AutoencoderKL with 8x downsampling (only sample grids would decode with it)."""
    from diffusers import AutoencoderKL

    AutoencoderKL(
        block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=256,
    ).save_pretrained(path)
    return path


def serve(shard_dir: Path, work: Path):
    """A local SeaweedFS S3 server holding the shards; returns (server, s3 url pattern)."""
    from nuance.data import storage
    from nuance.data.s3server import SeaweedServer, random_credentials

    access, secret = random_credentials()
    server = SeaweedServer(work / "weed", access, secret, bucket="bench").start()
    os.environ.update(server.env())
    names = sorted(p.name for p in shard_dir.glob("*.tar"))
    for name in names:
        storage.put_file(str(shard_dir / name), f"s3://bench/latents/{name}")
    return server, f"s3://bench/latents/lat-{{000000..{len(names) - 1:06d}}}.tar"


def run_train(args, source: str, vae: Path, work: Path) -> dict:
    overrides = [
        "name=stack", f"cluster.storage_path={work / 'runs'}", f"vae={vae}", f"data.source={source}",
        f"data.batch_size={args.batch}", "data.image_size=256", f"data.num_workers={args.loader_workers}",
        f"train.max_steps={args.train_steps}", "train.log_every=20", "sample.every=0",
        "cluster.num_workers=1", f"cluster.cpus_per_worker={args.loader_workers + 2}",
        "engine.compile=true", "tracking.mode=offline", f"tracking.peak_tflops={args.peak_tflops}",
        *args.extra,
    ]  # fmt: skip
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    env.pop("DS_ACCELERATOR", None)
    cmd = [sys.executable, "-m", "nuance.orchestration.cli", "train", str(ROOT / "recipes/dit_xl2_256.yaml")]
    proc = subprocess.run([*cmd, *overrides], env=env, capture_output=True, text=True, timeout=args.timeout)
    (work / "train.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"nuance train failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    run_dir = work / "runs" / "stack"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "img_per_s" in r][args.skip_windows :]  # after compile and warm-up
    return {
        "img_s": statistics.median(r["img_per_s"] for r in rows),
        # the MFU the run itself reports: Tracker.log sends each metrics.jsonl row to W&B unchanged
        "mfu_logged": statistics.median(r["mfu"] for r in rows),
        "data_wait_frac": statistics.median(r["data_wait_frac"] for r in rows),
        "peak_gib": max(r.get("gpu/peak_gib", float("nan")) for r in rows),
        "windows": len(rows),
    }


def run_loader(args, source: str) -> dict:
    """The training stream alone, with the run's loader workers: how many images per second it can feed."""
    from nuance.data.builder import build_stream
    from nuance.data.config import DataConfig

    cfg = DataConfig(source=source, image_size=256, batch_size=args.batch, num_workers=args.loader_workers)
    batches = iter(build_stream(cfg, rank=0, world_size=1, seed=0, latent_shape=LATENT))
    for _ in range(5):
        next(batches)
    start, n = time.perf_counter(), 40
    for _ in range(n):
        next(batches)
    return {"img_s": n * args.batch / (time.perf_counter() - start)}


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="dit_xl2", choices=sorted(MODELS))
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--warmup", type=int, default=15)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--train-steps", type=int, default=200)
    p.add_argument("--skip-windows", type=int, default=2)
    p.add_argument("--loader-workers", type=int, default=8)
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--configs", default="diffusers_anchor,plain_compile,nuance_step,nuance_train,loader")
    p.add_argument("--timeout", type=int, default=400)
    p.add_argument("--json", required=True)
    p.add_argument(
        "--extra", nargs="*", default=[], help="more `nuance train` overrides (e.g. a CPU smoke run)"
    )
    p.add_argument("--append", action="store_true", help="add rows to the --json file's (one per config)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    shard_rows = {"nuance_train", "loader"} & set(args.configs.split(","))
    if not args.worker and args.model != "dit_xl2" and shard_rows:
        p.error("--configs nuance_train / loader are DiT-XL/2 rows (class-labelled latent shards)")
    if args.worker:
        print(json.dumps(run_loop(args.model, args.worker, args.batch, args.warmup, args.steps)))
        return
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    flops = _flops_per_image(args.model)
    configs = args.configs.split(",")
    results: list[dict] = []
    if args.append and Path(args.json).is_file():  # a later call of the same session adds its rows
        old = json.loads(Path(args.json).read_text())
        results = [r for r in old if (r["model"], r["config"]) not in {(args.model, c) for c in configs}]

    def add(config: str, measured: dict) -> None:
        row = {"model": args.model, "config": config, "batch": args.batch, "device": device, **measured}
        if "img_s" in row and config != "loader":
            row["mfu"] = flops * row["img_s"] / (args.peak_tflops * 1e12)
        row["gflop_per_img"] = flops / 1e9
        results.append(row)
        print(json.dumps(row), flush=True)
        Path(args.json).write_text(json.dumps(results, indent=1))

    for config in [c for c in configs if c in LOOP_CONFIGS]:
        cmd = [sys.executable, __file__, "--worker", config, "--json", "-", f"--batch={args.batch}",
               f"--model={args.model}",
               f"--warmup={args.warmup}", f"--steps={args.steps}"]  # fmt: skip
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:  # e.g. the U-Net's compile: the row says so, the others still run
            add(config, {"error": f"timed out after {args.timeout} s"})
            continue
        if proc.returncode != 0:
            add(config, {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"})
            print(proc.stderr[-3000:], file=sys.stderr)
            continue
        add(config, json.loads(proc.stdout.strip().splitlines()[-1]))
    if {"nuance_train", "loader"} & set(configs):
        work = Path(tempfile.mkdtemp(prefix="nuance-stack-"))
        write_latent_shards(work / "shards", shards=16, per_shard=max(256, args.batch * 4))
        vae = tiny_vae(work / "vae")
        server, source = serve(work / "shards", work)
        try:
            if "loader" in configs:
                add("loader", run_loader(args, source))
            if "nuance_train" in configs:
                try:
                    add("nuance_train", run_train(args, source, vae, work))
                except (RuntimeError, subprocess.TimeoutExpired) as err:
                    add("nuance_train", {"error": str(err)[-2000:]})
        finally:
            server.stop()
    print(table(results))


def table(rows: list[dict]) -> str:
    lines = ["config            img/s    MFU   peak GiB  note"]
    for r in rows:
        note = r.get("error", "")[:60]
        if "data_wait_frac" in r:
            note = f"data wait {r['data_wait_frac']:.1%}"
        lines.append(
            f"{r['config']:<16} {r.get('img_s', float('nan')):7.1f} {r.get('mfu', float('nan')):6.1%} "
            f"{r.get('peak_gib', float('nan')):9.1f}  {note}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
