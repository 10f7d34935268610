"""The GPU path through the real CLI: `nuance train` under Ray Train (NCCL) on a CUDA GPU, a resume,
`nuance sample`, `nuance export`, a LoRA run, a distillation run, the DeepSpeed engine, the OOM hint.

Marker `gpu`: CPU CI deselects it (pyproject addopts `-m 'not gpu'`). On a GPU host:

    python -m pytest -m gpu tests/gpu

Every run is class-conditional (DiT presets on the toy shapes' 12 classes), so nothing needs the MiniLM
text encoder. `NUANCE_GPU_TESTS_ON_CPU=1` runs the same commands on CPU (to check the test code itself
without a GPU; the GPU assertions are then not made).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu

ON_GPU = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _a_gpu():
    """Selected without a GPU (`-m gpu` on a CPU machine): fail, never pass on CPU by accident."""
    if not ON_GPU and os.environ.get("NUANCE_GPU_TESTS_ON_CPU") != "1":
        pytest.fail("tests/gpu needs a CUDA GPU (or NUANCE_GPU_TESTS_ON_CPU=1 for a CPU dry run)")


CLASS_DIT = ["model.name=dit_debug", "model.num_classes=12", "sample.classes=[0,9]", "sample.prompts=[]"]
DEVICE = ["cluster.use_gpu=true", "cluster.num_workers=1", "engine.precision=bf16"] if ON_GPU else []


def cli(*args: str, check: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}  # DeepSpeed picks CUDA itself
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, "-m", "nuance.orchestration.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=900,
    )
    if check and proc.returncode != 0:
        out = f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        raise AssertionError(f"nuance {' '.join(args)} exited {proc.returncode}\n{out}")
    return proc


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def common(tmp_path: Path, name: str) -> list[str]:
    return [f"name={name}", f"cluster.storage_path={tmp_path}", f"data.cache_dir={tmp_path / 'toy'}",
            "tracking.mode=offline", "sample.steps=4", "sample.num_per_condition=2", *DEVICE]  # fmt: skip


def save_dit(path: Path) -> Path:
    """A random-init dit_debug backbone for the toy data (3 channels, 16 px, 12 classes), as exported."""
    from nuance.trainers.config import ModelConfig
    from nuance.trainers.models.backbone import build_backbone

    torch.manual_seed(0)
    cfg = ModelConfig(name="dit_debug", num_classes=12)
    build_backbone(cfg, in_channels=3, sample_size=16).net.save_pretrained(path)
    return path


def test_train_resume_sample_export(tmp_path):
    run = [*common(tmp_path, "gpu"), *CLASS_DIT, "train.log_every=10", "train.ckpt_every=40",
           "sample.every=40", "sample.eval_per_condition=0"]  # fmt: skip
    cli("train", "quickstart", *run, "train.max_steps=40")
    out = cli("train", "quickstart", *run, "train.max_steps=80")
    assert "resumed from" in out.stdout and "at step 40" in out.stdout, out.stdout[-2000:]
    run_dir = tmp_path / "gpu"
    rows = [r for r in metrics(run_dir) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(10, 81, 10))
    ckpt = run_dir / "step_00000080"
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["engine"] == ("ddp" if ON_GPU else "deepspeed")  # auto: one GPU shards nothing
    if ON_GPU:
        assert all(r["mfu"] > 0 and r["img_per_s"] > 0 for r in rows), rows
    cli("sample", str(ckpt), "--class", "3", "--num", "2", "--steps", "4", "--out", str(tmp_path / "s"))
    assert len(list((tmp_path / "s").glob("*.png"))) >= 1
    cli("export", str(ckpt), str(tmp_path / "export"))
    from diffusers import DiTTransformer2DModel

    assert DiTTransformer2DModel.from_pretrained(tmp_path / "export" / "transformer").config.num_layers == 2


def test_deepspeed_engine_zero2(tmp_path):
    run = [*common(tmp_path, "ds"), *CLASS_DIT, "engine.backend=deepspeed", "engine.zero_stage=2",
           "train.max_steps=20", "train.log_every=10", "train.ckpt_every=20",
           "sample.eval_per_condition=0"]  # fmt: skip
    cli("train", "quickstart", *run)
    assert json.loads((tmp_path / "ds" / "step_00000020" / "meta.json").read_text())["engine"] == "deepspeed"
    assert all(r["loss"] > 0 for r in metrics(tmp_path / "ds") if "loss" in r)


def test_lora_run(tmp_path):
    base = save_dit(tmp_path / "base")
    run = [*common(tmp_path, "lora"), *CLASS_DIT, f"model.pretrained={base}", "data.image_size=16",
           "data.source=toy", "train.max_steps=20", "train.ckpt_every=20", "train.log_every=10"]  # fmt: skip
    cli("train", "lora_pixart_debug", *run)
    ckpt = tmp_path / "lora" / "step_00000020"
    assert (ckpt / "lora" / "adapter_model.safetensors").is_file()
    cli("export", str(ckpt), str(tmp_path / "merged"), "--merge-lora")
    assert (tmp_path / "merged" / "transformer").is_dir()


def test_progressive_distillation_run(tmp_path):
    teacher = save_dit(tmp_path / "teacher")
    run = [*common(tmp_path, "distill"), *CLASS_DIT, f"distill.teacher={teacher}",
           "distill.teacher_steps=16", "distill.steps_per_round=10", "train.max_steps=20",
           "train.ckpt_every=20", "train.log_every=10"]  # fmt: skip
    cli("train", "distill/progressive_pixart_debug", *run)
    rows = [r for r in metrics(tmp_path / "distill") if "loss" in r]
    # 16 -> 8 -> 4 steps: two rounds of 10 steps each
    assert rows[-1]["step"] == 20 and rows[-1]["distill/student_steps"] == 4


@pytest.mark.skipif(not ON_GPU, reason="the CUDA out-of-memory hint needs a GPU")
def test_out_of_memory_ends_with_a_one_line_hint(tmp_path):
    run = [*common(tmp_path, "oom"), "model.name=dit_xl2", "model.num_classes=1000", "data.image_size=128",
           "data.batch_size=1024", "train.max_steps=2", "sample.every=0",
           "cluster.max_failures=0"]  # fmt: skip
    proc = cli("train", "quickstart", *run, check=False)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("nuance: error: out of GPU memory at data.batch_size=1024"), last
    assert "model.gradient_checkpointing=true" in last and "zero_stage=3" in last
