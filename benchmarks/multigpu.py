"""Multi-GPU measurements through the real CLI (`nuance train`, Ray Train, NCCL): one JSON of rows.

Each run is `nuance train` in its own process group with a timeout (a failure is a row with `error`; the
other runs go on). N = the largest count in `--gpus`.

  scaling           DiT-XL/2 at 256 px (recipes/dit_xl2_256.yaml) through stack.py's `run_train`: latent
                    shards streamed off a local SeaweedFS s3:// bucket, EMA, bf16, compile, one per-GPU
                    batch at each count of `--gpus`; img/s per GPU, data wait, `ratio` = per-GPU img/s at
                    N / at 1 GPU (this call's or the --json file's 1-GPU row). DDP at every count
                    (`--scaling-zero 0`: the 1-GPU engine), so the ratio measures scaling alone.
  zero3_8b          `sd35_large` MMDiT (8.1B, random init, recipes/sd35_large.yaml) full fine-tune over N
                    GPUs: ZeRO-3 under deepspeed.zero.Init, gradient checkpointing, optimizer offload only
                    with `--offload`. Data: synthetic shards in `nuance data precompute`'s format
                    (data/precompute.py): 16-channel latent mean / logvar, `text.npy` 333 x 4096 (77 CLIP +
                    256 T5 tokens), `mask.npy`, `pooled.npy` 2048; beside them a tiny random SD3 text stack
                    of exactly those widths (the trainer encodes "" for condition dropout), 16-channel VAE.
  pipeline_vs_zero  the same model with `engine.pipeline_stages=N engine.zero_stage=1` (DP = 1; MMDiT has
                    a pipeline layer list, trainers/pipeline/layers.py) beside the ZeRO-3 row.
  fault             DiT over N GPUs; once checkpoint `--fault-ckpt` is registered and 2 more steps done,
                    rank 1's worker is SIGKILLed (as tests/test_cluster.py does). Checks, each a field and
                    all in `passed`: the run ends OK at the same final step, rank 1 restarted from the last
                    registered checkpoint (or a later one), every step once per rank, no sample trained
                    twice (within and across ranks); kill / restart / end times.

Row fields: run, model, gpus, config, img_s, img_s_per_gpu, peak_gib_per_gpu (max over GPUs of nvidia-smi's
used memory, sampled each second: all ranks, allocator cache included), peak_alloc_gib_rank0 (rank 0's
max_memory_allocated, metrics.jsonl), host_gib (peak summed RSS of the run's processes), data_wait_frac,
device. MMDiT runs are stopped by SIGINT after their windows (no final 100 GB checkpoint). NVLink multicast
stays off: NCCL_NVLS_ENABLE=0 for every run (the embedded Ray cluster's workers inherit it).

Device machine, repo root, after `bash benchmarks/gpu_setup.sh` (benchmarks/RESULTS.md); one run (one GPU
count for scaling) per call, as a call has 10 minutes; `--append` adds to the JSON:

  # nvidia-h100-x2 (J=$OUT/mg_h100x2.json)
  export NCCL_NVLS_ENABLE=0; python3 benchmarks/multigpu.py --gpus 1 --runs scaling --json $J
  python3 benchmarks/multigpu.py --gpus 2 --runs scaling --append --json $J
  python3 benchmarks/multigpu.py --gpus 2 --runs zero3_8b --append --json $J      # --offload if OOM
  python3 benchmarks/multigpu.py --gpus 2 --runs pipeline_vs_zero --append --json $J
  python3 benchmarks/multigpu.py --gpus 2 --runs fault --append --json $J
  # nvidia-h100-x8 (J=$OUT/mg_h100x8.json): scaling with --gpus 1, 2, 4 and 8 (a call each), then
  # zero3_8b, pipeline_vs_zero and fault as above with --gpus 8
  python3 benchmarks/multigpu.py --smoke --json /tmp/multigpu_smoke.json   # CPU, gloo, tiny presets
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
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT)]
from stack import run_train, serve, tiny_vae, write_latent_shards  # noqa: E402

CLI = [sys.executable, "-m", "nuance.orchestration.cli", "train"]
DIT_RECIPE, MMDIT_RECIPE = "recipes/dit_xl2_256.yaml", "recipes/sd35_large.yaml"
MODELS = {False: ("dit_xl2", "sd35_large"), True: ("dit_debug", "mmdit_debug")}  # by --smoke
RUNS = ("scaling", "zero3_8b", "pipeline_vs_zero", "fault")
FIRST = ("run", "model", "gpus", "config", "img_s", "img_s_per_gpu", "peak_gib_per_gpu", "host_gib",
         "data_wait_frac", "device")  # fmt: skip
# SD3's text stack: CLIP-L / CLIP-G projections (pooled 768 + 1280), T5-XXL width, T5 tokens (77 + 256).
SD3_TEXT = {"clip_proj": (768, 1280), "t5_width": 4096, "t5_tokens": 256}
SMOKE_TEXT = {"clip_proj": (6, 10), "t5_width": 32, "t5_tokens": 8}
OPTIONS = {  # --name: (default, help)
    "runs": (",".join(RUNS), "comma-separated"), "gpus": ("1,2", "GPU counts of scaling; N = the largest"),
    "batch": (128, "DiT batch per GPU"), "train_steps": (200, "steps of a scaling run"),
    "skip_windows": (2, "log windows left out (compile, warm-up)"), "windows": (6, "measured MMDiT windows"),
    "loader_workers": (8, "data.num_workers"), "peak_tflops": (989.0, "MFU peak"),
    "scaling_zero": (0, "engine.zero_stage of the scaling runs (0: DDP)"), "px": (1024, "MMDiT image size"),
    "mmdit_batch": (1, "MMDiT batch per micro batch"), "micro_batches": (8, "engine.micro_batches (MMDiT)"),
    "mmdit_log_every": (2, "train.log_every (MMDiT)"), "text_per_shard": (32, "samples per MMDiT shard"),
    "fault_steps": (100, "train.max_steps (fault)"), "fault_ckpt": (10, "train.ckpt_every (fault)"),
    "fault_batch": (8, "DiT batch per GPU (fault)"), "timeout": (480, "seconds per nuance train run"),
}  # fmt: skip
SMOKE = {"gpus": "1,2", "batch": 2, "train_steps": 4, "skip_windows": 1, "windows": 2, "loader_workers": 0,
         "peak_tflops": 1.0, "px": 64, "micro_batches": 2, "mmdit_log_every": 1, "text_per_shard": 8,
         "fault_steps": 40, "fault_ckpt": 4, "fault_batch": 2}  # fmt: skip


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
            "peak_alloc_gib_rank0": max((p for p in peaks if p is not None), default=None)}  # fmt: skip


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
    same = [r for r in prior if r["run"] == "scaling" and r["config"] == config and r.get("img_s")]
    base = next((r["img_s"] for r in same if r["gpus"] == 1 and r["model"] == args.dit_model), None)
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


def mmdit_overrides(args, ctx, name: str, work: Path, n: int) -> list[str]:
    return [
        *common(args, name, work, n), f"model.name={args.mmdit_model}", "model.pretrained=null",
        f"vae={ctx.text_folder}", f"text_encoder.path={ctx.text_folder}",
        f"text_encoder.t5_max_length={ctx.text['t5_tokens']}", f"data.source={ctx.text_source}",
        f"data.image_size={args.px}", "data.bucketing=false", f"data.batch_size={args.mmdit_batch}",
        f"engine.micro_batches={args.micro_batches}", "optim.warmup_steps=0", "train.max_steps=1000000",
        "train.ckpt_every=0", f"train.log_every={args.mmdit_log_every}",
        *(["engine.offload_optimizer=true"] if args.offload else []), *args.extra,
    ]  # fmt: skip


def run_mmdit(args, ctx, config: str, n: int) -> dict:
    """One measured MMDiT run (ZeRO-3, or a pipeline of N stages), stopped after its windows."""
    row = {"run": "zero3_8b", "model": args.mmdit_model, "gpus": n, "config": config, "px": args.px}
    row.update(batch=args.mmdit_batch, micro_batches=args.micro_batches, offload=args.offload)
    work = Path(tempfile.mkdtemp(prefix=f"mg-{config}-", dir=ctx.work))
    engine = ["engine.backend=deepspeed", "engine.zero_stage=3"]
    if config.startswith("pipeline"):  # DP = 1: all N GPUs are stages of one pipeline
        engine = [f"engine.pipeline_stages={n}", "engine.zero_stage=1"]
    run_dir, want = work / "runs" / config, args.skip_windows + args.windows
    row.update(engine=" ".join(engine), global_batch=args.mmdit_batch * args.micro_batches)
    row["global_batch"] *= 1 if config.startswith("pipeline") else n

    def enough() -> bool:
        return len([r for r in metric_rows(run_dir) if "img_per_s" in r]) >= want

    try:
        overrides = mmdit_overrides(args, ctx, config, work, n) + engine
        result = launch(MMDIT_RECIPE, overrides, work / "train.log", args.timeout, enough)
        row.update(summarize(metric_rows(run_dir), args.skip_windows, args.windows, n), **result)
    except Exception as err:  # noqa: BLE001 - the row says what failed
        row["error"] = str(err)[-1500:]
    return row


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


def write_text_stack(folder: Path, text: dict) -> Path:
    """A tiny random SD3 text stack (CLIP-L, CLIP-G, T5) + 16-channel VAE, of SD3's embedding widths: a
    pipeline folder as `text_encoder.path` and `vae` take it (tokenizers from tests/stock_pipelines.py)."""
    from diffusers import AutoencoderKL
    from transformers import T5Config, T5EncoderModel

    from tests.stock_pipelines import LETTERS, clip_model, clip_tokenizer, t5_tokenizer

    parts = {
        "text_encoder": clip_model({"hidden_size": 8, "projection_dim": text["clip_proj"][0]}, True),
        "tokenizer": clip_tokenizer(folder.parent / "tok-l"),
        "text_encoder_2": clip_model({"hidden_size": 16, "projection_dim": text["clip_proj"][1]}, True),
        "tokenizer_2": clip_tokenizer(folder.parent / "tok-g", pad="!"),
        "text_encoder_3": T5EncoderModel(T5Config(
            vocab_size=3 + 2 * len(LETTERS), d_model=text["t5_width"], d_kv=8, d_ff=32, num_layers=1,
            num_heads=2, decoder_start_token_id=0)),
        "tokenizer_3": t5_tokenizer(),
        "vae": AutoencoderKL(
            block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=16, norm_num_groups=8,
            shift_factor=0.0609, scaling_factor=1.5305),
    }  # fmt: skip
    index = {"_class_name": "StableDiffusion3Pipeline"}
    for name, part in parts.items():
        part.save_pretrained(folder / name)
        index[name] = ["diffusers" if name == "vae" else "transformers", type(part).__name__]
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def write_text_shards(folder: Path, shards: int, per_shard: int, side: int, text: dict) -> None:
    """Synthetic shards in `nuance data precompute`'s format (data/precompute.py): latent mean / logvar
    (16, side, side), text (77 + T5 tokens, T5 width), mask (all ones), pooled (CLIP-L + CLIP-G), fp16."""
    import numpy as np
    import webdataset as wds

    from nuance.data.precompute import npy_bytes

    rng, tokens = np.random.default_rng(0), 77 + text["t5_tokens"]

    def half(*shape: int) -> bytes:
        return npy_bytes(rng.standard_normal(shape, np.float32).astype(np.float16))

    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with wds.TarWriter(str(folder / f"txt-{s:06d}.tar"), mtime=0, encoder=False) as sink:
            for i in range(per_shard):
                sink.write({
                    "__key__": f"{s:06d}-{i:06d}", "latent_mean.npy": half(16, side, side),
                    "latent_logvar.npy": npy_bytes(np.full((16, side, side), -6.0, np.float16)),
                    "text.npy": half(tokens, text["t5_width"]), "pooled.npy": half(sum(text["clip_proj"])),
                    "mask.npy": npy_bytes(np.ones(tokens, np.uint8)), "txt": b"a synthetic caption",
                })  # fmt: skip


def prepare(args, runs: list[str], work: Path):
    """Shards on the local S3 server, the tiny VAE and text stack; returns (server, context)."""
    from nuance.data import storage

    ctx = SimpleNamespace(work=work, vae=tiny_vae(work / "vae"), text=SMOKE_TEXT if args.smoke else SD3_TEXT)
    fault_samples = args.fault_steps * args.fault_batch * max(args.gpu_counts)  # one epoch: keys unique
    per_shard = max(16 if args.smoke else 256, args.batch * 4, fault_samples // 16 + 1)
    write_latent_shards(work / "dit", shards=16, per_shard=per_shard)
    server, ctx.dit_source = serve(work / "dit", work)
    if {"zero3_8b", "pipeline_vs_zero"} & set(runs):
        shards = max(8, max(args.gpu_counts))
        write_text_shards(work / "text", shards, args.text_per_shard, args.px // 8, ctx.text)
        for s in range(shards):
            storage.put_file(str(work / "text" / f"txt-{s:06d}.tar"), f"s3://bench/text/txt-{s:06d}.tar")
        ctx.text_source = f"s3://bench/text/txt-{{000000..{shards - 1:06d}}}.tar"
        ctx.text_folder = write_text_stack(work / "sd3", ctx.text)
    return server, ctx


def run_all(args, ctx, runs: list[str], results: list[dict], add) -> None:
    """Each run in turn; an unexpected error becomes that run's row. pipeline_vs_zero's ZeRO-3 row is the
    last zero3_8b row of the same settings (this call's or the --json file's), else a new run."""
    n = max(args.gpu_counts)
    for name in runs:
        try:
            if name == "scaling":
                rows = run_scaling(args, ctx, results)
            elif name == "zero3_8b":
                rows = [run_mmdit(args, ctx, "zero3", n)]
            elif name == "fault":
                rows = run_fault(args, ctx)
            else:
                pipe = run_mmdit(args, ctx, f"pipeline_pp{n}", n)
                same = {k: pipe[k] for k in ("model", "gpus", "px", "batch", "micro_batches", "offload")}
                done = [r for r in results if r["run"] == "zero3_8b" and same.items() <= r.items()]
                zero3 = {**done[-1], "reused": True} if done and "error" not in done[-1] else None
                rows = [{**r, "run": name} for r in (pipe, zero3 or run_mmdit(args, ctx, "zero3", n))]
        except Exception as err:  # noqa: BLE001 - never end the driver: the row says what failed
            error = f"{type(err).__name__}: {err}"
            rows = [{"run": name, "model": "-", "gpus": n, "config": "-", "error": error}]
        for row in rows:
            add(row)


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
    args.dit_model, args.mmdit_model = MODELS[args.smoke]
    runs = args.runs.split(",")
    if set(runs) - set(RUNS) or max(args.gpu_counts) < 2 and {"fault", "pipeline_vs_zero"} & set(runs):
        p.error(f"--runs: of {', '.join(RUNS)}; fault and pipeline_vs_zero need N >= 2 in --gpus")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    os.environ["NCCL_NVLS_ENABLE"] = "0"  # NVLink multicast off, in every run and its Ray workers
    runs, out = args.runs.split(","), Path(args.json)
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
    lines = ["run              config        gpus   img/s   /gpu ratio GiB/gpu host GiB  wait  note"]
    for r in rows:
        cells = [format(r[k], f) if isinstance(r.get(k), (int, float)) else "-" for k, f in cols]
        body = " ".join(c.rjust(int(f.split(".")[0])) for c, (_, f) in zip(cells, cols))
        note = (r.get("error") or "")[:60] or (f"passed={r['passed']}" if "passed" in r else "")
        lines.append(f"{r['run']:<16} {r['config'][:13]:<13} {r['gpus']:>4} {body}  {note}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
