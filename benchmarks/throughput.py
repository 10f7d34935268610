"""Training-throughput benchmark: nuance's DeepSpeed engine vs. a plain PyTorch loop, same backbone.

For one preset / latent size / batch size it measures, per config:
  img/s          batch / median wall time of one optimizer step (torch.cuda.synchronize around each
                 step), over --steps timed steps after --warmup untimed ones
  peak GiB       torch.cuda.max_memory_allocated, over the timed steps ("peak_timed") and over the
                 whole config incl. warm-up / compilation ("peak_all"); every config runs in its own
                 subprocess, so nothing carries over between configs
  GFLOP/img      trainers.tracking.train_flops_per_sample (FlopCounterMode, forward+backward of the
                 objective's loss) on a small batch of the same model
  MFU            GFLOP/img x img/s / peak (989 TFLOP/s dense bf16 for H100/H200)

Configs (--configs, comma separated):
  engine_eager    trainers.engine.TrainEngine, bf16, ZeRO stage 1 (DeepSpeed's ZeRO optimizer over
                  flat fp32 partitions wrapping torch's fused AdamW; with ZeRO 0 + bf16 DeepSpeed falls
                  back to its slow unfused wrapper), gradient clipping 1.0 (the OptimConfig default)
  engine_compile  the same with EngineConfig(compile=True) (DeepSpeedEngine.compile -> inductor)
  plain_eager     fp32 weights, torch.autocast(bf16), torch.optim.AdamW(fused=True), clip_grad_norm_(1.0)
  plain_compile   the same with the backbone wrapped in torch.compile
  lora, qlora, progressive, adversarial
                  the step of that recipe kind on TrainEngine, like engine_eager (see KindStep); compare
                  them with engine_eager at the same --zero-stage and batch (full fine-tune = pretraining
                  step). `resident GiB` = memory allocated between steps (weights, kept gradients,
                  optimizer state; no activations)
All configs run the same loss: build_objective("eps").loss(model, x0, cond) on random latents
x0 ~ N(0, I) of shape (B, 4, S, S); DiT: class labels in [0, 1000); U-Net / PixArt:
encoder_hidden_states ~ N(0, I) of shape (B, 77, 1024) with an all-ones attention mask.

GPU (device machine, repo root; `.gpuwheels` carried), exactly as run for benchmarks/RESULTS.md:
  export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0; set -o pipefail; bash benchmarks/gpu_setup.sh && \
  python3 benchmarks/throughput.py --preset dit_xl2 --latent 32 --batch 128 --config-timeout 210 \
    --json $OUT/dit_xl2.json 2>&1 | tee $OUT/log.txt
  python3 benchmarks/throughput.py --preset unet_sd2 --latent 64 --batch 32 --config-timeout 230 \
    --json $OUT/unet_sd2.json 2>&1 | tee $OUT/log.txt
Fine-tuning and distillation step costs (issue #5), one call per model:
  python3 benchmarks/throughput.py --preset dit_xl2 --latent 32 --batch 64 --zero-stage 2 \
    --configs engine_eager,lora,qlora,progressive,adversarial --json $OUT/kinds_dit.json
  python3 benchmarks/throughput.py --preset unet_sd2 --latent 64 --batch 16 --zero-stage 2 \
    --configs engine_eager,lora,qlora,progressive,adversarial --json $OUT/kinds_unet.json
Add `--configs engine_eager,plain_eager --breakdown 5` for per-phase times (forward / backward /
optimizer, synced) and a 2-step torch.profiler table.

CPU smoke test (gloo, tiny presets; bf16 autocast on CPU):
  python3 benchmarks/throughput.py --preset dit_debug --latent 8 --batch 2 --warmup 1 --steps 2 \
    --configs engine_eager,plain_eager,lora,qlora,progressive,adversarial
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ALL_CONFIGS = ("engine_eager", "plain_eager", "plain_compile", "engine_compile")
# Recipe-kind steps, all on TrainEngine (bf16, --zero-stage) like engine_eager, the pretraining step.
KIND_CONFIGS = ("lora", "qlora", "progressive", "adversarial")
CONFIGS = ALL_CONFIGS + KIND_CONFIGS
TEXT_TOKENS, TEXT_DIM = 77, 1024
DEFAULT_PEAK_TFLOPS = 989.0  # H100 / H200 SXM dense bf16


# ----------------------------------------------------------------------------------------------- worker


def _init_dist(port: int, use_cuda: bool):
    import torch
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
    )
    if use_cuda:
        torch.cuda.set_device(0)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", rank=0, world_size=1)


def _make_inputs(family: str, batch: int, latent: int, device):
    import torch

    x0 = torch.randn(batch, 4, latent, latent, device=device)
    if family == "dit":
        cond = {"class_labels": torch.randint(0, 1000, (batch,), device=device)}
    else:
        cond = {
            "encoder_hidden_states": torch.randn(batch, TEXT_TOKENS, TEXT_DIM, device=device),
            "encoder_attention_mask": torch.ones(batch, TEXT_TOKENS, device=device),
        }
    return {"x0": x0, "cond": cond}


def _sync(use_cuda: bool):
    import torch

    if use_cuda:
        torch.cuda.synchronize()


class KindStep:
    """The training step of a recipe kind on the benchmark's random batch, built from the same pieces
    its loop uses (trainers/loops/*.py) minus the data stream, checkpoints and logging:

      lora / qlora   peft adapters (rank --lora-rank, alpha = rank, the family's default target
                     modules) on a frozen base, bf16 / NF4 base (trainers.lora.apply_lora); the
                     pretraining eps loss
      progressive    Salimans & Ho Algorithm 2: a bf16 frozen teacher (copy of the student) takes 2
                     DDIM steps per student step (every round costs the same), v-prediction student
      adversarial    SDXL-Lightning: the teacher takes --adv-teacher-steps / --adv-student-steps DDIM
                     steps per student step, L_G through the frozen discriminator + the MSE term
                     (weight 1, as recipes/distill/adversarial_unet_sdxl.yaml), then the discriminator
                     (a second TrainEngine, encoder = trainable copy of the teacher's) takes its step
    """

    def __init__(self, args, config: str, model, device):
        import copy

        import torch

        from nuance.trainers import distill
        from nuance.trainers.diffusion import build_objective
        from nuance.trainers.diffusion.objectives import DDPMObjective

        self.config, self.after_step = config, lambda: None
        self.info: dict = {}
        if config in ("lora", "qlora"):
            from nuance.trainers.config import LoraConfig
            from nuance.trainers.lora import apply_lora, compute_dtype

            cfg = LoraConfig(
                rank=args.lora_rank, alpha=float(args.lora_rank), quantize_base=config == "qlora"
            )
            self.dtype = compute_dtype(args.precision)
            adapted = apply_lora(model, cfg, dtype=self.dtype, device=device)
            self.info.update(
                lora_rank=cfg.rank,
                lora_modules=len(adapted),
                trainable_M=sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6,
            )
            self.objective = build_objective("eps")
            self.loss = lambda module, b: self.objective.loss(module, b["x0"], b["cond"])
            return
        prediction = "v" if config == "progressive" else "x0"
        self.objective = build_objective(prediction)
        frozen_copy = copy.deepcopy(model).to(torch.bfloat16)
        teacher = distill.Teacher(frozen_copy, DDPMObjective(self.objective.schedule, prediction), rank=0)
        if config == "progressive":
            grids = distill.nested_grids(self.objective.schedule, 4, 8)

            def loss(module, b):
                tr = distill.student_transition(
                    module, teacher, self.objective, b["x0"], b["cond"], grids, n=2
                )
                return distill.transition_loss(tr, "truncated_snr")

            self.loss = loss
            self.info.update(teacher_passes_per_step=2)
            return
        from nuance.trainers.discriminator import Discriminator
        from nuance.trainers.loops.adversarial import LightningLosses

        n = args.adv_teacher_steps // args.adv_student_steps
        grids = distill.nested_grids(self.objective.schedule, args.adv_student_steps, args.adv_teacher_steps)
        self.disc = Discriminator.from_teacher(teacher.backbone).float()
        self.losses = LightningLosses(teacher, self.objective, grids, n, 1.0, "truncated_snr")
        self.disc_module = self.disc  # the plain module until attach() hands it to its engine
        self.loss = lambda module, b: self.losses.generator(module, self.disc_module, b["x0"], b["cond"])
        self.info.update(
            teacher_passes_per_step=n,
            disc_params_M=sum(p.numel() for p in self.disc.parameters()) / 1e6,
        )

    def reset(self) -> None:
        """Drop what the FLOP-counting pass left (the adversarial pending transitions)."""
        if self.config == "adversarial":
            self.losses.pending.clear()

    def attach(self, engine, make_engine) -> None:
        """After the student's engine exists: QLoRA's NF4 check; the discriminator's own engine."""
        if self.config == "qlora":
            from nuance.trainers.lora import check_quantized_base

            self.info["nf4_layers"] = check_quantized_base(engine.module, self.dtype)
        if self.config == "adversarial":
            disc_engine = make_engine(self.disc, lr=1e-5)
            self.disc_module = disc_engine.module
            self.after_step = lambda: self.losses.discriminator_step(disc_engine)


def run_worker(args, config: str, result_path: str) -> None:
    import torch

    from nuance.trainers.config import EngineConfig, ModelConfig, OptimConfig
    from nuance.trainers.diffusion import build_objective
    from nuance.trainers.models.backbone import build_backbone
    from nuance.trainers.models.presets import preset_family
    from nuance.trainers.tracking import PEAK_TFLOPS, train_flops_per_sample, zero_grads

    use_cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
    _init_dist(args.port + CONFIGS.index(config), use_cuda)
    torch.manual_seed(args.seed)
    res: dict = {
        "config": config,
        "preset": args.preset,
        "latent": args.latent,
        "batch": args.batch,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if use_cuda else "cpu",
    }
    peak_tflops = DEFAULT_PEAK_TFLOPS
    if use_cuda:
        name = torch.cuda.get_device_name(0)
        peak_tflops = next((v for k, v in PEAK_TFLOPS.items() if k in name), DEFAULT_PEAK_TFLOPS)
    peak_tflops = args.peak_tflops or peak_tflops
    res["peak_tflops"] = peak_tflops
    autocast_dev = "cuda" if use_cuda else "cpu"

    family = preset_family(args.preset)
    cond_dim = None if family == "dit" else TEXT_DIM
    t0 = time.perf_counter()
    # Initialise directly on the device (random weights; init cost only); QLoRA's base is built on the
    # CPU and quantized layer by layer onto the device, as the lora loop does.
    with torch.device("cpu" if config == "qlora" else device):
        model = build_backbone(
            ModelConfig(name=args.preset), in_channels=4, sample_size=args.latent, cond_dim=cond_dim
        )
    res["params_M"] = sum(p.numel() for p in model.parameters()) / 1e6
    res["build_s"] = time.perf_counter() - t0
    batch = _make_inputs(family, args.batch, args.latent, device)
    kind = KindStep(args, config, model, device) if config in KIND_CONFIGS else None
    objective = build_objective("eps")

    def loss_fn(module, b):
        if kind:
            return kind.loss(module, b)
        return objective.loss(module, b["x0"], b["cond"])

    # FLOPs per image: forward+backward of the same loss on a small batch, fp32 weights + bf16 autocast
    # (the op set is the same for the engine's bf16 weights; FlopCounterMode counts by shape). LoRA: no
    # weight gradients of the frozen base; distillation: the teacher's forwards are included.
    small = _make_inputs(family, args.flops_batch, args.latent, device)

    def small_loss():
        with torch.autocast(autocast_dev, torch.bfloat16):
            return loss_fn(model, small)

    res["gflop_per_img"] = train_flops_per_sample(small_loss, args.flops_batch) / 1e9
    zero_grads(model)
    if kind:
        kind.reset()

    if config.startswith("engine") or kind:
        from nuance.trainers.engine import TrainEngine

        def make_engine(module, lr=1e-4):
            return TrainEngine(
                module,
                EngineConfig(
                    zero_stage=args.zero_stage, precision=args.precision, compile=config == "engine_compile"
                ),
                OptimConfig(lr=lr, grad_clip=args.grad_clip),
                micro_batch=args.batch,
                world_size=1,
                total_steps=10_000,
            )

        engine = make_engine(model)
        if kind:
            kind.attach(engine, make_engine)
            res.update(kind.info)
        res["ds_optimizer"] = type(engine.optimizer).__name__
        inner = getattr(engine.optimizer, "optimizer", None)
        res["inner_optimizer"] = type(inner).__name__ if inner is not None else None
        if inner is not None and hasattr(inner, "defaults"):
            res["inner_fused"] = inner.defaults.get("fused")
        res["param_dtype"] = str(next(engine.module.parameters()).dtype)
        res["zero_stage"] = args.zero_stage
        import deepspeed

        res["deepspeed"] = deepspeed.__version__
        print(
            f"[{config}] DeepSpeed optimizer: {res['ds_optimizer']} wrapping {res['inner_optimizer']} "
            f"(fused={res.get('inner_fused')}); params {res['param_dtype']}",
            flush=True,
        )

        def step():
            stats = engine.train_step([batch], loss_fn)
            if kind:
                kind.after_step()
            return stats.loss

        def step_phases():  # engine.train_step's body, with a sync after every phase
            loss = timed("fwd", lambda: loss_fn(engine.ds, batch))
            timed("bwd", lambda: engine.ds.backward(loss))
            timed("step", lambda: engine.ds.step())
            timed("stats", lambda: (float(loss.detach()), engine.ds.get_global_grad_norm()))
    else:
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, fused=True if use_cuda else None)
        fwd = torch.compile(model) if config == "plain_compile" else model
        res["ds_optimizer"] = None
        res["param_dtype"] = str(next(model.parameters()).dtype)

        def step():
            with torch.autocast(autocast_dev, torch.bfloat16):
                loss = loss_fn(fwd, batch)
            loss.backward()
            if args.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, args.grad_clip, foreach=True)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        def step_phases():
            def fwd():
                with torch.autocast(autocast_dev, torch.bfloat16):
                    return loss_fn(fwd_model, batch)

            loss = timed("fwd", fwd)
            timed("bwd", loss.backward)
            if args.grad_clip:
                timed("clip", lambda: torch.nn.utils.clip_grad_norm_(params, args.grad_clip, foreach=True))
            timed("step", lambda: (opt.step(), opt.zero_grad(set_to_none=True)))
            timed("stats", lambda: float(loss.detach()))

        fwd_model = fwd

    phase_times: dict[str, list[float]] = {}

    def timed(name, fn):
        _sync(use_cuda)
        t0 = time.perf_counter()
        out = fn()
        _sync(use_cuda)
        phase_times.setdefault(name, []).append(time.perf_counter() - t0)
        return out

    import diffusers

    res["diffusers"] = diffusers.__version__
    if use_cuda:
        torch.cuda.reset_peak_memory_stats()
    warm = []
    for _ in range(args.warmup):
        _sync(use_cuda)
        t0 = time.perf_counter()
        loss = step()
        _sync(use_cuda)
        warm.append(time.perf_counter() - t0)
        print(f"[{config}] warm-up step {len(warm)}: {warm[-1]:.2f} s loss {float(loss):.4f}", flush=True)
    res["warmup_step_s"] = warm
    if use_cuda:  # between steps: weights, gradients kept, optimizer state (no activations)
        res["resident_gib"] = torch.cuda.memory_allocated() / 2**30
        res["peak_all_gib"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        _sync(use_cuda)
        t0 = time.perf_counter()
        loss = step()
        _sync(use_cuda)
        times.append(time.perf_counter() - t0)
    res["final_loss"] = float(loss)
    res["step_s"] = times
    res["median_step_s"] = statistics.median(times)
    res["img_s"] = args.batch / res["median_step_s"]
    res["img_s_mean"] = args.batch * len(times) / sum(times)
    if use_cuda:
        res["peak_timed_gib"] = torch.cuda.max_memory_allocated() / 2**30
        res["peak_all_gib"] = max(res["peak_all_gib"], res["peak_timed_gib"])
    res["mfu"] = res["gflop_per_img"] * 1e9 * res["img_s"] / (peak_tflops * 1e12)
    if args.breakdown and not kind:
        for _ in range(args.breakdown):
            step_phases()
        res["phase_median_ms"] = {k: 1e3 * statistics.median(v) for k, v in phase_times.items()}
        print(
            f"[{config}] phases (median ms, synced): "
            + ", ".join(f"{k} {v:.1f}" for k, v in res["phase_median_ms"].items()),
            flush=True,
        )
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if use_cuda else [])
        with profile(activities=acts) as prof:
            for _ in range(2):
                step()
            _sync(use_cuda)
        sort = "self_cuda_time_total" if use_cuda else "self_cpu_time_total"
        res["profile_top"] = prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=60)
        print(res["profile_top"], flush=True)
    res["ok"] = True
    Path(result_path).write_text(json.dumps(res, indent=1))
    print(
        f"[{config}] {res['img_s']:.1f} img/s (median of {len(times)}, min {min(times):.3f} s, "
        f"max {max(times):.3f} s), MFU {100 * res['mfu']:.1f}%, peak {res.get('peak_timed_gib', 0):.1f} GiB",
        flush=True,
    )
    import torch.distributed as dist

    dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------- driver


def run_config(args, config: str) -> dict:
    """One config in a fresh subprocess (clean memory, clean dynamo state, failure isolation, timeout)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_path = f.name
    Path(result_path).unlink()
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        *args.argv,
        "--_worker",
        config,
        "--_result",
        result_path,
    ]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    tail: list[str] = []
    timed_out = False

    def kill():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the process group of the child we started

    deadline = t0 + args.config_timeout
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    while True:
        if time.perf_counter() > deadline:
            timed_out = True
            kill()
            break
        if sel.select(timeout=1.0):
            line = proc.stdout.readline()
            if not line:
                break
            sys.stdout.write(line)
            sys.stdout.flush()
            tail = (tail + [line.rstrip()])[-25:]
    proc.wait()
    wall = time.perf_counter() - t0
    if os.path.exists(result_path):
        res = json.loads(Path(result_path).read_text())
        os.unlink(result_path)
    else:
        res = {
            "config": config,
            "ok": False,
            "returncode": proc.returncode,
            "timed_out": timed_out,
            "error_tail": tail,
        }
    res["wall_s"] = wall
    return res


def table(results: list[dict], model: str) -> str:
    rows = [
        "| model | config | img/s | peak GiB (timed / all) | resident GiB | GFLOP/img | MFU | first step s "
        "| optimizer |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        if not r.get("ok"):
            why = "timed out" if r.get("timed_out") else f"failed (rc {r.get('returncode')})"
            rows.append(f"| {model} | {r['config']} | {why} after {r['wall_s']:.0f} s | | | | | | |")
            continue
        peak = f"{r['peak_timed_gib']:.1f} / {r['peak_all_gib']:.1f}" if "peak_timed_gib" in r else "-"
        resident = f"{r['resident_gib']:.1f}" if "resident_gib" in r else "-"
        opt = r.get("ds_optimizer") or "torch AdamW(fused)"
        rows.append(
            f"| {model} | {r['config']} | {r['img_s']:.1f} | {peak} | {resident} | "
            f"{r['gflop_per_img']:.1f} | {100 * r['mfu']:.1f}% | {r['warmup_step_s'][0]:.1f} | {opt} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="dit_xl2")
    p.add_argument("--latent", type=int, default=32, help="latent side S (image side / 8)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--configs", default=",".join(ALL_CONFIGS))
    p.add_argument("--warmup", type=int, default=6)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--flops-batch", type=int, default=4)
    p.add_argument("--zero-stage", type=int, default=1)
    p.add_argument("--lora-rank", type=int, default=32, help="lora / qlora configs")
    p.add_argument("--adv-teacher-steps", type=int, default=32, help="adversarial config")
    p.add_argument("--adv-student-steps", type=int, default=4, help="adversarial config")
    p.add_argument("--precision", default="bf16")
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--port", type=int, default=29512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--breakdown",
        type=int,
        default=0,
        help="extra steps with a sync after each phase, then a 2-step profile",
    )
    p.add_argument(
        "--config-timeout", type=float, default=300.0, help="seconds per config before it is killed"
    )
    p.add_argument("--json", default=None, help="write all results here (rewritten after every config)")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args._worker:
        try:
            run_worker(args, args._worker, args._result)
        except BaseException:
            traceback.print_exc()
            sys.stdout.flush()
            os._exit(1)
        sys.stdout.flush()
        os._exit(0)  # skip interpreter teardown (DeepSpeed / inductor atexit hooks)

    args.argv = [a for a in argv]
    configs = [c for c in args.configs.split(",") if c]
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        p.error(f"unknown configs {sorted(unknown)}; choose from {CONFIGS}")
    results = []
    for config in configs:
        print(f"=== {args.preset} latent {args.latent} batch {args.batch}: {config}", flush=True)
        res = run_config(args, config)
        results.append(res)
        if not res.get("ok"):
            print(
                f"=== {config} FAILED after {res['wall_s']:.0f} s (timed_out={res.get('timed_out')})",
                flush=True,
            )
        if args.json:
            Path(args.json).write_text(
                json.dumps(
                    {"args": {k: v for k, v in vars(args).items() if k != "argv"}, "results": results},
                    indent=1,
                )
            )
    print()
    dev = next((r["device"] for r in results if r.get("device")), "?")
    print(f"device: {dev}")
    print(table(results, f"{args.preset} S={args.latent} B={args.batch}"))


if __name__ == "__main__":
    main()
