"""After a resume the tracked history continues at the checkpoint's step + 1 and never goes backwards:
in metrics.jsonl and in the real W&B client's offline run files (read back with wandb's own protobuf
records), with the replayed steps of the interrupted attempt rewound, not logged twice.
"""

from __future__ import annotations

import struct
from pathlib import Path

from tests.inprocess_run import RUN_ID, read_jsonl_steps, run_in_process

BLOCK = 32 * 1024  # the .wandb file is a LevelDB-style log: 7-byte W&B header, then 32 KiB blocks
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(path: Path):
    """The protobuf `Record`s of an offline run's .wandb file (wandb 0.31 ships no Python reader; the
    chunk framing is LevelDB's log format: crc32c, length, type)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    pos, chunks = 7, b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            chunks = b""
            yield record


def offline_run(path: Path) -> tuple[list[int], int | None]:
    """(history steps in logging order, the step the run rewinds its W&B history to or None)."""
    import json

    steps, rewind, kind = [], None, None
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            steps.append(record.history.step.num)
        elif kind in ("run", "config"):  # the run's config: in its first record, updated later
            if kind == "run":
                assert record.run.run_id == RUN_ID
            config = record.run.config if kind == "run" else record.config
            for item in config.update:
                if item.key == "_wandb":
                    point = json.loads(item.value_json).get("branch_point")
                    rewind = point["step"] if point else rewind
    assert kind == "exit", f"{path} is incomplete (last record: {kind})"
    return steps, rewind


def test_resumed_run_continues_at_checkpoint_step_plus_one(tmp_path, toy_cache):
    first = run_in_process(tmp_path, toy_cache, "train.max_steps=3")  # logs 1, 2, 3; checkpoints 2, 3
    run_in_process(tmp_path, toy_cache, "train.max_steps=5", resume_from=tmp_path / "ckpts" / "step_00000002")

    metrics = read_jsonl_steps(tmp_path / "run" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5]  # step 3 of the first attempt was rewound
    assert metrics[2]["loss"] == first["loss"]  # the replayed step 3 is the same step (RNG, EMA restored)

    import wandb

    wandb.teardown()  # the W&B service writes the .wandb files after run.finish() returns: let it end
    files = sorted((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2, files  # one offline run per attempt, same W&B run id
    (steps_a, rewind_a), (steps_b, rewind_b) = offline_run(files[0]), offline_run(files[1])
    assert steps_a == [1, 2, 3] and rewind_a is None
    assert rewind_b == 2, "the resumed attempt must rewind the W&B run to the checkpoint's step"
    assert steps_b[0] == 2 + 1 and all(a < b for a, b in zip(steps_b, steps_b[1:], strict=False))
    assert steps_b[-1] == 5
    # the history W&B assembles (first attempt up to the rewind point, then the second) only goes up
    merged = [s for s in steps_a if s <= rewind_b] + steps_b
    assert merged == sorted(set(merged))
