"""Multi-GPU measurements through the real CLI (`nuance train`, Ray Train, NCCL): one JSON of rows.

Each run is `nuance train` in its own process group with a timeout (a failure is a row with `error`; the
other runs go on). N = the largest count in `--gpus`.

  scaling           DiT-XL/2 at 256 px (recipes/dit_xl2_256.yaml) through stack.py's `run_train`: latent
                    shards streamed off a local SeaweedFS s3:// bucket, EMA, bf16, compile, one per-GPU
                    batch at each count of `--gpus`; img/s per GPU, data wait, `ratio` = per-GPU img/s at
                    N / at 1 GPU (this call's or the --json file's 1-GPU row). DDP at every count
                    (`--scaling-zero 0`: the 1-GPU engine), so the ratio measures scaling alone.
  zero3_large       (alias zero3_8b) the --model, `sd35_large` MMDiT (8.1B, recipes/sd35_large.yaml) or
                    `flux_dev` Flux (12B, FluxTransformer2DModel preset on the same recipe), random init,
                    full fine-tune over N GPUs: ZeRO-3 under deepspeed.zero.Init, gradient checkpointing,
                    optimizer offload only with `--offload`; a row per `--px` (512,1024). Data: synthetic
                    shards in `nuance data precompute`'s format (data/precompute.py, benchmarks/
                    multigpu_data.py): 16-channel latent mean / logvar, `mask.npy`, `text.npy` and
                    `pooled.npy` of the model's widths (SD3: 333 x 4096 = 77 CLIP + 256 T5 tokens, pooled
                    2048; Flux: 512 T5 tokens x 4096, pooled 768 = CLIP-L's); beside them a tiny random text
                    stack of exactly those widths (SD3: CLIP-L, CLIP-G, T5; Flux: CLIP-L, T5; the trainer
                    encodes "" for condition dropout) and a 16-channel VAE. `mfu_logged` = the run's MFU.
  pipeline_vs_zero  the same model with `engine.pipeline_stages=PP engine.zero_stage=1` for each PP of
                    `--pp` (default N): DP = N / PP replicas (cluster.num_workers = N), beside the ZeRO-3
                    row of the same settings (reused from this call or the --json file, else measured).
                    MMDiT and Flux have pipeline layer lists (trainers/pipeline/layers.py); a setting the
                    recipe checks refuse (`nuance recipe show`: e.g. N not a multiple of PP) is a row with
                    that one-line `error`.
  unet_scaling      SD2-base U-Net (recipes/unet_sd2_512.yaml) at 512 px (latents 4 x 64 x 64), B=32 per
                    GPU, text-conditioned on synthetic 77 x 1024 embeddings (a tiny random CLIP of that
                    width as text_encoder.path), at each count of `--gpus`, engine.zero_stage=--scaling-zero;
                    per-GPU img/s, `ratio` as scaling's, against MLPerf Training's ~127 img/s per H100
                    (`reference_img_s_per_gpu`, `vs_reference`). The recipe keeps gradient checkpointing
                    (`--extra model.gradient_checkpointing=false` for MLPerf's setting).

Row fields: run, model, gpus, config, img_s, img_s_per_gpu, peak_gib_per_gpu (max over GPUs of nvidia-smi's
used memory, sampled each second: all ranks, allocator cache included), peak_alloc_gib_rank0 (rank 0's
max_memory_allocated, metrics.jsonl), host_gib (peak summed RSS of the run's processes), data_wait_frac,
device; mfu_logged where metrics.jsonl logs `mfu`. Large-model and U-Net runs are stopped by SIGINT
after their windows (no final 100 GB checkpoint). NVLink multicast stays off: NCCL_NVLS_ENABLE=0 for
every run (the embedded Ray cluster's workers inherit it).

Device machine, repo root, after `bash benchmarks/gpu_setup.sh` (benchmarks/RESULTS.md); one run (one GPU
count for scaling) per call, as a call has 10 minutes; `--append` adds to the JSON:

  # nvidia-h100-x2 (J=$OUT/mg_h100x2.json)
  export NCCL_NVLS_ENABLE=0; python3 benchmarks/multigpu.py --gpus 1 --runs scaling --json $J
  python3 benchmarks/multigpu.py --gpus 2 --runs scaling --append --json $J
  python3 benchmarks/multigpu.py --gpus 2 --runs zero3_large --append --json $J      # --offload if OOM
  python3 benchmarks/multigpu.py --gpus 2 --runs pipeline_vs_zero --append --json $J
  python3 benchmarks/multigpu.py --gpus 2 --runs fault --append --json $J
  # nvidia-h100-x8 (J=$OUT/mg_h100x8.json), a call each (10 minutes per call):
  export NCCL_NVLS_ENABLE=0; python3 benchmarks/multigpu.py --gpus 1 --runs scaling --json $J
  python3 benchmarks/multigpu.py --gpus 2 --runs scaling --append --json $J   # then --gpus 4, --gpus 8
  python3 benchmarks/multigpu.py --gpus 8 --runs zero3_large --model flux_dev --px 512 --append --json $J
  python3 benchmarks/multigpu.py --gpus 8 --runs zero3_large --model flux_dev --px 1024 --append --json $J
  python3 benchmarks/multigpu.py --gpus 8 --runs pipeline_vs_zero --model flux_dev --px 512 --pp 2 \
      --append --json $J                                       # then --pp 4, and both again at --px 1024
  python3 benchmarks/multigpu.py --gpus 1 --runs unet_scaling --append --json $J   # then 2, 4, 8
  python3 benchmarks/multigpu.py --gpus 8 --runs zero3_large --append --json $J    # sd35_large; then
  python3 benchmarks/multigpu.py --gpus 8 --runs fault --append --json $J          # pipeline_vs_zero
  # CPU, gloo, 2 workers, tiny presets (dit_debug, mmdit_debug / flux_debug, unet_debug), 64 px:
  python3 benchmarks/multigpu.py --smoke --json /tmp/multigpu_smoke.json
  python3 benchmarks/multigpu.py --smoke --runs zero3_large,pipeline_vs_zero --model flux_dev --pp 2 --json F
  python3 benchmarks/multigpu.py --smoke --runs unet_scaling --json F
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks.* and tests.* (the tiny tokenizers)
from benchmarks.multigpu_data import (  # noqa: E402
    SMOKE_TEXT,
    TEXT,
    TEXT_OF_MODEL,
    upload_text_shards,
    write_clip_folder,
    write_text_stack,
)
from benchmarks.stack import run_train, serve, tiny_vae, write_latent_shards  # noqa: E402

CLI = [sys.executable, "-m", "nuance.orchestration.cli", "train"]
DIT_RECIPE, MMDIT_RECIPE = "recipes/dit_xl2_256.yaml", "recipes/sd35_large.yaml"
UNET_RECIPE, MLPERF_IMG_S_PER_GPU = "recipes/unet_sd2_512.yaml", 127.0  # MLPerf Training SD, per H100
# Presets by --smoke: DiT, U-Net, and the large model of each --model.
MODELS = {False: ("dit_xl2", "unet_sd2"), True: ("dit_debug", "unet_debug")}
LARGE = {"sd35_large": "mmdit_debug", "flux_dev": "flux_debug"}  # --model -> its --smoke preset
RUNS = ("scaling", "zero3_large", "pipeline_vs_zero", "fault", "unet_scaling")
ALIASES, ZERO3_RUNS = {"zero3_8b": "zero3_large"}, ("zero3_large", "zero3_8b")  # zero3_8b: earlier files
FIRST = ("run", "model", "gpus", "config", "img_s", "img_s_per_gpu", "peak_gib_per_gpu", "host_gib",
         "data_wait_frac", "device")  # fmt: skip
OPTIONS = {  # --name: (default, help)
    "runs": ("scaling,zero3_large,pipeline_vs_zero,fault", f"comma-separated, of {', '.join(RUNS)}"),
    "gpus": ("1,2", "GPU counts of scaling / unet_scaling; N = the largest"),
    "batch": (128, "DiT batch per GPU"), "train_steps": (200, "steps of a scaling run"),
    "skip_windows": (2, "log windows left out (compile, warm-up)"), "windows": (6, "measured windows"),
    "loader_workers": (8, "data.num_workers"), "peak_tflops": (989.0, "MFU peak"),
    "scaling_zero": (0, "engine.zero_stage of the scaling runs (0: DDP)"),
    "model": ("sd35_large", "large model of zero3_large / pipeline_vs_zero: sd35_large or flux_dev"),
    "px": ("1024", "image sizes of the large model, comma-separated (a row each)"),
    "pp": ("", "pipeline stages of pipeline_vs_zero, comma-separated (DP = N / PP); default N"),
    "mmdit_batch": (1, "large-model batch per micro batch"), "micro_batches": (8, "engine.micro_batches"),
    "mmdit_log_every": (2, "train.log_every (large model, U-Net)"), "text_per_shard": (32, "samples per "
    "text shard"), "unet_batch": (32, "U-Net batch per GPU"), "unet_px": (512, "U-Net image size"),
    "fault_steps": (100, "train.max_steps (fault)"), "fault_ckpt": (10, "train.ckpt_every (fault)"),
    "fault_batch": (8, "DiT batch per GPU (fault)"), "timeout": (480, "seconds per nuance train run"),
}  # fmt: skip
SMOKE = {"gpus": "1,2", "batch": 2, "train_steps": 4, "skip_windows": 1, "windows": 2, "loader_workers": 0,
         "peak_tflops": 1.0, "px": "64", "micro_batches": 2, "mmdit_log_every": 1, "text_per_shard": 8,
         "unet_batch": 2, "unet_px": 64, "fault_steps": 40, "fault_ckpt": 4, "fault_batch": 2}  # fmt: skip


def gpu_info() -> tuple[str, list[float]]:
    """(device name, used GiB per GPU) from nvidia-smi (no CUDA context in this process); cpu without."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.used", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=20,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "cpu", []
    rows = [line.rsplit(",", 1) for line in out.strip().splitlines() if "," in line]
    return (rows[0][0].strip(), [float(r[1]) / 1024 for r in rows]) if rows else ("cpu", [])


@contextlib.contextmanager
def monitor(every: float = 1.0):
    """Yields a namespace whose `host` / `gpu` become the peak summed RSS of this process' descendants (the
    SeaweedFS server left out) and the peak used memory over all GPUs, sampled every `every` seconds."""
    import psutil

    peak, done = SimpleNamespace(host=0.0, gpu=0.0), threading.Event()

    def sample() -> None:
        while not done.wait(every):
            total = 0
            for proc in psutil.Process().children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    total += proc.memory_info().rss if "weed" not in proc.name() else 0
            peak.host, peak.gpu = max(peak.host, total / 2**30), max([peak.gpu, *gpu_info()[1]])

    (thread := threading.Thread(target=sample, daemon=True)).start()
    try:
        yield peak
    finally:
        done.set()
        thread.join(30)


def metric_rows(run_dir: Path) -> list[dict]:
    path, rows = run_dir / "metrics.jsonl", []
    for line in path.read_text().splitlines() if path.is_file() else []:
        with contextlib.suppress(json.JSONDecodeError):  # the last line may be half written
            rows.append(json.loads(line))
    return rows


def summarize(rows: list[dict], skip: int, count: int, gpus: int) -> dict:
    """Medians over `count` log windows after the first `skip` (compile, warm-up); later windows (while a
    stopped run winds down) are left out."""
    rows = [r for r in rows if "img_per_s" in r][skip : skip + count]
    if not rows:
        raise RuntimeError("no measured log windows in metrics.jsonl")
    img_s, peaks = statistics.median(r["img_per_s"] for r in rows), [r.get("gpu/peak_gib") for r in rows]
    return {"img_s": img_s, "img_s_per_gpu": img_s / gpus, "windows": len(rows), "loss": rows[-1]["loss"],
            "data_wait_frac": statistics.median(r["data_wait_frac"] for r in rows),
            "peak_alloc_gib_rank0": max((p for p in peaks if p is not None), default=None),
            "mfu_logged": statistics.median(r["mfu"] for r in rows) if all("mfu" in r for r in rows)
            else None}  # fmt: skip


def launch(recipe: str, overrides: list[str], log: Path, timeout: float, until=None) -> dict:
    """`nuance train` in its own process group. `until()` is polled each 0.2 s: True stops the run with
    SIGINT (Ctrl-C); after the timeout, or 90 s after a SIGINT, it and its processes are SIGKILLed."""
    import psutil

    start = time.time()
    with monitor() as mon, open(log, "w") as out:
        proc = subprocess.Popen(
            [*CLI, str(ROOT / recipe), *overrides], stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, env={**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        stopped, deadline = False, start + timeout
        try:
            while proc.poll() is None and time.time() < deadline:
                if until is not None and not stopped and until():
                    os.killpg(proc.pid, signal.SIGINT)
                    stopped, deadline = True, min(deadline, time.time() + 90)
                time.sleep(0.2)
        finally:
            if late := proc.poll() is None:  # the run this driver started, and all its processes by pid
                tree = psutil.Process(proc.pid).children(recursive=True)  # Ray workers: own groups
                os.killpg(proc.pid, signal.SIGKILL)
                for child in tree:
                    with contextlib.suppress(psutil.Error):
                        child.kill()
                proc.wait()
    result = {"rc": proc.returncode, "stopped": stopped, "wall_s": time.time() - start}
    result.update(host_gib=mon.host, peak_gib_per_gpu=mon.gpu or None)
    if proc.returncode != 0 and not stopped:
        tail = [line for line in re.sub(r"\x1b\[[0-9;]*m", "", log.read_text()).splitlines() if line.strip()][
            -3:
        ]
        why = f"timed out after {timeout:.0f} s" if late else f"exit {proc.returncode}"
        raise RuntimeError(f"{why}: " + " | ".join(tail)[-800:])
    return result


def common(args, name: str, work: Path, n: int) -> list[str]:
    """Overrides of every run: its folder, N workers, GPU (bf16) or CPU (fp32, gloo) per --smoke."""
    device = ["cluster.use_gpu=false", "engine.precision=fp32", "engine.compile=false"]
    device = device if args.smoke else ["cluster.use_gpu=true", "engine.precision=bf16"]
    return [
        f"name={name}", f"cluster.storage_path={work / 'runs'}", f"cluster.num_workers={n}",
        f"cluster.cpus_per_worker={args.loader_workers + 2}", f"data.num_workers={args.loader_workers}",
        "tracking.mode=offline", "sample.steps=2", "sample.num_per_condition=1", *device,
    ]  # fmt: skip


def run_scaling(args, ctx, prior: list[dict]) -> list[dict]:
    """One row per GPU count (stack.run_train); `ratio` against the 1-GPU row of this call or the file's."""
    rows, config = [], f"zero{args.scaling_zero}"
    key = {"run": "scaling", "model": args.dit_model, "gpus": 1, "config": config, "batch": args.batch}
    same = [r for r in prior if {**key, "smoke": args.smoke}.items() <= r.items() and r.get("img_s")]
    base = same[-1]["img_s"] if same else None  # the latest 1-GPU row of these settings
    for n in args.gpu_counts:
        work = Path(tempfile.mkdtemp(prefix=f"mg-scaling{n}-", dir=ctx.work))
        extra = [*common(args, "stack", work, n)[2:], f"engine.zero_stage={args.scaling_zero}"]
        if args.smoke:
            extra += ["model.name=dit_debug", "train.log_every=1", "train.ckpt_every=0"]
        ns = SimpleNamespace(**{**vars(args), "extra": extra + args.extra})
        row = {"run": "scaling", "model": args.dit_model, "gpus": n, "config": config, "batch": args.batch}
        try:
            with monitor() as mon:
                measured = run_train(ns, ctx.dit_source, ctx.vae, work)
            row.update(measured, img_s_per_gpu=measured["img_s"] / n, host_gib=mon.host)
            row.update(peak_alloc_gib_rank0=row.pop("peak_gib"), peak_gib_per_gpu=mon.gpu or None)
            base = measured["img_s"] if n == 1 else base
            row["ratio"] = row["img_s_per_gpu"] / base if base else None
        except Exception as err:  # noqa: BLE001 - the row says what failed; the other counts still run
            row["error"] = str(err)[-1500:]
        rows.append(row)
    return rows


def mmdit_overrides(args, ctx, name: str, work: Path, n: int, px: int) -> list[str]:
    text = ctx.text[args.large]
    return [
        *common(args, name, work, n), f"model.name={args.large}", "model.pretrained=null",
        f"vae={ctx.text_folder}", f"text_encoder.path={ctx.text_folder}",
        f"text_encoder.t5_max_length={text['t5_tokens']}", f"data.source={ctx.sources[args.large, px]}",
        f"data.image_size={px}", "data.bucketing=false", f"data.batch_size={args.mmdit_batch}",
        f"engine.micro_batches={args.micro_batches}", "optim.warmup_steps=0", "train.max_steps=1000000",
        "train.ckpt_every=0", f"train.log_every={args.mmdit_log_every}", "sample.every=0",
        f"tracking.peak_tflops={args.peak_tflops}",
        *(["engine.offload_optimizer=true"] if args.offload else []), *args.extra,
    ]  # fmt: skip


def refusal(recipe: str, overrides: list[str]) -> str | None:
    """The one-line error `nuance recipe show` / `nuance train`'s checks give these overrides, else None."""
    from nuance.orchestration.recipe import RecipeError, load_recipe, preflight

    try:
        preflight(load_recipe(str(ROOT / recipe), overrides)[0])
    except RecipeError as err:
        return "refused: " + " ".join(str(err).split())
    return None


def measure(recipe: str, overrides: list[str], work: Path, run_dir: Path, args, n: int) -> dict:
    """A run stopped after its skipped + measured log windows: the windows' medians and launch's fields."""
    if problem := refusal(recipe, overrides):
        return {"error": problem}
    want = args.skip_windows + args.windows

    def enough() -> bool:
        return len([r for r in metric_rows(run_dir) if "img_per_s" in r]) >= want

    try:
        result = launch(recipe, overrides, work / "train.log", args.timeout, enough)
        return {**summarize(metric_rows(run_dir), args.skip_windows, args.windows, n), **result}
    except Exception as err:  # noqa: BLE001 - the row says what failed
        return {"error": str(err)[-1500:]}


def run_mmdit(args, ctx, n: int, px: int, pp: int = 0) -> dict:
    """One measured large-model run: ZeRO-3 over N GPUs (pp=0), or PP pipeline stages x DP = N / PP data-
    parallel replicas with ZeRO-1; stopped after its windows."""
    dp = n // pp if pp and n % pp == 0 else None if pp else n  # None: N not a multiple of PP (refused)
    config = f"pipeline_pp{pp}" + (f"_dp{dp}" if dp else "") if pp else "zero3"
    row = {"run": "zero3_large", "model": args.large, "gpus": n, "config": config, "px": px}
    row.update(batch=args.mmdit_batch, micro_batches=args.micro_batches, offload=args.offload)
    work = Path(tempfile.mkdtemp(prefix=f"mg-{config}-{px}-", dir=ctx.work))
    engine = ["engine.backend=deepspeed", "engine.zero_stage=3"]
    if pp:
        engine = [f"engine.pipeline_stages={pp}", "engine.zero_stage=1"]
    row.update(engine=" ".join(engine), pp=pp or None, dp=dp)
    row["global_batch"] = args.mmdit_batch * args.micro_batches * dp if dp else None
    overrides = mmdit_overrides(args, ctx, config, work, n, px) + engine
    row.update(measure(MMDIT_RECIPE, overrides, work, work / "runs" / config, args, n))
    return row


def run_unet(args, ctx, prior: list[dict]) -> list[dict]:
    """SD2-base U-Net at --unet-px over each GPU count, text-conditioned (77 x 1024 embeddings); per-GPU
    img/s against MLPerf's and `ratio` against the 1-GPU row (this call's or the file's)."""
    rows, config, text = [], f"zero{args.scaling_zero}", ctx.text["unet"]
    key = {"run": "unet_scaling", "model": args.unet_model, "config": config, "batch": args.unet_batch,
           "px": args.unet_px, "smoke": args.smoke}  # fmt: skip
    same = [r for r in prior if key.items() <= r.items() and r["gpus"] == 1 and r.get("img_s")]
    base = same[-1]["img_s"] if same else None
    for n in args.gpu_counts:
        work = Path(tempfile.mkdtemp(prefix=f"mg-unet{n}-", dir=ctx.work))
        overrides = [
            *common(args, "unet", work, n), f"model.name={args.unet_model}", f"vae={ctx.vae}",
            f"text_encoder.path={ctx.unet_text}", f"text_encoder.max_length={text['tokens']}",
            f"data.source={ctx.sources['unet', args.unet_px]}", f"data.image_size={args.unet_px}",
            "data.bucketing=false", f"data.batch_size={args.unet_batch}",
            f"engine.zero_stage={args.scaling_zero}", "optim.warmup_steps=0", "train.max_steps=1000000",
            "train.ckpt_every=0", "sample.every=0", f"train.log_every={args.mmdit_log_every}",
            f"tracking.peak_tflops={args.peak_tflops}", *args.extra,
        ]  # fmt: skip
        row = {**key, "gpus": n, "reference_img_s_per_gpu": MLPERF_IMG_S_PER_GPU}
        row.update(measure(UNET_RECIPE, overrides, work, work / "runs" / "unet", args, n))
        if row.get("img_s"):
            row["img_s_per_gpu"] = row["img_s"] / n
            base = row["img_s"] if n == 1 else base
            row["ratio"] = row["img_s_per_gpu"] / base if base else None
            row["vs_reference"] = row["img_s_per_gpu"] / MLPERF_IMG_S_PER_GPU
        rows.append(row)
    return rows


def run_fault(args, ctx) -> list[dict]:
    """SIGKILL rank 1 once checkpoint `ckpt` is registered and 2 more steps are done; check the ending."""
    n, ckpt, steps = max(args.gpu_counts), args.fault_ckpt, args.fault_steps
    work = Path(tempfile.mkdtemp(prefix="mg-fault-", dir=ctx.work))
    run_dir, killed = work / "runs" / "fault", {}
    row = {"run": "fault", "model": args.dit_model, "gpus": n, "config": f"kill@ckpt{ckpt}"}
    overrides = [
        *common(args, "fault", work, n), f"vae={ctx.vae}", f"data.source={ctx.dit_source}",
        f"model.name={args.dit_model}", "data.image_size=256", f"data.batch_size={args.fault_batch}",
        "data.log_keys=true", f"train.max_steps={steps}", f"train.ckpt_every={ckpt}", "train.log_every=1",
        "cluster.max_failures=2", "engine.compile=false", *args.extra,
    ]  # fmt: skip

    def kill_when_ready() -> bool:
        if not killed and last_step(run_dir) >= ckpt + 2 and ckpt in (done := registered(run_dir)):
            killed.update(step=last_step(run_dir), time=time.time(), last_registered=max(done))
            killed["pid"] = worker_rows(run_dir, 1)[-1]["pid"]
            os.kill(killed["pid"], signal.SIGKILL)  # a Ray worker of the run this driver started
        return False

    start = time.time()
    try:
        result = launch(DIT_RECIPE, overrides, work / "train.log", args.timeout, kill_when_ready)
    except Exception as err:  # noqa: BLE001 - the row says what failed
        return [{**row, "error": str(err)[-1500:], "killed_at_step": killed.get("step")}]
    restarts, log = worker_rows(run_dir, 1), (work / "train.log").read_text()
    resumed = [int(m) for m in re.findall(r"resumed from \S+ at step (\d+)", log)]
    final = last_step(run_dir)
    checks = {
        "run_succeeded": not result["rc"], "killed": bool(killed), "same_final_step": final == steps,
        "restarted_from_checkpoint": len(restarts) == 2 and bool(restarts[-1]["resume_from"]),
        "resumed_from_last_checkpoint": bool(resumed) and resumed[-1] >= killed.get("last_registered", steps),
        **exactly_once(run_dir, n, steps),
    }  # fmt: skip
    row.update(checks, passed=all(checks.values()), final_step=final, max_steps=steps)
    row.update(killed_at_step=killed.get("step"), last_registered_at_kill=killed.get("last_registered"))
    row.update(resumed_at_step=resumed[-1] if resumed else None, total_s=result["wall_s"])
    if killed:
        row.update(kill_after_s=killed["time"] - start, end_after_s=start + result["wall_s"] - killed["time"])
        row["restart_s"] = restarts[-1]["time"] - killed["time"] if len(restarts) == 2 else None
    return [{**row, "host_gib": result["host_gib"], "peak_gib_per_gpu": result["peak_gib_per_gpu"]}]


def last_step(run_dir: Path) -> int:
    rows = metric_rows(run_dir)
    return rows[-1]["step"] if rows else 0


def registered(run_dir: Path) -> list[int]:
    """Steps of the checkpoints Ray Train's controller has registered (only those are restored)."""
    path = run_dir / "checkpoint_manager_snapshot.json"
    return [int(m) for m in re.findall(r'"step_(\d{8})"', path.read_text())] if path.is_file() else []


def worker_rows(run_dir: Path, rank: int) -> list[dict]:
    path = run_dir / "workers" / f"rank{rank:05d}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def exactly_once(run_dir: Path, ranks: int, steps: int) -> dict:
    """Each rank's surviving trajectory (a replayed step's later entry wins) has every step once, and no
    sample key twice, within a rank or across ranks."""
    every_step, within, keys = True, True, []
    for rank in range(ranks):
        lines = (run_dir / "keys" / f"rank{rank:05d}.jsonl").read_text().splitlines()
        by_step = {e["step"]: e["keys"] for e in map(json.loads, lines)}
        every_step &= sorted(by_step) == list(range(1, steps + 1))
        mine = [k for s in sorted(by_step) for k in by_step[s]]
        within &= len(mine) == len(set(mine))
        keys += mine
    unique = len(keys) == len(set(keys))
    return {"every_step_once": every_step, "no_sample_twice_in_rank": within, "no_sample_twice": unique}


def prepare(args, runs: list[str], work: Path):
    """Shards on the local S3 server, the tiny VAE and text stacks; returns (server, context)."""
    specs = SMOKE_TEXT if args.smoke else TEXT
    ctx = SimpleNamespace(work=work, vae=tiny_vae(work / "vae"), sources={})
    ctx.text = {args.large: specs[TEXT_OF_MODEL[args.large]], "unet": specs["sd2"]}
    fault_samples = args.fault_steps * args.fault_batch * max(args.gpu_counts)  # one epoch: keys unique
    per_shard = max(16 if args.smoke else 256, args.batch * 4, fault_samples // 16 + 1)
    write_latent_shards(work / "dit", shards=16, per_shard=per_shard)
    server, ctx.dit_source = serve(work / "dit", work)
    shards = max(8, max(args.gpu_counts))
    if {"zero3_large", "pipeline_vs_zero"} & set(runs):
        for px in args.px_list:
            name = f"text-{args.large}-{px}"
            ctx.sources[args.large, px] = upload_text_shards(
                work, name, shards, args.text_per_shard, px // 8, ctx.text[args.large]
            )
        ctx.text_folder = write_text_stack(work / ctx.text[args.large]["stack"], ctx.text[args.large])
    if "unet_scaling" in runs:
        per = max(args.text_per_shard, args.unet_batch * 4)
        ctx.sources["unet", args.unet_px] = upload_text_shards(
            work, "text-unet", 2 * shards, per, args.unet_px // 8, ctx.text["unet"]
        )
        ctx.unet_text = write_clip_folder(work / "sd2-text", ctx.text["unet"])
    return server, ctx


def run_all(args, ctx, runs: list[str], results: list[dict], add) -> None:
    """Each run in turn; an unexpected error becomes that run's row. pipeline_vs_zero's ZeRO-3 row is the
    last zero3_large (or zero3_8b) row of the same settings (this call's or the --json file's), else a
    new run."""
    n = max(args.gpu_counts)
    for name in runs:
        try:
            if name == "scaling":
                rows = run_scaling(args, ctx, results)
            elif name == "unet_scaling":
                rows = run_unet(args, ctx, results)
            elif name == "zero3_large":
                rows = [run_mmdit(args, ctx, n, px) for px in args.px_list]
            elif name == "fault":
                rows = run_fault(args, ctx)
            else:
                rows = [r for px in args.px_list for r in pipeline_rows(args, ctx, results, n, px)]
            rows = [{**r, "run": name} for r in rows]
        except Exception as err:  # noqa: BLE001 - never end the driver: the row says what failed
            error = f"{type(err).__name__}: {err}"
            rows = [{"run": name, "model": "-", "gpus": n, "config": "-", "error": error}]
        for row in rows:
            add(row)


def pipeline_rows(args, ctx, results: list[dict], n: int, px: int) -> list[dict]:
    """A row per --pp (DP = N / PP), then the ZeRO-3 row of the same settings: reused, else measured."""
    pipes = [run_mmdit(args, ctx, n, px, pp) for pp in args.pp_list]
    same = {"model": args.large, "gpus": n, "px": px, "batch": args.mmdit_batch, "config": "zero3",
            "micro_batches": args.micro_batches, "offload": args.offload, "smoke": args.smoke}  # fmt: skip
    done = [r for r in results if r["run"] in ZERO3_RUNS and same.items() <= r.items()]
    zero3 = {**done[-1], "reused": True} if done and "error" not in done[-1] else None
    return [*pipes, zero3 or run_mmdit(args, ctx, n, px)]


def parse(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name, (default, text) in OPTIONS.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default, help=text)
    for flag, text in (("--smoke", "CPU, gloo, tiny presets, 2 workers"), ("--offload", "ZeRO-3 offloads the "
                       "optimizer"), ("--append", "add to the --json file's rows")):  # fmt: skip
        p.add_argument(flag, action="store_true", help=text)
    p.add_argument("--extra", nargs="*", default=[], help="more `nuance train` overrides for every run")
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)
    if args.smoke:  # minimal CPU work: a plumbing check, not a number
        vars(args).update(SMOKE)
    args.gpu_counts = sorted({int(g) for g in args.gpus.split(",")})
    args.px_list = [int(px) for px in args.px.split(",")]
    args.dit_model, args.unet_model = MODELS[args.smoke]
    args.large = LARGE[args.model] if args.smoke and args.model in LARGE else args.model
    n, args.run_list = max(args.gpu_counts), [ALIASES.get(r, r) for r in args.runs.split(",")]
    args.pp_list = [int(pp) for pp in args.pp.split(",")] if args.pp else [n]
    if args.model not in LARGE:
        p.error(f"--model: one of {', '.join(LARGE)}")
    if set(args.run_list) - set(RUNS) or n < 2 and {"fault", "pipeline_vs_zero"} & set(args.run_list):
        p.error(f"--runs: of {', '.join(RUNS)}; fault and pipeline_vs_zero need N >= 2 in --gpus")
    if min(args.pp_list) < 1:
        p.error("--pp: pipeline stages >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    os.environ["NCCL_NVLS_ENABLE"] = "0"  # NVLink multicast off, in every run and its Ray workers
    runs, out = args.run_list, Path(args.json)
    results = json.loads(out.read_text()) if args.append and out.is_file() else []
    device = gpu_info()[0]

    def add(row: dict) -> None:
        row = {"device": device, "smoke": args.smoke, **row}
        row = {k: None if isinstance(v, float) and v != v else v for k, v in row.items()}  # NaN: no value
        row.setdefault("img_s_per_gpu", row["img_s"] / row["gpus"] if row.get("img_s") else None)
        row = {**dict.fromkeys(FIRST), **row}  # every row has these, first
        results.append(row)
        print(json.dumps(row), flush=True)
        out.write_text(json.dumps(results, indent=1))

    try:
        server, ctx = prepare(args, runs, Path(tempfile.mkdtemp(prefix="nuance-multigpu-")))
    except Exception as err:  # noqa: BLE001 - no run can start: each says why
        for name in runs:
            add({"run": name, "model": "-", "gpus": 0, "config": "-", "error": f"prepare: {err}"})
        return
    try:
        run_all(args, ctx, runs, results, add)
    finally:
        server.stop()
    print(table(results))


def table(rows: list[dict]) -> str:
    cols = [("img_s", "7.1f"), ("img_s_per_gpu", "6.1f"), ("ratio", "5.2f"), ("peak_gib_per_gpu", "7.1f"),
            ("host_gib", "8.1f"), ("data_wait_frac", "5.1%")]  # fmt: skip
    lines = ["run              config            gpus   img/s   /gpu ratio GiB/gpu host GiB  wait  note"]
    for r in rows:
        cells = [format(r[k], f) if isinstance(r.get(k), (int, float)) else "-" for k, f in cols]
        body = " ".join(c.rjust(int(f.split(".")[0])) for c, (_, f) in zip(cells, cols))
        note = (r.get("error") or "")[:60] or (f"passed={r['passed']}" if "passed" in r else "")
        lines.append(f"{r['run']:<16} {r['config'][:17]:<17} {r['gpus']:>4} {body}  {note}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
