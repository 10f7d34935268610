"""Every failure a user can cause ends in one clear line, in bounded time, with a non-zero exit and no
traceback (unless NUANCE_DEBUG=1), and touches no earlier checkpoint. Table-driven through the real CLI
(`python -m nuance.orchestration.cli`), run a few subprocesses at a time: the error paths fail before
torch, Ray or DeepSpeed are imported, so a row costs a fraction of a second of CPU."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import free_port

CLI = [sys.executable, "-m", "nuance.orchestration.cli"]
RUN = "existing"  # every row names this run, whose checkpoint must stay untouched
RAY_LIMIT_S = 30.0  # an unreachable Ray address is reported within this


@dataclass
class Row:
    name: str
    args: list[str]
    code: int
    says: str  # a fragment of the one error line
    env: dict[str, str] = field(default_factory=dict)
    limit_s: float = 60.0


def _closed_port() -> int:
    return free_port()  # bound and released: nothing listens there


def table(root: Path) -> list[Row]:
    """Rows: (command line, exit status, what the line says). ``root`` holds the files the rows name."""
    runs, empty = root / "runs", root / "empty"
    train = ["train", "quickstart", f"name={RUN}", f"cluster.storage_path={runs}"]
    closed = _closed_port()
    s3_down = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{closed}", "AWS_ACCESS_KEY_ID": "k"}
    s3_down["AWS_SECRET_ACCESS_KEY"] = "s"
    missing = str(root / "missing")
    return [
        # the recipe itself
        Row("unknown recipe", ["train", "no-such-recipe"], 2, "recipe 'no-such-recipe' not found"),
        Row("unknown key", [*train, "model.nmae=x"], 2, "unknown key 'model.nmae'"),
        Row("bad choice", [*train, "model.name=nope"], 2, "'model.name'"),
        Row("bad type", [*train, "train.max_steps=abc"], 2, "'train.max_steps'"),
        Row("zero workers", [*train, "cluster.num_workers=0"], 2, "'cluster.num_workers'"),
        Row("batch size 0", [*train, "data.batch_size=0"], 2, "'data.batch_size'"),
        Row("not key=value", [*train, "max_steps"], 2, "is not of the form key=value"),
        Row("list for mapping", [*train, "sample.prompts={a: 1}"], 2, "'sample.prompts'"),
        Row("invalid yaml", ["train", str(root / "broken.yaml")], 2, "not valid YAML"),
        Row("yaml list", ["train", str(root / "list.yaml")], 2, "a recipe is a mapping of keys"),
        Row("fp16 on cpu", [*train, "engine.precision=fp16"], 2, "'engine.precision' fp16 needs a GPU"),
        # a recipe that does not fit the model
        Row(
            "flow model, eps", [*train, "model.name=mmdit_debug", "objective.kind=eps"], 2, "'objective.kind'"
        ),
        Row(
            "class out of range",
            [*train, "model.name=dit_debug", "model.num_classes=4", "sample.classes=[0,9]"],
            2,
            "'sample.classes'",
        ),
        Row("sampler vs objective", [*train, "sample.sampler=euler_ancestral"], 2, "'sample.sampler'"),
        Row("lora without base", [*train, "kind=lora"], 2, "'model.pretrained' is required"),
        Row("distill without teacher", [*train, "kind=progressive_distill"], 2, "'distill.teacher'"),
        # missing data source / checkpoint / model folders: found before Ray starts
        Row("missing data source", [*train, f"data.source={missing}"], 2, "'data.source'"),
        Row("empty data folder", [*train, f"data.source={empty}"], 2, "matched no shards"),
        Row("missing vae", [*train, f"vae={missing}"], 2, "'vae' is"),
        Row(
            "missing base model",
            [*train, "kind=lora", f"model.pretrained={missing}"],
            2,
            "'model.pretrained'",
        ),
        Row("missing text encoder", [*train, f"text_encoder.path={missing}"], 2, "'text_encoder.path'"),
        Row("missing checkpoint", [*train, f"train.resume={missing}"], 2, "'train.resume'"),
        Row("run exists", [*train, "train.resume=never"], 2, "already has checkpoints"),
        Row("sample: no checkpoint", ["sample", missing], 2, "is not a nuance checkpoint"),
        Row("export: no checkpoint", ["export", missing, str(root / "out")], 2, "is not a nuance checkpoint"),
        Row("shard: no source", ["data", "shard", missing, str(root / "out")], 2, "does not exist"),
        Row(
            "precompute: no source",
            ["data", "precompute", missing, str(root / "out"), "--vae", missing],
            2,
            "does not exist",
        ),
        # an unreachable Ray cluster: within RAY_LIMIT_S, not minutes of GCS warnings
        Row(
            "ray address refused",
            train,
            1,
            "cannot reach the Ray cluster",
            {"RAY_ADDRESS": f"127.0.0.1:{closed}"},
            RAY_LIMIT_S,
        ),
        Row(
            "ray address, no such host",
            train,
            1,
            "cannot reach the Ray cluster",
            {"RAY_ADDRESS": "no-such-host.invalid:6379"},
            RAY_LIMIT_S,
        ),
        Row(
            "submit, no dashboard",
            ["submit", "quickstart", "--address", f"http://127.0.0.1:{closed}"],
            1,
            "cannot reach the Ray cluster",
            limit_s=RAY_LIMIT_S,
        ),
        Row(
            "jobs, no dashboard",
            ["jobs", "list", "--address", f"http://127.0.0.1:{closed}"],
            1,
            "cannot reach the Ray cluster",
            limit_s=RAY_LIMIT_S,
        ),
        Row(
            "precompute, ray refused",
            ["data", "precompute", str(root / "shards"), str(root / "out"), "--vae", str(root / "vae")]
            + ["--image-size", "8"],
            1,
            "cannot reach the Ray cluster",
            {"RAY_ADDRESS": f"127.0.0.1:{closed}"},
            RAY_LIMIT_S,
        ),
        # unreachable S3
        Row(
            "s3 source, endpoint down",
            [*train, "data.source=s3://b/shards/"],
            1,
            "cannot reach the S3",
            s3_down,
        ),
        Row(
            "s3 storage, endpoint down",
            [*train[:-1], "cluster.storage_path=s3://b/runs"],
            1,
            "cannot reach",
            s3_down,
        ),
        Row(
            "bad retry budget",
            [*train, "data.source=s3://b/shards/"],
            2,
            "NUANCE_S3_RETRY_SECONDS",
            {**s3_down, "AWS_ENDPOINT_URL": "", "NUANCE_S3_RETRY_SECONDS": "soon"},
        ),
    ]


def _tree_digest(folder: Path) -> dict[str, tuple[str, int]]:
    return {
        str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """Files the rows name, and an earlier run with a checkpoint (which no row may touch)."""
    ckpt = tmp_path / "runs" / RUN / "step_00000004"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text('{"step": 4}')
    (ckpt / "model.pt").write_bytes(os.urandom(256))
    (tmp_path / "runs" / RUN / "run.json").write_text(f'{{"run_id": "{RUN}-0000", "name": "{RUN}"}}')
    (tmp_path / "empty").mkdir()
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "shard-000000.tar").write_bytes(bytes(1024))
    (tmp_path / "vae").mkdir()  # an AutoencoderKL config is all precompute reads before Ray starts
    (tmp_path / "vae" / "config.json").write_text(
        '{"_class_name": "AutoencoderKL", "latent_channels": 4, "block_out_channels": [8, 16]}'
    )
    (tmp_path / "broken.yaml").write_text("name: x\nmodel: {name: [unclosed\n")
    (tmp_path / "list.yaml").write_text("- name: x\n- kind: pretrain\n")
    return tmp_path


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_", "NUANCE_"))}
    env.update({k: v for k, v in extra.items() if v})
    return env


def _run(row: Row, cwd: Path) -> tuple[Row, subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    proc = subprocess.run(
        [*CLI, *row.args], env=_env(row.env), cwd=cwd, capture_output=True, text=True, timeout=120
    )
    return row, proc, time.perf_counter() - start


def test_user_errors_are_one_line(workspace):
    before = _tree_digest(workspace / "runs")
    rows = table(workspace)
    assert len(rows) >= 30
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda row: _run(row, workspace), rows))
    problems = []
    for row, proc, seconds in results:
        print(f"{seconds:5.1f}s {row.name}")
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        ok = (
            proc.returncode == row.code
            and len(lines) == 1
            and lines[0].startswith("nuance: error: ")
            and row.says in lines[0]
            and "Traceback" not in proc.stdout + proc.stderr
            and seconds < row.limit_s
        )
        if not ok:
            problems.append(
                f"{row.name}: exit {proc.returncode} in {seconds:.1f}s, stderr {proc.stderr[-600:]!r}"
            )
    assert not problems, "\n".join(problems)
    assert _tree_digest(workspace / "runs") == before, "a failed command touched the earlier run"
    assert sorted(p.name for p in workspace.iterdir()) == sorted(
        ["runs", "empty", "shards", "vae", "broken.yaml", "list.yaml"]
    ), "a failed command wrote files"


def test_refusing_s3_is_one_line(workspace, s3_server, s3_bucket):
    """A real S3 server that refuses: wrong secret key, unknown access key, no such bucket."""
    good = s3_server.env()
    train = ["train", "quickstart", f"name={RUN}", f"cluster.storage_path={workspace / 'runs'}"]
    source = [*train, f"data.source={s3_bucket}shards/"]
    rows = [
        Row("wrong secret", source, 1, "permission denied", {**good, "AWS_SECRET_ACCESS_KEY": "wrong"}),
        Row("unknown key id", source, 1, "permission denied", {**good, "AWS_ACCESS_KEY_ID": "NOBODY"}),
        Row(
            "no such bucket",
            [*train, "data.source=s3://no-such-bucket-x/shards/"],
            2,
            "no-such-bucket-x",
            good,
        ),
    ]
    before = _tree_digest(workspace / "runs")
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda row: _run(row, workspace), rows))
    for row, proc, seconds in results:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        print(f"{seconds:5.1f}s {row.name}: {lines}")
    for row, proc, seconds in results:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == row.code and len(lines) == 1 and row.says in lines[0], (
            row.name,
            proc.stderr,
        )
        assert lines[0].startswith("nuance: error: ") and seconds < row.limit_s
    assert _tree_digest(workspace / "runs") == before


def test_debug_shows_the_traceback(workspace):
    env = _env({"NUANCE_DEBUG": "1"})
    proc = subprocess.run(
        [*CLI, "train", "quickstart", "model.nmae=x"], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "model.nmae" in proc.stderr


RAY_FAILURE = """Training failed due to worker errors:
[Rank 0 (id=1)] Traceback (most recent call last):
  File "/x/trainers/entry.py", line 80, in train_func
    raise ShardUnavailableError(msg)
nuance.data.stream.ShardUnavailableError: rank 0: shard s3://b/lat-000003.tar is missing (404); \
data.on_missing_shard=skip trains without such shards
ray.train.v2.api.exceptions.WorkerGroupError: Training failed due to worker errors"""


@pytest.mark.parametrize(
    ("text", "line"),
    [
        (RAY_FAILURE, "training failed: ShardUnavailableError: rank 0: shard s3://b/lat-000003.tar"),
        ("Training failed\n  ValueError: boom\nOOMHINT: out of GPU memory at B=8", "OOMHINT: out of GPU"),
        ("something odd happened\nno exception line", "training failed: something odd happened"),
    ],
)
def test_a_failed_run_ends_with_the_workers_own_error(text: str, line: str) -> None:
    """The last line names what the worker raised (not Ray's wrapper), or the out-of-memory hint."""
    from nuance.orchestration.cli import failure_summary

    summary = failure_summary(text, "OOMHINT:")
    assert summary.startswith(line) and "\n" not in summary, summary
