"""Large transformers on one GPU: memory and speed of full fine-tuning (ZeRO-3 + offload), LoRA and QLoRA.

Each row builds an SD3.5-Large-sized (`sd35_large`, 8.1B) or Flux-dev-sized (`flux_dev`, 11.9B) backbone
with random weights through nuance's own code (trainers.models.backbone, trainers.zero_init,
trainers.lora, trainers.engine) and times its training step on random latents + text embeddings:

  full_bf16   ZeRO-3 (model built under deepspeed.zero.Init) + optimizer offload to the host, DeepSpeed's
              CPU Adam, bf16 master weights / grads / moments (engine.master_weights=bf16): 8 host bytes
              per parameter
  full_fp32   the same with fp32 master weights / grads / moments (16 host bytes per parameter), a
              fraction `--ratio` of them offloaded and the rest updated on the GPU (engine.offload_ratio)
  lora        frozen bf16 base + fp32 LoRA adapters (rank 16) on every attention projection, the engine
              auto picks on one GPU (TorchEngine: autocast bf16, fused AdamW)
  qlora       the same with the adapted base linears in NF4 (bitsandbytes), as trainers.loops.lora does

All rows: rectified flow with SD3's shift 3, gradient checkpointing, batch 1 unless set, latents of 16
channels at 1/8 of the image size, text tokens 333 (SD3: 77 CLIP + 256 T5) or 512 (Flux-dev's T5).
Each row runs in its own process; peak GPU memory is torch's max_memory_allocated over the timed steps
(the model's construction excluded), host memory the process's peak resident set.

  python3 benchmarks/large.py --json $OUT/large_h100.json --rows sd35_large:lora:512,flux_dev:qlora:1024
  python3 benchmarks/large.py --smoke --json /tmp/large_cpu.json   # the same code on tiny presets, CPU
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ROWS = (
    "sd35_large:lora:512,sd35_large:qlora:512,sd35_large:lora:1024,sd35_large:qlora:1024,"
    "flux_dev:lora:512,flux_dev:qlora:512,flux_dev:lora:1024,flux_dev:qlora:1024,"
    "sd35_large:full_bf16:512,sd35_large:full_bf16:1024,sd35_large:full_fp32:512"
)
SMOKE_ROWS = "mmdit_debug:lora:64,mmdit_debug:qlora:64,flux_debug:lora:64,mmdit_debug:full_fp32:64"
# LoRA targets (--targets). attention: the attention projections of MMDiT / Flux blocks, text and image
# streams (SimpleTuner's default). all: every linear layer of the blocks (attention, MLPs, adaLN
# modulation; Flux's single-stream MLP and output): QLoRA then stores the whole base in NF4, as
# Dettmers et al. 2023 do (the small embedders stay bf16).
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
TARGETS = {
    "attention": ATTENTION,
    "all": [*ATTENTION, "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
            "norm1.linear", "norm1_context.linear", "norm.linear", "proj_mlp", "proj_out"],
}  # fmt: skip
TEXT = {"mmdit": (333, 4096, 2048), "flux": (512, 4096, 768)}  # tokens, token width, pooled width


def _engine_config(mode: str, ratio: float):
    from nuance.trainers.config import EngineConfig

    if mode in ("lora", "qlora"):
        return EngineConfig(precision="bf16")
    master = "bf16" if mode == "full_bf16" else "fp32"
    return EngineConfig(
        zero_stage=3, precision="bf16", offload_optimizer=True, master_weights=master,
        offload_ratio=1.0 if mode == "full_bf16" else ratio,
    )  # fmt: skip


def _backbone(model: str, mode: str, side: int, engine_cfg, optim, batch: int, device, targets: str):
    import torch

    from nuance.trainers.config import LoraConfig, ModelConfig
    from nuance.trainers.lora import apply_lora
    from nuance.trainers.models.backbone import build_backbone
    from nuance.trainers.models.presets import PRESETS
    from nuance.trainers.zero_init import partitioned_init

    family = PRESETS[model]["family"]
    _, width, pooled = TEXT[family]
    kw = {"in_channels": 16, "sample_size": side, "cond_dim": width, "pooled_dim": pooled}
    cfg = ModelConfig(name=model, gradient_checkpointing=True)
    if mode.startswith("full"):
        part = partitioned_init(engine_cfg, optim, micro_batch=batch, world_size=1, device=device)
        return build_backbone(cfg, **kw, partition=part)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.set_default_dtype(dtype)  # the frozen base is built in the compute dtype, as the LoRA loop holds it
    with torch.device(device):
        backbone = build_backbone(cfg, **kw)
    torch.set_default_dtype(torch.float32)
    lora = LoraConfig(rank=16, alpha=16, target_modules=TARGETS[targets], quantize_base=mode == "qlora")
    apply_lora(backbone, lora, dtype=dtype, device=device)
    for p in backbone.parameters():  # adapters train in fp32, as trainers.loops.lora keeps them
        if p.requires_grad:
            p.data = p.data.float()
    return backbone


def run_row(model: str, mode: str, px: int, batch: int, steps: int, warmup: int, ratio: float, targets: str):
    import torch
    import torch.distributed as dist

    from nuance.trainers.components import objective_from_config
    from nuance.trainers.config import ObjectiveConfig, OptimConfig
    from nuance.trainers.engine import build_engine
    from nuance.trainers.models.presets import PRESETS

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29577")
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")  # what DeepSpeed reads of a launcher
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    engine_cfg, optim = _engine_config(mode, ratio), OptimConfig(lr=1e-5)
    side = px // 8
    started = time.perf_counter()
    backbone = _backbone(model, mode, side, engine_cfg, optim, batch, device, targets)
    total = sum(getattr(p, "ds_numel", p.numel()) for p in backbone.parameters())
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in backbone.parameters() if p.requires_grad)
    engine = build_engine(
        backbone, engine_cfg, optim, micro_batch=batch, world_size=1, total_steps=10**6,
        trainable_only=mode in ("lora", "qlora"),
    )  # fmt: skip
    setup_s = time.perf_counter() - started
    tokens, width, pooled = TEXT[PRESETS[model]["family"]]
    objective = objective_from_config(ObjectiveConfig(kind="flow", shift=3.0))
    x0 = torch.randn(batch, 16, side, side, device=device)
    cond = {
        "encoder_hidden_states": torch.randn(batch, tokens, width, device=device),
        "pooled": torch.randn(batch, pooled, device=device),
    }

    def step() -> float:
        stats = engine.train_step([(x0, cond)], lambda m, b: objective.loss(m, b[0], b[1]))
        return float(stats.loss)  # waits for the step

    if cuda:
        torch.cuda.synchronize()
        weights_gib = torch.cuda.memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    losses = [step() for _ in range(steps)]
    step_s = (time.perf_counter() - start) / steps
    row = {
        "params_b": total / 1e9, "trainable_params": trainable, "text_tokens": tokens,
        "image_tokens": (side // 2) ** 2, "img_s": batch / step_s, "step_s": step_s, "setup_s": setup_s,
        "loss_first": losses[0], "loss_last": losses[-1], "engine": engine.backend,
        "optimizer": type(getattr(engine.optimizer, "optimizer", engine.optimizer)).__name__,
        "host_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "cudnn_attention": torch.backends.cuda.cudnn_sdp_enabled(),  # model.cudnn_attention=auto's choice
    }  # fmt: skip
    if cuda:
        row.update(
            weights_gib=weights_gib,
            peak_gib=torch.cuda.max_memory_allocated() / 2**30,
            reserved_gib=torch.cuda.max_memory_reserved() / 2**30,
        )
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default=None, help="model:mode:px[:batch], comma-separated")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--ratio", type=float, default=0.7, help="offload_ratio of the full_fp32 rows")
    p.add_argument("--targets", default="all", choices=sorted(TARGETS), help="LoRA / QLoRA rows' targets")
    p.add_argument("--timeout", type=int, default=420, help="seconds per row")
    p.add_argument("--smoke", action="store_true", help="tiny presets on CPU: checks the code, not a number")
    p.add_argument("--json", required=True)
    p.add_argument("--append", action="store_true")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        model, mode, px, batch = (args.worker.split(":") + ["1"])[:4]
        row = run_row(model, mode, int(px), int(batch), args.steps, args.warmup, args.ratio, args.targets)
        print(json.dumps(row), flush=True)
        os._exit(0)  # skip DeepSpeed / NCCL teardown at interpreter exit
    rows_arg = args.rows or (SMOKE_ROWS if args.smoke else DEFAULT_ROWS)
    if args.smoke:  # no partial offload on CPU: it needs DeepSpeed's CPU Adam, minutes of JIT build
        args.ratio = 1.0
    out = Path(args.json)
    results = json.loads(out.read_text()) if args.append and out.is_file() else []
    device = _device_name()
    for spec in rows_arg.split(","):
        model, mode, px, batch = (spec.split(":") + ["1"])[:4]
        row = {"model": model, "mode": mode, "px": int(px), "batch": int(batch), "device": device}
        if mode == "full_fp32":
            row["offload_ratio"] = args.ratio
        if mode in ("lora", "qlora"):
            row["targets"] = args.targets
        cmd = [sys.executable, __file__, "--worker", spec, "--json", "-", f"--steps={args.steps}",
               f"--warmup={args.warmup}", f"--ratio={args.ratio}", f"--targets={args.targets}"]  # fmt: skip
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            if proc.returncode == 0:
                row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
            else:
                tail = [line for line in proc.stderr.strip().splitlines() if line.strip()][-3:]
                row["error"] = f"exit {proc.returncode}: " + " | ".join(tail)[-600:]
                (out.parent / f"large_{model}_{mode}_{px}.stderr.txt").write_text(proc.stderr[-20000:])
        except subprocess.TimeoutExpired:
            row["error"] = f"timed out after {args.timeout} s"
        results.append(row)
        print(json.dumps(row), flush=True)
        out.write_text(json.dumps(results, indent=1))


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


if __name__ == "__main__":
    main()
