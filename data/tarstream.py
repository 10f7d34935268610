"""A lean sequential reader of tar archives: the names and contents of their regular files.

``tarfile`` turns every member header into a full ``TarInfo`` (a dozen fields, each through Python-level
helpers) and reads through its own stream layer; for latent shards, seven small members per sample, that
was about half of the time to stream a sample. ``TarReader`` parses only what a shard reader needs (name,
size, type, checksum) with a few C-level reads per member.

It reads what ``tarfile`` writes and reads in practice: ustar, GNU and pax headers, long names (pax
``path`` or GNU ``L`` members), pax ``size``, gzip / bz2 / xz compression. It rejects, with
``tarfile.ReadError``, what ``data.decode`` always treated as a damaged shard: a bad header checksum, a
header or member cut short, an archive that ends without its end-of-archive block. GNU sparse members
are rejected too: WebDataset writers never make them.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import tarfile
from collections.abc import Iterator
from typing import IO

BLOCK = 512
# Reads of a stream without a buffer of its own (an S3 reader) go through one this large.
BUFFER_SIZE = 2**20
_END_BLOCK = bytes(BLOCK)
# Leading bytes of compressed archives, as tarfile's "r|*" recognises them, and how to open each.
_COMPRESSED = (
    (b"\x1f\x8b\x08", lambda f: gzip.GzipFile(fileobj=f)),
    (b"BZh91", bz2.BZ2File),
    (b"\xfd7zXZ\x00", lzma.LZMAFile),
)
_REGULAR = (b"0", b"\0", b"7")  # regular file, old-style regular file, contiguous file
_NO_DATA = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, directories, FIFOs: size is not data
_PAX, _PAX_GLOBAL, _GNU_LONG_NAME, _GNU_LONG_LINK, _GNU_SPARSE = b"x", b"g", b"L", b"K", b"S"
# Largest member size accepted (8 EiB, tar's own limit): a corrupt size field beyond it, or a negative
# one (base-256), is a damaged shard, not a read of that many bytes.
_MAX_SIZE = 2**63 - 1
# Members are read in pieces of at most this size, so a size field that claims more than the archive holds
# costs what the archive holds, not a buffer of the claimed size.
_CHUNK = 2**24


def _padding(size: int) -> int:
    """Bytes after ``size`` bytes of member data up to the next block boundary."""
    return -size % BLOCK


def _number(field: bytes) -> int:
    """A numeric header field: NUL/space-terminated octal, or GNU base-256 (first byte 0x80 or 0xff)."""
    if field[0] in (0x80, 0xFF):
        value = int.from_bytes(field[1:], "big")
        return value - 256 ** (len(field) - 1) if field[0] == 0xFF else value
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def _text(field: bytes) -> str:
    """A NUL-terminated name field (UTF-8; undecodable bytes kept as surrogates, like tarfile)."""
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _checksum_ok(header: bytes) -> bool:
    """Whether the stored checksum matches the header's bytes, summed unsigned or (old writers) signed."""
    stored = _number(header[148:156])
    unsigned = 256 + sum(header) - sum(header[148:156])
    if stored == unsigned:
        return True
    high = sum(b >= 0x80 for b in header[:148]) + sum(b >= 0x80 for b in header[156:])
    return stored == unsigned - 256 * high


def _pax_records(data: bytes) -> dict[str, str]:
    """The ``"<length> <key>=<value>\\n"`` records of a pax header member."""
    records, pos = {}, 0
    while pos < len(data) and data[pos] != 0:
        length_field, _, rest = data[pos : pos + 32].partition(b" ")
        length = int(length_field)
        if length <= len(length_field) + 1:
            raise ValueError(f"pax record of length {length}")
        key, sep, value = data[pos + len(length_field) + 1 : pos + length - 1].partition(b"=")
        if not sep:
            raise ValueError("pax record without '='")
        records[key.decode("utf-8")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def _uncompressed(fileobj: IO[bytes]) -> IO[bytes]:
    """``fileobj`` with a read buffer, decompressed when it starts like a gzip, bzip2 or xz stream."""
    buffered = fileobj if hasattr(fileobj, "peek") else io.BufferedReader(fileobj, BUFFER_SIZE)
    head = buffered.peek(8)[:8]
    opener = next((open_ for magic, open_ in _COMPRESSED if head.startswith(magic)), None)
    return buffered if opener is None else opener(buffered)


class TarReader:
    """Sequential reader of one tar archive: iterate for the names of its regular files; ``read()``
    returns the data of the current one. Data not read is skipped on the way to the next member.

    ``fileobj`` is read through a buffer (and a decompressor) from its current position; do not use it
    otherwise while the reader is in use. (For a raw stream, such as an S3 reader, the buffer is added
    here, and like any ``io.BufferedReader`` it closes ``fileobj`` when collected with the reader.)
    """

    def __init__(self, fileobj: IO[bytes]) -> None:
        self._file = _uncompressed(fileobj)
        self._offset = 0  # bytes of the (uncompressed) archive consumed, for error messages
        self._unread = 0  # data + padding of the current member not consumed yet
        self._size = 0  # data size of the current member, while it is unread

    def _read(self, size: int, keep: bool = True) -> bytes:
        """Exactly ``size`` bytes (b"" when not ``keep``), or ReadError when the archive ends first."""
        parts, got = [], 0
        while got < size:  # raw and decompressing streams may return less than asked
            part = self._file.read(min(size - got, _CHUNK))
            if not part:
                raise tarfile.ReadError(
                    f"truncated tar: archive ends at byte {self._offset + got}, inside a member"
                )
            got += len(part)
            if keep:
                parts.append(part)
        self._offset += size
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _skip_unread(self) -> None:
        """Consume what is left of the current member."""
        if self._unread:
            self._read(self._unread, keep=False)
            self._unread = self._size = 0

    def _header(self) -> bytes | None:
        """The next header block with a valid checksum; None for the end-of-archive block."""
        header = self._file.read(BLOCK)
        if len(header) < BLOCK:
            what = "without an end-of-archive block" if not header else "inside a member header"
            raise tarfile.ReadError(f"truncated or corrupt tar: it ends {what} at byte {self._offset}")
        if header == _END_BLOCK:
            return None
        try:
            valid = _checksum_ok(header)
        except ValueError:
            valid = False
        if not valid:
            raise tarfile.ReadError(f"truncated or corrupt tar: bad header checksum at byte {self._offset}")
        self._offset += BLOCK
        return header

    def __iter__(self) -> Iterator[str]:
        """Names of the regular files, in archive order; pax and GNU extension members are applied."""
        name: str | None = None  # from an extension member, for the member that follows it
        size: int | None = None
        while True:
            self._skip_unread()
            header = self._header()
            if header is None:
                return
            kind, header_size = header[156:157], self._size_field(self._number(header[124:136]))
            if kind in (_PAX, _PAX_GLOBAL, _GNU_LONG_NAME, _GNU_LONG_LINK):
                if header_size > _CHUNK:
                    raise tarfile.ReadError(f"corrupt tar: extension header of {header_size} bytes")
                data = self._read(header_size + _padding(header_size))[:header_size]
                if kind == _GNU_LONG_NAME:
                    name = _text(data)
                elif kind == _PAX:  # a global pax header ('g') sets no name or size of one member
                    name, size = self._pax(data, name, size)
                continue
            if kind == _GNU_SPARSE:
                raise tarfile.ReadError(f"GNU sparse member at byte {self._offset - BLOCK}: not supported")
            if name is None:
                name, prefix = _text(header[:100]), _text(header[345:500])
                name = f"{prefix}/{name}" if prefix else name
            member_size = header_size if size is None else self._size_field(size)
            if kind in _REGULAR and not name.endswith("/"):  # a '\0' member named "x/" is a directory
                self._size = member_size
                self._unread = member_size + _padding(member_size)
                yield name
            elif kind not in _NO_DATA:
                self._read(member_size + _padding(member_size), keep=False)
            name = size = None

    def read(self) -> bytes:
        """The data of the current member (once; b"" after that)."""
        data = self._read(self._size)
        self._unread -= self._size
        self._size = 0
        return data

    def _number(self, field: bytes) -> int:
        """``_number(field)``, a corrupt field raising ReadError with the position."""
        try:
            return _number(field)
        except ValueError:
            where = self._offset - BLOCK
            raise tarfile.ReadError(f"corrupt tar: bad number in the header at byte {where}") from None

    def _size_field(self, size: int) -> int:
        """``size`` when it can be a member's size, else ReadError (a corrupt header)."""
        if not 0 <= size <= _MAX_SIZE:
            raise tarfile.ReadError(f"corrupt tar: member size {size} before byte {self._offset}")
        return size

    def _pax(self, data: bytes, name: str | None, size: int | None) -> tuple[str | None, int | None]:
        """(name, size) for the next member after a pax header; ReadError for what cannot be read."""
        try:
            records = _pax_records(data)
            if any(key.startswith("GNU.sparse.") for key in records):
                raise tarfile.ReadError("GNU sparse member (pax): not supported")
            return records.get("path", name), int(records["size"]) if "size" in records else size
        except (ValueError, UnicodeDecodeError) as exc:
            raise tarfile.ReadError(f"corrupt pax header before byte {self._offset}: {exc}") from None
