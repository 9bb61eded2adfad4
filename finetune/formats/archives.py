"""Safe extraction and deterministic packing of archives that arrive from strangers.

An adapter or weights archive (.tar, .tar.gz, .tar.bz2, .tar.xz or .zip) is treated as hostile:
entry names are checked before anything is written, sizes are counted on the bytes actually
produced rather than on header claims, a zip's central directory is bounded before `zipfile`
parses it, and extraction happens in a temporary folder that is renamed into place only when the
whole archive passed, so a rejected archive leaves nothing behind. `pack_dir` writes the archives
the training service returns. Turning a weights string (folder, URL, data: URI) into a folder is
`weights_sources`; the `Limits` here bound both.
"""

from __future__ import annotations

import bz2
import contextlib
import dataclasses
import gzip
import io
import lzma
import os
import re
import stat
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

from ..errors import UserError
from ..staging import staged_dir, staged_file

ACCEPTED_ARCHIVES = ".tar, .tar.gz, .tar.bz2, .tar.xz or .zip"

_CHUNK = 1 << 20
# Budget for one tar entry's headers (pax records, GNU long names): tarfile reads them whole into
# memory, so a hostile archive must not be able to declare a gigabyte-sized header.
_METADATA_BYTES = 1 << 20
_TAR_BUFSIZE = 64 << 10
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a local file header, or an empty archive
_ZIP_END = struct.Struct("<4s4H2IH")  # end of central directory record
_ZIP64_LOCATOR = struct.Struct("<4sIQI")
_ZIP64_END = struct.Struct("<4sQ2H2I4Q")  # without the optional extensible data
_ZIP_CENTRAL_SIZE = 46  # the fixed part of a central directory header
# Directory bytes allowed per permitted entry: the fixed header plus a name as long as Linux paths
# go (PATH_MAX), which leaves ample room for the usual extra fields. With the default 1000 entries
# that is about 4 MiB, where names, extras and comments of up to 64 KiB each would allow 188 MiB.
_ZIP_ENTRY_BYTES = _ZIP_CENTRAL_SIZE + 4096
_TAR_COMPRESSIONS: dict[bytes, tuple[str, Callable[[BinaryIO], BinaryIO]]] = {
    b"\x1f\x8b": ("gzip", gzip.open),
    b"BZh": ("bzip2", bz2.open),
    b"\xfd7zXZ\x00": ("xz", lzma.open),
}
# zipfile bounds the output of deflate per read but not of bzip2 or lzma, so only these are safe.
_ZIP_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
_DRIVE = re.compile(r"[A-Za-z]:")
# Errors that mean the archive's bytes are bad (write-side failures are reported separately);
# NotImplementedError is zipfile meeting a feature it lacks, such as patched data.
_READ_ERRORS = (
    OSError,
    EOFError,
    zlib.error,
    lzma.LZMAError,
    tarfile.TarError,
    zipfile.BadZipFile,
    NotImplementedError,
)

Kind = Literal["file", "dir"]


class ArchiveError(UserError, ValueError):
    """An archive is malformed or unsafe; the message names the entry and says what to do."""


@dataclass(frozen=True)
class Limits:
    max_files: int = 1000
    """Entries (files and folders) one archive may hold."""
    max_total_bytes: int = 20 * 2**30
    """Uncompressed bytes all files of one archive may hold together."""
    max_file_bytes: int = 20 * 2**30
    """Uncompressed bytes one file may hold."""
    max_download_bytes: int = 20 * 2**30
    """Bytes one download or one decoded data: URI may hold."""
    timeout_s: float = 60.0
    """Seconds to wait for a connection, or for the next bytes of a download."""
    deadline_s: float = 3600.0
    """Seconds one download may take in all: a server that drips bytes never resets it."""

    def __post_init__(self) -> None:
        bad = [
            f"{f.name}={getattr(self, f.name)}"
            for f in dataclasses.fields(self)
            if not getattr(self, f.name) > 0
        ]
        if bad:
            raise ValueError(f"Limits must be positive: {', '.join(bad)}")


DEFAULT_LIMITS = Limits()


# --- extraction --------------------------------------------------------------------------------


def safe_extract(archive: Path, dest: Path, limits: Limits = DEFAULT_LIMITS) -> Path:
    """Extract a tar (plain, gzip, bzip2, xz) or zip archive into `dest`, which must not exist or
    be an empty folder; the format is read from the content, not the name.

    Returns the archive's single top-level folder when it holds exactly one and nothing else
    (people often archive a folder), otherwise `dest`. Raises ArchiveError for anything unsafe or
    malformed; `dest` is then left as it was.
    """
    archive, dest = Path(archive), Path(dest)
    if dest.exists() and not (dest.is_dir() and not any(dest.iterdir())):
        raise FileExistsError(f"{dest} already exists and is not an empty folder")
    with staged_dir(dest) as tmp:  # rename(2) fills an empty dest and refuses anything else
        tree = _Tree(tmp, limits)
        with open(archive, "rb") as f:
            head = f.read(6)
            f.seek(0)
            try:
                if head.startswith(_ZIP_MAGIC):
                    _extract_zip(f, tree)
                else:
                    _extract_tar(f, head, tree)
            except _READ_ERRORS as e:
                at = f" at entry {tree.current!r}" if tree.current is not None else ""
                raise ArchiveError(f"the archive is corrupt or truncated{at} ({e}); upload it again") from e
    return content_root(dest)


class _Tree:
    """The checked entries of one archive, written under a private temporary root."""

    def __init__(self, root: Path, limits: Limits) -> None:
        self.root = root
        self.limits = limits
        self.entries = 0
        self.declared = 0
        self.written = 0
        self.current: str | None = None
        self.seen: dict[tuple[str, ...], tuple[Kind, str]] = {}

    def claim(self, name: str, kind: Kind) -> tuple[str, ...]:
        """Check one entry against the limits and the entries before it; return its path parts
        (empty for the archive root, e.g. "./")."""
        self.current = name
        self.entries += 1
        if self.entries > self.limits.max_files:
            raise ArchiveError(
                f"the archive holds more than {self.limits.max_files} entries (stopped at {name!r}); "
                "pack only the adapter or model folder"
            )
        parts = _parts(name)
        if not parts:
            if kind == "file":
                raise ArchiveError(f"archive entry {name!r} is a file without a name; re-create the archive")
            return parts
        for i in range(1, len(parts)):
            parent_kind, parent = self.seen.setdefault(parts[:i], ("dir", name))
            if parent_kind == "file":
                raise ArchiveError(
                    f"archive entry {name!r} needs {parent!r} to be a folder, but it is a file; re-create the archive"
                )
        if parts in self.seen:
            earlier_kind, earlier = self.seen[parts]
            if kind == "file" and earlier_kind == "file":
                raise ArchiveError(
                    f"archive entry {name!r} appears twice (first as {earlier!r}); "
                    "each path may appear only once, re-create the archive"
                )
            if kind != earlier_kind:
                raise ArchiveError(
                    f"archive entry {name!r} is both a file and a folder (see {earlier!r}); re-create the archive"
                )
        self.seen.setdefault(parts, (kind, name))
        return parts

    def declare(self, name: str, size: int) -> None:
        """Refuse early on sizes a header claims; `add_file` still counts the real bytes."""
        self.declared += size
        if size > self.limits.max_file_bytes:
            raise _file_too_big(name, self.limits)
        if self.declared > self.limits.max_total_bytes:
            raise _total_too_big(name, self.limits)

    def add_dir(self, name: str, parts: tuple[str, ...]) -> None:
        try:
            self.root.joinpath(*parts).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _unwritable(name, e) from e

    def add_file(self, name: str, parts: tuple[str, ...], data: BinaryIO) -> None:
        path = self.root.joinpath(*parts)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # O_EXCL | O_NOFOLLOW: never reuse or follow an existing path.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            raise _unwritable(name, e) from e
        size = 0
        with os.fdopen(fd, "wb") as out:
            while chunk := data.read(_CHUNK):
                size += len(chunk)
                self.written += len(chunk)
                if size > self.limits.max_file_bytes:
                    raise _file_too_big(name, self.limits)
                if self.written > self.limits.max_total_bytes:
                    raise _total_too_big(name, self.limits)
                try:
                    out.write(chunk)
                except OSError as e:
                    raise _unwritable(name, e) from e


def _parts(name: str) -> tuple[str, ...]:
    """Split an entry name into path components, refusing anything that could leave the folder."""
    if "\\" in name:
        raise ArchiveError(
            f"archive entry {name!r} contains a backslash; archives must use '/' between folders"
        )
    if "\x00" in name:
        raise ArchiveError(f"archive entry {name!r} contains a NUL character; rename the file")
    if name.startswith("/"):
        raise ArchiveError(
            f"archive entry {name!r} has an absolute path; archive the folder's contents with relative "
            "paths (e.g. `tar -C folder -czf adapter.tar.gz .`)"
        )
    if _DRIVE.match(name):
        raise ArchiveError(f"archive entry {name!r} starts with a Windows drive; use relative paths")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise ArchiveError(f"archive entry {name!r} contains '..'; paths must stay inside the archive")
    return parts


def _file_too_big(name: str, limits: Limits) -> ArchiveError:
    return ArchiveError(
        f"archive entry {name!r} is larger than the per-file limit of {format_bytes(limits.max_file_bytes)} "
        "once uncompressed; upload smaller files"
    )


def _total_too_big(name: str, limits: Limits) -> ArchiveError:
    return ArchiveError(
        f"the archive holds more than {format_bytes(limits.max_total_bytes)} once uncompressed "
        f"(limit reached at entry {name!r}); upload only the files that are needed"
    )


def _unwritable(name: str, e: OSError) -> ArchiveError:
    return ArchiveError(f"could not write archive entry {name!r}: {e.strerror or e}")


def _bad_zip(why: str) -> ArchiveError:
    return ArchiveError(
        f"the zip archive is corrupt or truncated ({why}); upload it again or re-create it with a standard zip tool"
    )


def _check_zip_directory(f: BinaryIO, limits: Limits) -> None:
    """Bound a zip's central directory before zipfile sees it: zipfile reads the whole directory
    into memory and parses every header in it, whatever count the end record declares, so a zip
    whose end record says 1 could still make it parse millions. Here the directory's byte size is
    capped and its headers are counted first. The layout checks are stricter than zipfile's (one
    unambiguous end record that ends the file, no bytes before the archive) so that the directory
    walked here is the very one zipfile reads next."""
    end, fields = _zip_end_record(f)
    end, fields = _zip64_end_record(f, end, fields) or (end, fields)
    disk, cd_disk, disk_entries, entries, cd_size, cd_offset = fields
    if disk or cd_disk or disk_entries != entries:
        raise ArchiveError("the zip archive spans several disks; re-create it as a single file")
    _check_zip_directory_size(entries, cd_size, limits)
    # zipfile reads the directory from just before the end record(s), not from the offset given;
    # the two differ only for data prepended to the archive, which is refused.
    start = end - cd_size
    if start < 0 or cd_offset != start:
        raise _bad_zip("the central directory is not where the end record says")
    _count_zip_headers(f, start, cd_size, entries, limits)
    f.seek(0)


_ZipFields = tuple[int, int, int, int, int, int]
"""An end record's disk, directory disk, entries on this disk, entries, directory size and offset."""


def _zip_end_record(f: BinaryIO) -> tuple[int, _ZipFields]:
    """The end of central directory record: where it starts, and its fields."""
    f.seek(0, io.SEEK_END)
    size = f.tell()
    tail_start = max(0, size - _ZIP_END.size - 0xFFFF)  # the record plus the longest comment
    f.seek(tail_start)
    tail = f.read()
    # zipfile takes the last signature in that tail. Requiring the record's comment to run exactly
    # to the end of the file refuses trailing bytes and lying comment lengths, so that a reader that
    # checks the comment length settles on the same record.
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < _ZIP_END.size:
        raise _bad_zip("no end of central directory record")
    _, disk, cd_disk, disk_entries, entries, cd_size, cd_offset, comment = _ZIP_END.unpack_from(tail, at)
    end = tail_start + at
    if end + _ZIP_END.size + comment != size:
        raise _bad_zip("the archive comment does not end the file")
    return end, (disk, cd_disk, disk_entries, entries, cd_size, cd_offset)


def _zip64_end_record(f: BinaryIO, end: int, narrow: _ZipFields) -> tuple[int, _ZipFields] | None:
    """The ZIP64 end record, where it starts and its fields, when a ZIP64 locator comes right
    before the end record at `end`; None for a zip without one."""
    if end < _ZIP64_LOCATOR.size:
        return None
    f.seek(end - _ZIP64_LOCATOR.size)
    sig, disk64_at, end64, disks = _ZIP64_LOCATOR.unpack(f.read(_ZIP64_LOCATOR.size))
    if sig != b"PK\x06\x07":
        return None
    # zipfile looks for the ZIP64 record right before the locator, whatever it points at.
    if disk64_at != 0 or disks > 1:
        raise ArchiveError("the zip archive spans several disks; re-create it as a single file")
    if end64 != end - _ZIP64_LOCATOR.size - _ZIP64_END.size:
        raise _bad_zip("the ZIP64 end record is not where its locator points")
    f.seek(end64)
    record = f.read(_ZIP64_END.size)
    if len(record) != _ZIP64_END.size:
        raise _bad_zip("the ZIP64 end record is cut short")
    sig, record_size, _, _, *wide = _ZIP64_END.unpack(record)
    if sig != b"PK\x06\x06" or record_size != _ZIP64_END.size - 12:
        raise _bad_zip("the ZIP64 end record is malformed")
    # zipfile takes the ZIP64 values; a reader that prefers the plain ones where they are
    # not the "see ZIP64" sentinel must find the same numbers.
    sentinels = (0xFFFF,) * 4 + (0xFFFFFFFF,) * 2
    if any(n not in (w, s) for n, w, s in zip(narrow, wide, sentinels, strict=True)):
        raise _bad_zip("the end record and the ZIP64 end record disagree")
    disk, cd_disk, disk_entries, entries, cd_size, cd_offset = wide
    return end64, (disk, cd_disk, disk_entries, entries, cd_size, cd_offset)


def _check_zip_directory_size(entries: int, cd_size: int, limits: Limits) -> None:
    """Refuse a directory whose end record declares more entries or bytes than the limits allow."""
    if entries > limits.max_files:
        raise ArchiveError(
            f"the archive's directory lists {entries} entries, more than {limits.max_files} entries "
            "allowed; pack only the adapter or model folder"
        )
    cap = limits.max_files * _ZIP_ENTRY_BYTES
    if cd_size > cap:
        raise ArchiveError(
            f"the archive's directory takes {format_bytes(cd_size)}, more than the {format_bytes(cap)} allowed "
            f"for {limits.max_files} entries; pack only the adapter or model folder"
        )


def _count_zip_headers(f: BinaryIO, start: int, cd_size: int, entries: int, limits: Limits) -> None:
    """Walk the directory's headers as zipfile will, refusing more than the limit allows or a count
    other than the end record's."""
    f.seek(start)
    directory = f.read(cd_size)  # at most the cap _check_zip_directory_size allowed
    count = pos = 0
    while pos < cd_size:  # the same walk as zipfile's, which stops on bytes, not on the count
        if cd_size - pos < _ZIP_CENTRAL_SIZE or directory[pos : pos + 4] != b"PK\x01\x02":
            raise _bad_zip(f"a broken central directory header at byte {start + pos}")
        count += 1
        if count > limits.max_files:
            raise ArchiveError(
                f"the archive's directory holds more than {limits.max_files} entries, though its end record "
                f"declares {entries}; pack only the adapter or model folder"
            )
        name, extra, note = struct.unpack_from("<3H", directory, pos + 28)
        pos += _ZIP_CENTRAL_SIZE + name + extra + note
    if pos != cd_size:
        raise _bad_zip("the last central directory header runs past the directory")
    if count != entries:
        raise _bad_zip(f"the central directory holds {count} entries but its end record declares {entries}")


def _extract_zip(f: BinaryIO, tree: _Tree) -> None:
    _check_zip_directory(f, tree.limits)
    with zipfile.ZipFile(f) as zf:
        # The central directory is read up front, so every entry is checked before any is inflated.
        planned = []
        for info in zf.infolist():
            kind = _zip_kind(info)
            parts = tree.claim(info.filename, kind)
            if kind == "file":
                tree.declare(info.filename, info.file_size)
            planned.append((info, kind, parts))
        for info, kind, parts in planned:
            tree.current = info.filename
            if kind == "dir":
                tree.add_dir(info.filename, parts)
            else:
                with zf.open(info) as data:
                    tree.add_file(info.filename, parts, data)


def _zip_kind(info: zipfile.ZipInfo) -> Kind:
    name = info.filename
    if info.flag_bits & 0x1:
        raise ArchiveError(f"archive entry {name!r} is encrypted; upload an archive without a password")
    fmt = stat.S_IFMT(info.external_attr >> 16)  # Unix mode, when the creator stored one
    if fmt == stat.S_IFLNK:
        raise ArchiveError(
            f"archive entry {name!r} is a symbolic link; archives may hold only files and folders"
        )
    if info.is_dir() or fmt == stat.S_IFDIR:
        return "dir"
    if fmt not in (0, stat.S_IFREG):
        raise ArchiveError(
            f"archive entry {name!r} is a special file (device, FIFO or socket); "
            "archives may hold only files and folders"
        )
    if info.compress_type not in _ZIP_METHODS:
        raise ArchiveError(
            f"archive entry {name!r} uses zip compression method {info.compress_type}; "
            "only stored and deflated entries are accepted (the default of zip tools)"
        )
    return "file"


class _Meter:
    """A read-through stream that refuses to go past an allowance set before each tar header
    and each file's data, which bounds what tarfile may buffer for a header."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.done = 0
        self.limit = _METADATA_BYTES

    def allow(self, n: int) -> None:
        self.limit = self.done + n

    def read(self, n: int = -1) -> bytes:
        room = self.limit - self.done + 1  # one byte more than allowed proves the overrun
        data = self.raw.read(room if n < 0 else min(n, room))
        self.done += len(data)
        if self.done > self.limit:
            raise ArchiveError(
                f"the tar archive has an entry header over {format_bytes(_METADATA_BYTES)}; "
                "re-create it with a standard tar tool"
            )
        return data


def _extract_tar(f: BinaryIO, head: bytes, tree: _Tree) -> None:
    label, opener = next(
        ((label, opener) for magic, (label, opener) in _TAR_COMPRESSIONS.items() if head.startswith(magic)),
        ("", None),
    )
    # Decompress with the stdlib file readers, which bound their output per read; tarfile's own
    # "r|*" decompression inflates a whole input block at once (a bzip2 block can hold gigabytes).
    with opener(f) if opener else contextlib.nullcontext(f) as raw:
        meter = _Meter(raw)
        try:
            # Stream mode: one forward pass, nothing seeks back. Opening reads the first header.
            tar = tarfile.open(fileobj=meter, mode="r|", bufsize=_TAR_BUFSIZE)  # noqa: SIM115 (`with tar` follows)
        except tarfile.ReadError:
            what = f"the {label}-compressed file" if label else "the file"
            raise ArchiveError(
                f"{what} is not a tar or zip archive; accepted formats: {ACCEPTED_ARCHIVES}"
            ) from None
        with tar:
            while True:
                meter.allow(_METADATA_BYTES)
                member = tar.next()
                if member is None:
                    break
                kind = _tar_kind(member)
                parts = tree.claim(member.name, kind)
                try:  # second opinion from Python's own "data" extraction filter
                    tarfile.data_filter(member, str(tree.root))
                except tarfile.FilterError as e:
                    raise ArchiveError(f"archive entry {member.name!r} is unsafe: {e}") from None
                if kind == "dir":
                    tree.add_dir(member.name, parts)
                else:
                    # No `declare`: tar sizes are counted as the data streams by.
                    meter.allow(member.size + _METADATA_BYTES)
                    data = tar.extractfile(member)
                    assert data is not None  # regular files always have data
                    tree.add_file(member.name, parts, data)


def _tar_kind(member: tarfile.TarInfo) -> Kind:
    if member.isreg():
        return "file"
    if member.isdir():
        return "dir"
    if member.issym():
        what = "a symbolic link"
    elif member.islnk():
        what = "a hard link"
    elif member.ischr() or member.isblk():
        what = "a device file"
    elif member.isfifo():
        what = "a FIFO"
    else:
        what = f"of unsupported type {member.type!r}"
    raise ArchiveError(f"archive entry {member.name!r} is {what}; archives may hold only files and folders")


def content_root(dest: Path) -> Path:
    """The single top-level folder of an extracted archive when it holds only that, else `dest`."""
    children = list(dest.iterdir())
    return children[0] if len(children) == 1 and children[0].is_dir() else dest


# --- packing -----------------------------------------------------------------------------------


def pack_dir(src: Path, archive: Path) -> Path:
    """Write the contents of folder `src` to `archive` (.tar, or gzip for .tar.gz / .tgz),
    deterministically: sorted entries, mtime 0, owner 0, normalised modes, no links. The archive
    appears atomically (temporary name + rename)."""
    src, archive = Path(src), Path(archive)
    lower = archive.name.lower()
    if not lower.endswith((".tar", ".tar.gz", ".tgz")):
        raise ValueError(f"{archive}: the archive name must end with .tar, .tar.gz or .tgz")
    if not src.is_dir():
        raise NotADirectoryError(f"{src} is not a folder")
    if archive.resolve().is_relative_to(src.resolve()):
        raise ValueError(f"{archive} is inside {src}; write the archive outside the folder it packs")
    entries = list(_walk(src))  # before creating anything: refuses links and special files
    # mode=None: owner-only, as the archive always was.
    with staged_file(archive, mode=None) as raw:
        # No name and mtime 0 in the gzip header, so the bytes depend only on the contents.
        compressed = lower.endswith((".gz", ".tgz"))
        with (
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6)
            if compressed
            else contextlib.nullcontext(raw) as out,
            tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar,
        ):
            for rel, path, st in entries:
                info = tarfile.TarInfo(rel)  # defaults: mtime 0, uid/gid 0, no owner names
                if stat.S_ISDIR(st.st_mode):
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(info)
                else:
                    info.size, info.mode = st.st_size, 0o755 if st.st_mode & stat.S_IXUSR else 0o644
                    with open(path, "rb") as data:
                        tar.addfile(info, data)
    return archive


def _walk(folder: Path, prefix: str = "") -> Iterator[tuple[str, Path, os.stat_result]]:
    with os.scandir(folder) as it:
        children = sorted(it, key=lambda e: e.name)
    for child in children:
        rel = prefix + child.name
        _parts(rel)  # a name safe_extract would refuse must not be packed
        st = child.stat(follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            yield rel, Path(child.path), st
            yield from _walk(Path(child.path), rel + "/")
        elif stat.S_ISREG(st.st_mode):
            yield rel, Path(child.path), st
        else:
            what = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "a special file"
            raise ArchiveError(
                f"cannot pack {rel!r}: it is {what}; only regular files and folders are packed"
            )


def format_bytes(n: int) -> str:
    """A byte count for a message: "512 bytes", "1.5 MiB"."""
    if n < 1024:
        return f"{n} bytes"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024:
            return f"{value:.4g} {unit}"
    return f"{value / 1024:.4g} TiB"
