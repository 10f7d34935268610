"""Checkpoints never run code when loaded: a pickle planted in a checkpoint is refused, with one line
naming the file, by resume, by DeepSpeed's loaders (guarded), and by `nuance export` / `sample` of a
checkpoint fetched from s3://. Each payload would create a marker file if it were ever unpickled.
"""

from __future__ import annotations

import datetime
import json
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from nuance.trainers import checkpoint
from nuance.trainers.safe_load import UnsafeCheckpointError, torch_load, verify_pickles
from tests.inprocess_run import run_in_process


class Payload:
    """Unpickling this calls `exec`, which creates `marker` (what an attacker would do instead: anything)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def plant(path: Path, marker: Path) -> None:
    """Replace a torch file of a checkpoint with one that carries the payload next to real tensors."""
    torch.save({"module": {"weight": torch.zeros(2)}, "optimizer": Payload(marker)}, path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, toy_cache) -> Path:
    """A real 2-step checkpoint of the tiny in-process run (torch engine, EMA on)."""
    tmp = tmp_path_factory.mktemp("safe-loading")
    run_in_process(tmp, toy_cache, "train.max_steps=2")
    return tmp / "ckpts" / "step_00000002"


@pytest.fixture
def poisoned(trained, tmp_path):
    """(copy of the checkpoint, marker path) with `plant(file)` available through the copy."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained, ckpt)
    return ckpt, tmp_path / "PAYLOAD_RAN"


def test_the_payload_is_live(tmp_path):
    """The planted file does run code under an unrestricted load: the refusals below are meaningful."""
    marker = tmp_path / "ran"
    plant(tmp_path / "evil.pt", marker)
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


def test_resume_refuses_a_planted_pickle(poisoned, tmp_path, toy_cache):
    ckpt, marker = poisoned
    plant(ckpt / "deepspeed" / "state" / "engine_states.pt", marker)
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to load .*engine_states\.pt: .*GLOBAL exec\b"):
        run_in_process(tmp_path / "resumed", toy_cache, "train.max_steps=4", resume_from=ckpt)
    assert not marker.exists()


def test_deepspeed_never_sees_a_planted_pickle(poisoned):
    """DeepSpeed's load_checkpoint unpickles with weights_only=False: the files are verified first."""
    ckpt, marker = poisoned
    meta = json.loads((ckpt / "meta.json").read_text())
    (ckpt / "meta.json").write_text(json.dumps({**meta, "engine": "deepspeed"}))
    plant(ckpt / "deepspeed" / "state" / "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    calls = []
    engine = SimpleNamespace(backend="deepspeed", load=calls.append)
    with pytest.raises(UnsafeCheckpointError, match="optim_states.pt"):
        checkpoint.load(ckpt, engine=engine, ema=None, rank=0, world_size=1)
    assert calls == [] and not marker.exists()
    # ZeRO-3 export goes through DeepSpeed's zero_to_fp32 (also weights_only=False): guarded too
    (ckpt / "meta.json").write_text(json.dumps({**meta, "engine": "deepspeed", "zero_stage": 3}))
    with pytest.raises(UnsafeCheckpointError, match="optim_states.pt"):
        checkpoint.model_state_dict(ckpt)
    assert not marker.exists()


def test_the_allowlist_holds_what_deepspeed_pickles(tmp_path):
    """The four DeepSpeed classes its ZeRO optimizer states hold load; an unlisted class does not."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    state = {
        "loss_scaler": LossScaler(1.0),
        "dynamic": DynamicLossScaler(2.0**16, 10, 1, 2, False),  # fp16 runs
        "zero_stage": ZeroStageEnum.gradients,
        "param_slice_mappings": [{"w": fragment_address(numel=4, start=8)}],
        "flat": torch.arange(4.0),
    }
    (tmp_path / "state").mkdir()
    torch.save(state, tmp_path / "state" / "optim_states.pt")
    (tmp_path / "latest").write_text("state")  # DeepSpeed's tag file: text, not verified as a pickle
    verify_pickles(tmp_path)
    loaded = torch_load(tmp_path / "state" / "optim_states.pt")
    assert loaded["zero_stage"] == ZeroStageEnum.gradients and loaded["dynamic"].cur_scale == 2.0**16
    assert loaded["param_slice_mappings"][0]["w"] == fragment_address(numel=4, start=8)
    torch.save({"when": datetime.date(2026, 12, 6)}, tmp_path / "state" / "other.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"other\.pt: .*datetime\.date"):
        verify_pickles(tmp_path)


def test_checkpoint_state_is_json_and_safetensors(trained):
    """No pickle in what nuance itself writes; the EMA replaces the trained weights on export."""
    assert sorted(p.name for p in (trained / "rng").iterdir()) == ["rank00000.json"]
    assert sorted(p.name for p in (trained / "ema").iterdir()) == ["rank00000.safetensors"]
    rng = json.loads((trained / "rng" / "rank00000.json").read_text())
    assert set(rng) >= {"torch", "numpy", "python"}
    ema = checkpoint.load_ema(trained / "ema" / "rank00000.safetensors")
    assert ema["num_updates"] == 2 and not ema["partitioned"]
    with_ema, raw = checkpoint.model_state_dict(trained), checkpoint.model_state_dict(trained, use_ema=False)
    name = next(iter(ema["shadow"]))
    torch.testing.assert_close(with_ema[name], ema["shadow"][name])
    assert not torch.equal(with_ema[name], raw[name])


def test_old_pickled_checkpoints_are_refused_with_one_line(poisoned):
    ckpt, _ = poisoned
    meta = json.loads((ckpt / "meta.json").read_text())
    (ckpt / "meta.json").write_text(json.dumps({**meta, "format": "nuance-ckpt-v1"}))
    with pytest.raises(ValueError, match="nuance-ckpt-v1 stores EMA and RNG state as pickles"):
        checkpoint.model_state_dict(ckpt)


def test_export_and_sample_of_an_s3_checkpoint_refuse_a_planted_pickle(
    poisoned, s3_bucket, nuance_cli, tmp_path, monkeypatch
):
    from nuance.data import storage

    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the download cache (~/.cache/nuance) stays here
    ckpt, marker = poisoned
    plant(ckpt / "deepspeed" / "state" / "mp_rank_00_model_states.pt", marker)
    url = f"{s3_bucket}step_00000002"
    for path in sorted(p for p in ckpt.rglob("*") if p.is_file()):
        storage.put_file(path, f"{url}/{path.relative_to(ckpt).as_posix()}")
    export = subprocess.run(
        [*nuance_cli, "export", url, str(tmp_path / "export")], capture_output=True, text=True, timeout=300
    )
    assert export.returncode == 2, export.stderr[-2000:]
    line = export.stderr.strip().splitlines()[-1]
    assert line.startswith("nuance: error: refusing to load ") and "mp_rank_00_model_states.pt" in line
    assert not marker.exists() and not (tmp_path / "export").exists()
    from nuance.trainers.inference import sample_from_checkpoint

    with pytest.raises(UnsafeCheckpointError, match="mp_rank_00_model_states.pt"):
        sample_from_checkpoint(url, prompts=[], classes=[0], out=tmp_path / "samples")  # cached download
    assert not marker.exists()
