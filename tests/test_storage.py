"""data.storage, data.s3server and `nuance storage` against a private SeaweedFS server (tests/s3_fixtures);
the S3 behaviours that servers implement differently also against moto's AWS-like server."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import tarfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from nuance.data import retries, s3reader, storage
from nuance.data.s3server import SeaweedServer, random_credentials
from tests.s3_fixtures import apply_env, server_env

MiB = 2**20


def _tree(root: Path) -> dict[str, bytes]:
    """Relative path -> content of every file below ``root``."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------ no server


def test_local_paths_and_file_urls(tmp_path):
    target = tmp_path / "a" / "b.bin"
    storage.atomic_write_bytes(target, b"one")
    storage.atomic_write_bytes(f"file://{target}", b"two")
    assert storage.read_bytes(target) == b"two" and os.listdir(target.parent) == ["b.bin"]  # no temp left
    storage.write_bytes(tmp_path / "a" / "c.tar", b"c")
    storage.put_file(target, tmp_path / "copy" / "b.bin")
    storage.get_file(f"file://{target}", tmp_path / "got.bin")
    assert (tmp_path / "got.bin").read_bytes() == b"two" and storage.exists(tmp_path / "copy" / "b.bin")
    with storage.open_url(f"file://{target}") as f:
        assert f.read() == b"two"
    assert storage.list_urls(str(tmp_path / "a")) == [str(tmp_path / "a" / n) for n in ("b.bin", "c.tar")]
    assert storage.list_urls(f"file://{tmp_path}/a/*.tar") == [f"file://{tmp_path}/a/c.tar"]
    assert storage.list_urls(str(tmp_path / "missing")) == []
    with pytest.raises(ValueError, match="mode"):
        storage.open_url(target, "r+")


def test_transient_errors_are_told_apart():
    import botocore.exceptions as bex

    def client_error(status: int, code: str) -> bex.ClientError:
        return bex.ClientError(
            {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Get"
        )

    wrapped_503 = OSError(5, "service unavailable")
    wrapped_503.__cause__ = client_error(503, "ServiceUnavailable")
    transient = [ConnectionRefusedError(), ConnectionResetError(), TimeoutError(), wrapped_503]
    transient += [bex.EndpointConnectionError(endpoint_url="http://x"), client_error(500, "InternalError")]
    permanent = [FileNotFoundError("k"), PermissionError("denied"), client_error(403, "AccessDenied")]
    permanent += [ValueError("bad"), storage.RetriesExhausted("gave up")]
    assert all(storage.is_transient(e) for e in transient)
    assert not any(storage.is_transient(e) for e in permanent)


def test_retries_are_bounded_and_counted(monkeypatch):
    monkeypatch.setenv(storage.RETRY_SECONDS_ENV, "0.6")
    before, started = storage.retry_count(), time.monotonic()

    def refuse() -> None:
        raise ConnectionRefusedError("server down")

    with pytest.raises(storage.RetriesExhausted, match="still failing"):
        storage.with_retries("test op", refuse)
    assert time.monotonic() - started < 3 and storage.retry_count() > before
    monkeypatch.setenv(storage.RETRY_SECONDS_ENV, "soon")
    with pytest.raises(ValueError, match=storage.RETRY_SECONDS_ENV):
        storage.retry_seconds()


# ---------------------------------------------------------------------------------------- shared server


def test_s3_round_trip(any_s3_bucket, tmp_path):
    s3_bucket = any_s3_bucket
    obj = s3_bucket + "x/obj.bin"
    storage.write_bytes(obj, b"hello")
    assert storage.read_bytes(obj) == b"hello" and storage.exists(obj)
    assert not storage.exists(s3_bucket + "x/missing") and storage.exists("s3://nuance-test")
    assert not storage.exists("s3://no-such-bucket-here")
    storage.atomic_write_bytes(obj, b"replaced")
    storage.makedirs(s3_bucket + "nothing/needed")
    new_bucket = f"s3://made-{os.urandom(4).hex()}"
    storage.makedirs(new_bucket + "/prefix")  # creates the bucket (no LocationConstraint trouble)
    assert storage.exists(new_bucket)
    local = tmp_path / "up.bin"
    local.write_bytes(os.urandom(3 * MiB))
    storage.put_file(local, s3_bucket + "x/up.bin")
    storage.get_file(s3_bucket + "x/up.bin", tmp_path / "down" / "up.bin")
    assert (tmp_path / "down" / "up.bin").read_bytes() == local.read_bytes()
    storage.write_bytes(s3_bucket + "x/sub/deep.tar", b"d")
    storage.write_bytes(s3_bucket + "x/a.tar", b"a")
    with storage.open_url(s3_bucket + "x/w.bin", "wb") as f:
        f.write(b"streamed")
    with storage.open_url(s3_bucket + "x/w.bin") as f:
        assert f.read(3) == b"str" and f.read() == b"eamed"
    names = ["a.tar", "obj.bin", "up.bin", "w.bin"]
    assert storage.list_urls(s3_bucket + "x/") == [s3_bucket + "x/" + n for n in names]
    assert storage.list_urls(s3_bucket + "x/*.tar") == [s3_bucket + "x/a.tar"]
    assert storage.list_urls(s3_bucket + "x/**/*.tar") == [
        s3_bucket + "x/" + n for n in ("a.tar", "sub/deep.tar")
    ]
    assert storage.read_bytes(obj) == b"replaced" and storage.list_urls(s3_bucket + "nope/") == []
    with pytest.raises(FileNotFoundError):
        storage.open_url(s3_bucket + "x/missing")
    # A prefix is one with or without its "/", whether or not the server keeps directory objects.
    assert storage.list_urls(s3_bucket + "x") == storage.list_urls(s3_bucket + "x/")
    assert storage.exists(s3_bucket + "x") and storage.exists(s3_bucket + "x/sub/")
    assert not storage.exists(s3_bucket + "nope") and storage.list_urls(s3_bucket + "nope") == []
    assert storage.list_urls(s3_bucket + "x/a.tar") == [s3_bucket + "x/a.tar"]


def test_credentials_are_enforced(any_s3_server, any_s3_bucket, monkeypatch):
    import s3fs

    obj = any_s3_bucket + "secret.bin"
    storage.write_bytes(obj, b"private")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    started = time.monotonic()
    with pytest.raises(PermissionError):
        storage.read_bytes(obj)
    with pytest.raises(PermissionError):
        storage.open_url(obj)  # the streaming reader's HEAD
    assert time.monotonic() - started < 5  # refused at once, not retried
    anonymous = s3fs.S3FileSystem(anon=True, endpoint_url=any_s3_server.endpoint, skip_instance_cache=True)
    with pytest.raises(PermissionError):
        anonymous.cat_file(obj)


def test_seaweedfs_http_apis_need_credentials(s3_server, s3_bucket):
    obj = s3_bucket + "secret.bin"
    storage.write_bytes(obj, b"private")
    for port in (s3_server.ports["s3.port"], s3_server.ports["filer.port"]):  # plain HTTP: S3 and filer API
        url = f"http://127.0.0.1:{port}/{obj[len('s3://') :]}"
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(url, timeout=5)
        assert denied.value.code in (401, 403)


def test_nothing_loggable_contains_the_secret(s3_server, s3_bucket):
    secret, key_id = os.environ["AWS_SECRET_ACCESS_KEY"], os.environ["AWS_ACCESS_KEY_ID"]
    storage.write_bytes(s3_bucket + "o", b"x")
    fs = storage.filesystem(s3_bucket)
    with storage.open_url(s3_bucket + "o") as reader:
        shown = [repr(storage.describe()), repr(s3_server), repr(fs), repr(fs.storage_options), repr(reader)]
    shown += [s3_server.log_tail(10_000), " ".join(s3_server._command(Path("identities.json")))]
    assert storage.describe()["secret_access_key"] == "present"
    assert not [s for s in shown if secret in s or key_id in s]


def test_filesystem_is_cached_per_process(s3_bucket):
    storage.write_bytes(s3_bucket + "o", b"fork")
    parent_fs = storage.filesystem(s3_bucket)
    assert storage.filesystem(s3_bucket + "other") is parent_fs
    pid = os.fork()
    if pid == 0:  # child: must build its own client, and it must work
        ok = storage.filesystem(s3_bucket) is not parent_fs and storage.read_bytes(s3_bucket + "o") == b"fork"
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_webdataset_reads_s3(s3_bucket):
    import webdataset as wds

    buffer = io.BytesIO()
    with wds.TarWriter(buffer) as sink:
        for i in range(3):
            sink.write({"__key__": f"s{i}", "txt": f"caption {i}", "cls": str(i)})
    shard = s3_bucket + "shard-000000.tar"
    storage.write_bytes(shard, buffer.getvalue())
    assert storage.register_webdataset_s3()
    with wds.gopen(shard) as f:
        assert f.read() == buffer.getvalue()
    samples = list(wds.WebDataset(shard, shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in samples] == ["s0", "s1", "s2"]
    with storage.open_url(shard) as f, tarfile.open(fileobj=f, mode="r|*") as tar:  # what data/stream does
        assert [m.name for m in tar][:2] == ["s0.cls", "s0.txt"]


def _failing_gets(monkeypatch, which: set[int]) -> list[int]:
    """Make the ranged GETs of ResilientReaders whose number (from 0) is in ``which`` fail once with a
    connection error before they reach the server; returns the list of GET start offsets seen."""
    import botocore.exceptions as bex

    real_call, starts = storage._S3Object._call, []

    def call(self, operation, **kwargs):
        if operation == "get_object":
            starts.append(int(kwargs["Range"].split("=")[1].split("-")[0]))
            if len(starts) - 1 in which:
                raise bex.EndpointConnectionError(endpoint_url="http://injected")
        return real_call(self, operation, **kwargs)

    monkeypatch.setattr(storage._S3Object, "_call", call)
    monkeypatch.setattr(s3reader, "STREAM_BLOCK_SIZE", MiB)
    monkeypatch.setattr(retries, "_BACKOFF_FIRST_S", 0.01)
    return starts


def test_reader_reads_ahead_in_ranges_and_retries_a_failed_one(any_s3_bucket, monkeypatch):
    """Blocks come from parallel ranged GETs; one that fails is retried from its start, bytes identical."""
    s3_bucket = any_s3_bucket
    data = os.urandom(5 * MiB + 123)
    storage.write_bytes(s3_bucket + "ahead.bin", data)
    starts = _failing_gets(monkeypatch, {2})
    with storage.open_url(s3_bucket + "ahead.bin") as reader:
        head = reader.read(MiB + 7)
        assert head + reader.read() == data and reader.retries == 1 and reader.read() == b""
        assert sorted(starts) == sorted([*range(0, 6 * MiB, MiB), starts[2]])
        reader.seek(-200, io.SEEK_END)  # reading ahead starts over at the new position
        assert reader.read(100) == data[-200:-100] and reader.tell() == len(data) - 100
        reader.seek(3)
        assert reader.read(5) == data[3:8]


def test_reader_refuses_to_resume_on_a_changed_object(s3_bucket, monkeypatch):
    """After a failure the object must be the one opened: a rewritten one is not spliced in."""
    storage.write_bytes(s3_bucket + "changing.bin", os.urandom(4 * MiB))
    with storage.open_url(s3_bucket + "changing.bin") as reader:
        _failing_gets(monkeypatch, {0, 1})
        storage.write_bytes(s3_bucket + "changing.bin", os.urandom(4 * MiB))
        with pytest.raises(OSError, match="changed while being read"):
            reader.read()


def test_closed_reader_stops_reading_ahead(s3_bucket, monkeypatch):
    url = s3_bucket + "closed.bin"
    storage.write_bytes(url, os.urandom(8 * MiB))
    monkeypatch.setattr(s3reader, "STREAM_BLOCK_SIZE", MiB)
    reader = storage.open_url(url)
    assert len(reader.read(10)) == 10

    def threads():  # this reader's only: other tests' streams may still have theirs
        return [t for t in threading.enumerate() if t.name == f"readahead {url}"]

    assert threads()
    reader.close()
    with pytest.raises(ValueError, match="closed file"):
        reader.read(1)
    deadline = time.monotonic() + 5
    while threads() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not threads()


def test_cli_ls_and_cp(s3_bucket, tmp_path, nuance_cli, capsys):
    from nuance.orchestration.cli import main

    src = tmp_path / "src"
    for rel, data in {"a.tar": b"a", "sub/b.tar": b"bb", "sub/deeper/c.txt": b"ccc"}.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*nuance_cli, "storage", *args], capture_output=True, text=True, timeout=120)

    assert cli("cp", str(src), s3_bucket + "data").returncode == 0  # as a user runs it
    listing = cli("ls", "-r", s3_bucket + "data/")
    assert listing.stdout.split() == [
        s3_bucket + "data/" + r for r in ("a.tar", "sub/b.tar", "sub/deeper/c.txt")
    ]
    # The rest in-process (same code path, no interpreter start-up).
    assert main(["storage", "cp", s3_bucket + "data/", str(tmp_path / "back")]) == 0
    assert _tree(tmp_path / "back") == _tree(src)
    assert main(["storage", "cp", str(src / "a.tar"), s3_bucket + "single/"]) == 0
    capsys.readouterr()
    assert main(["storage", "ls", s3_bucket + "single/*.tar"]) == 0
    assert capsys.readouterr().out.split() == [s3_bucket + "single/a.tar"]
    assert main(["storage", "ls", s3_bucket + "missing/"]) == 1
    assert "nothing at" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- own servers


def test_open_url_survives_server_restart(tmp_path, monkeypatch):
    """Read half, take the server down mid-read (and restart it), read the rest: identical bytes."""
    access_key, secret_key = random_credentials()
    # weed accepts AWS_* keys found in its own environment as an extra admin identity: they must not reach it.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "INHERITEDKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "inherited-secret")
    with SeaweedServer(tmp_path / "weed", access_key, secret_key, bucket="restart-test") as server:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", server.endpoint)
        with pytest.raises(PermissionError):
            storage.exists("s3://restart-test")
        for name, value in server_env(server).items():
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, value)
        # 1 MiB blocks: beyond the few blocks read ahead, the rest of the 12 MiB needs new requests.
        monkeypatch.setattr(s3reader, "STREAM_BLOCK_SIZE", MiB)
        monkeypatch.setattr(retries, "_BACKOFF_CAP_S", 1.0)  # poll the restarting server often
        data = os.urandom(12 * MiB)
        storage.write_bytes("s3://restart-test/big.bin", data)
        before = storage.retry_count()

        reader = storage.open_url("s3://restart-test/big.bin")
        first = reader.read(3 * MiB)
        server.stop()  # down while the reader still wants 3 MiB; back in a second
        restarter = threading.Thread(target=lambda: (time.sleep(1.0), server.start()))
        restarter.start()
        rest = reader.read()
        restarter.join()
        assert first + rest == data
        assert reader.retries > 0 and storage.retry_count() > before

        reader = storage.open_url("s3://restart-test/big.bin")
        first = reader.read(2 * MiB)
        server.restart()  # synchronous restart: the pooled connection is dead, the data must survive
        assert first + reader.read() == data


def test_server_ports_avoid_the_kernels_ephemeral_range(tmp_path, monkeypatch):
    """An outgoing connection can take an ephemeral port while weed restarts; ours never come from there."""
    from nuance.data import s3server

    ranges = tmp_path / "ip_local_port_range"
    ranges.write_text("32768\t60999\n")
    monkeypatch.setattr(s3server, "_EPHEMERAL_RANGE_FILE", ranges)
    for _ in range(20):
        ports = s3server.pick_ports()
        assert len(set(ports.values())) == 2 * len(s3server.COMPONENTS)
        assert all(20000 <= p < 32768 for p in ports.values()), ports
        assert all(ports[f"{c}.port.grpc"] == ports[f"{c}.port"] + 10000 for c in s3server.COMPONENTS)


def test_cli_serve_prints_env_and_stops_on_ctrl_c(tmp_path, nuance_cli):
    from nuance.data.s3server import pick_ports

    port = pick_ports()["s3.port"]
    proc = subprocess.Popen(
        [
            *nuance_cli,
            "storage",
            "serve",
            "--dir",
            str(tmp_path),
            "--port",
            str(port),
            "--bucket",
            "cli-test",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines = []
        while not any(line.startswith("export AWS_SECRET_ACCESS_KEY") for line in lines):
            line = proc.stdout.readline()
            assert line, "serve exited early:\n" + "".join(lines)
            lines.append(line)
        exports = dict(
            line[len("export ") :].strip().split("=", 1) for line in lines if line.startswith("export")
        )
        secret = (tmp_path / "nuance" / "secret-access-key").read_text()
        assert secret not in "".join(lines) and exports["AWS_ENDPOINT_URL_S3"] == f"http://127.0.0.1:{port}"
        env = {**exports, "AWS_SECRET_ACCESS_KEY": secret}
        previous = apply_env(env)
        try:
            storage.write_bytes("s3://cli-test/x", b"served")
            assert storage.read_bytes("s3://cli-test/x") == b"served"
        finally:
            apply_env(previous)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with pytest.raises(OSError):  # the server is gone with it
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
