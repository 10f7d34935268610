"""`nuance storage`: a local S3 server for development, and ls / cp across local paths and S3.

    nuance storage serve [--dir DIR] [--port PORT] [--bucket NAME] [--access-key K --secret-key S]
    nuance storage ls URL [-r]
    nuance storage cp SRC DST          # folders / prefixes are copied recursively

S3 settings come from the environment (see data/storage.py); `serve` prints the lines that set them.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

DEFAULT_DIR = "~/.cache/nuance/s3"
DEFAULT_PORT = 8333
DEFAULT_BUCKET = "nuance"
SECRET_FILE = "nuance/secret-access-key"  # inside --dir, mode 0600


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add `storage serve|ls|cp` to the `nuance` command line."""
    p = subparsers.add_parser("storage", help="local S3 server (SeaweedFS); ls / cp for local and S3 URLs")
    sub = p.add_subparsers(dest="storage_command", required=True)

    serve = sub.add_parser("serve", help="run a credential-enforcing S3 server on 127.0.0.1 until Ctrl-C")
    serve.add_argument("--dir", default=DEFAULT_DIR, help=f"data directory (default {DEFAULT_DIR})")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"S3 port (default {DEFAULT_PORT})")
    serve.add_argument(
        "--bucket", default=DEFAULT_BUCKET, help=f"bucket to create (default {DEFAULT_BUCKET})"
    )
    serve.add_argument("--access-key", help="S3 access key id (default: kept in DIR, random at first)")
    serve.add_argument(
        "--secret-key", help="S3 secret key (default: kept in DIR, random at first; visible in `ps` if given)"
    )
    serve.set_defaults(func=cmd_serve)

    ls = sub.add_parser("ls", help="list the files of a folder / prefix, or matching a glob")
    ls.add_argument("url", help="e.g. s3://bucket/shards/, 's3://bucket/shards/*.tar', ./data")
    ls.add_argument("-r", "--recursive", action="store_true", help="include sub-folders")
    ls.set_defaults(func=cmd_ls)

    cp = sub.add_parser("cp", help="copy a file, a folder (recursively) or a glob between local and S3")
    cp.add_argument("src")
    cp.add_argument("dst", help="a folder / prefix for folders and globs; ending in '/' keeps file names")
    cp.set_defaults(func=cmd_cp)


# -------------------------------------------------------------------------------------------------- serve


def _credentials(ns: argparse.Namespace, data_dir: str) -> tuple[str, str]:
    """Keys from the flags, else those kept in ``data_dir``, else new random ones."""
    from nuance.data.s3server import random_credentials, saved_credentials

    if bool(ns.access_key) != bool(ns.secret_key):
        raise ValueError("give both --access-key and --secret-key, or neither")
    if ns.access_key:
        return ns.access_key, ns.secret_key
    return saved_credentials(data_dir) or random_credentials()


def _write_secret_file(data_dir: str, secret: str) -> str:
    """Keep the secret in an owner-only file, so that the printed lines can read it instead of showing it."""
    path = os.path.join(data_dir, SECRET_FILE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret)
    os.chmod(path, 0o600)
    return path


def _export_lines(env: dict[str, str], secret_path: str) -> list[str]:
    """Shell lines that point a client at the server; the secret is read from its file, never printed."""
    from nuance.data.s3server import CONFLICTING_ENV

    lines = [f"unset {' '.join(CONFLICTING_ENV)}"]
    for name, value in env.items():
        shown = f'"$(cat {secret_path})"' if name == "AWS_SECRET_ACCESS_KEY" else value
        lines.append(f"export {name}={shown}")
    return lines


def _raise_interrupt(signum: int, frame: object) -> None:
    """SIGTERM handler: stop like Ctrl-C does."""
    raise KeyboardInterrupt


def cmd_serve(ns: argparse.Namespace) -> int:
    """Run SeaweedFS until Ctrl-C / SIGTERM, then stop it."""
    from nuance.data.s3server import SeaweedServer

    data_dir = os.path.abspath(os.path.expanduser(ns.dir))
    access_key, secret_key = _credentials(ns, data_dir)
    server = SeaweedServer(data_dir, access_key, secret_key, bucket=ns.bucket, port=ns.port)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        server.start()
        secret_path = _write_secret_file(data_dir, secret_key)
        print(f"[nuance] S3 server {server.endpoint} (bucket '{ns.bucket}', data {data_dir})")
        print("[nuance] point clients at it (Ctrl-C stops the server):")
        print("\n".join(_export_lines(server.env(), secret_path)), flush=True)
        while server.running:
            time.sleep(0.5)
        print(f"nuance: error: the S3 server exited unexpectedly\n{server.log_tail()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("[nuance] stopping the S3 server", flush=True)
        return 0
    except RuntimeError as err:  # weed missing, port taken, not ready in time
        print(f"nuance: error: {err}", file=sys.stderr)
        return 2
    finally:
        server.stop()


# ------------------------------------------------------------------------------------------------ ls / cp


def cmd_ls(ns: argparse.Namespace) -> int:
    """Print the matching URLs, one per line."""
    from nuance.data import storage

    url = ns.url.rstrip("/") + "/**" if ns.recursive else ns.url
    try:
        urls = storage.list_urls(url)
    except OSError as err:
        print(f"nuance: error: {ns.url}: {err}", file=sys.stderr)
        return 2
    if not urls:
        print(f"nuance: nothing at {ns.url}", file=sys.stderr)
        return 1
    print("\n".join(urls))
    return 0


def _join(base: str, rel: str) -> str:
    """``base/rel`` with exactly one slash (S3 keys and local paths alike)."""
    return base.rstrip("/") + "/" + rel.lstrip("/")


def _copy_plan(src: str, dst: str) -> list[tuple[str, str]]:
    """(source, destination) URL pairs: a file, every file of a glob, or a folder's files recursively."""
    from nuance.data import storage

    if any(c in src for c in "*?["):
        return [(f, _join(dst, f.rsplit("/", 1)[-1])) for f in storage.list_urls(src)]
    if not src.endswith("/") and src in storage.list_urls(src):  # a single file
        local_dst = storage.local_path(dst)
        into = dst.endswith("/") or (local_dst is not None and os.path.isdir(local_dst))
        return [(src, _join(dst, src.rsplit("/", 1)[-1]) if into else dst)]
    base = src.rstrip("/") + "/"
    return [(f, _join(dst, f[len(base) :])) for f in storage.list_urls(base + "**")]


def _copy_file(src: str, dst: str) -> None:
    """Copy one file between any two of local / S3."""
    from nuance.data import storage

    if storage.local_path(src) is not None:
        storage.put_file(storage.local_path(src), dst)
    elif storage.local_path(dst) is not None:
        storage.get_file(src, storage.local_path(dst))
    else:
        storage.write_bytes(dst, storage.read_bytes(src))


def cmd_cp(ns: argparse.Namespace) -> int:
    """Copy, then print how many files went where."""
    try:
        plan = _copy_plan(ns.src, ns.dst)
        if not plan:
            print(f"nuance: error: nothing to copy at {ns.src}", file=sys.stderr)
            return 1
        for src, dst in plan:
            _copy_file(src, dst)
    except OSError as err:
        print(f"nuance: error: {err}", file=sys.stderr)
        return 2
    print(f"[nuance] copied {len(plan)} file(s) to {ns.dst}")
    return 0
