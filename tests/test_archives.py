"""Archive safety: every rejection for tar and zip, the accepted shapes, pack_dir, materialize.

Archives are crafted by hand so each hostile shape is exactly what the test says; the HTTP cases
talk only to a server on 127.0.0.1 started by the test.
"""

import base64
import bz2
import collections
import gzip
import io
import lzma
import os
import socket
import stat
import struct
import tarfile
import threading
import time
import warnings
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from finetune.formats.archives import ArchiveError, Limits, pack_dir, safe_extract
from finetune.formats.weights_sources import DownloadStopped, WeightsSourceError, materialize, redact

MiB = 2**20
ZEROS = bytes(2 * MiB)  # compresses ~1000:1, the stuff of zip bombs

# --- crafting archives -------------------------------------------------------------------------


def t_file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def t_special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info, None


def t_dir(name: str) -> tuple[tarfile.TarInfo, bytes | None]:
    return t_special(name, tarfile.DIRTYPE)


def write_tar(path: Path, members: list, compression: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = f"w:{compression}" if compression else "w"
    with tarfile.open(path, mode, format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def z_file(name: str, data: bytes = b"x", mode: int | None = None, method: int = zipfile.ZIP_DEFLATED):
    info = zipfile.ZipInfo(name)
    info.compress_type = method
    if mode is not None:  # a Unix mode, as Info-ZIP stores it
        info.create_system, info.external_attr = 3, mode << 16
    return info, data


def write_zip(path: Path, entries: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), zipfile.ZipFile(path, "w") as zf:
        warnings.simplefilter("ignore")  # zipfile warns about the duplicates we write on purpose
        for info, data in entries:
            zf.writestr(info, data)
    return path


def patch_zip(path: Path, **fields: int) -> None:
    """Overwrite header fields of the (single) entry in both its local and central headers."""
    raw = bytearray(path.read_bytes())
    local, central = raw.index(b"PK\x03\x04"), raw.index(b"PK\x01\x02")
    offsets = {"flags": (6, 8, 2), "file_size": (22, 24, 4)}  # field: local offset, central offset, width
    for name, value in fields.items():
        at_local, at_central, width = offsets[name]
        for at in (local + at_local, central + at_central):
            raw[at : at + width] = value.to_bytes(width, "little")
    path.write_bytes(bytes(raw))


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under root → its bytes (None for folders)."""
    return {
        p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


def assert_rejected(tmp_path: Path, archive: Path, words: list[str], limits: Limits | None = None) -> str:
    """safe_extract refuses, the message holds `words`, and nothing at all was written."""
    before = set(tmp_path.rglob("*"))
    out = tmp_path / "out"
    with pytest.raises(ArchiveError) as info:
        safe_extract(archive, out / "dest", limits or Limits())
    message = str(info.value)
    for word in words:
        assert word in message
    assert set(tmp_path.rglob("*")) - before <= {out}  # at most the (empty) parent of dest
    return message


# --- rejections: names and entry types ---------------------------------------------------------

TAR_REJECTIONS = {
    "absolute": ([t_file("/etc/evil")], "/etc/evil", "absolute"),
    "dotdot": ([t_file("../evil")], "../evil", "'..'"),
    "nested dotdot": ([t_dir("a"), t_file("a/../../evil")], "a/../../evil", "'..'"),
    "windows drive": ([t_file("C:/evil")], "C:/evil", "Windows drive"),
    "backslash": ([t_file("a\\..\\..\\evil")], "a\\..\\..\\evil", "backslash"),
    "unc path": ([t_file("\\\\server\\share\\evil")], "\\\\server\\share\\evil", "backslash"),
    "symlink": ([t_special("link", tarfile.SYMTYPE, "/etc/passwd")], "link", "symbolic link"),
    "symlink then write through it": (
        [t_special("d", tarfile.SYMTYPE, "/tmp"), t_file("d/evil")],
        "d",
        "symbolic link",
    ),
    "hard link": ([t_file("a"), t_special("b", tarfile.LNKTYPE, "/etc/passwd")], "b", "hard link"),
    "fifo": ([t_special("pipe", tarfile.FIFOTYPE)], "pipe", "FIFO"),
    "char device": ([t_special("tty", tarfile.CHRTYPE)], "tty", "device"),
    "block device": ([t_special("sda", tarfile.BLKTYPE)], "sda", "device"),
    "gnu volume label": ([t_special("label", b"V")], "label", "unsupported type"),
    "duplicate": ([t_file("a.txt"), t_file("a.txt", b"y")], "a.txt", "appears twice"),
    "duplicate after normalising": ([t_file("d/a.txt"), t_file("./d//a.txt")], "./d//a.txt", "appears twice"),
    "file used as folder": ([t_file("a"), t_file("a/b")], "a/b", "is a file"),
    "folder then same-named file": ([t_dir("a"), t_file("a")], "a", "both a file and a folder"),
}


@pytest.mark.parametrize("compression", ["", "gz"])
@pytest.mark.parametrize("case", TAR_REJECTIONS, ids=str)
def test_tar_rejections(tmp_path, case, compression):
    members, entry, why = TAR_REJECTIONS[case]
    archive = write_tar(tmp_path / "in" / "a.tar", members, compression)
    assert_rejected(tmp_path, archive, [repr(entry), why])


ZIP_REJECTIONS = {
    "absolute": ([z_file("/etc/evil")], "/etc/evil", "absolute"),
    "dotdot": ([z_file("../evil")], "../evil", "'..'"),
    "nested dotdot": ([z_file("a/"), z_file("a/../../evil")], "a/../../evil", "'..'"),
    "windows drive": ([z_file("C:\\evil")], "C:\\evil", "backslash"),
    "windows drive, forward slash": ([z_file("c:/evil")], "c:/evil", "Windows drive"),
    "backslash": ([z_file("a\\..\\..\\evil")], "a\\..\\..\\evil", "backslash"),
    "symlink": ([z_file("link", b"/etc/passwd", stat.S_IFLNK | 0o777)], "link", "symbolic link"),
    "fifo": ([z_file("pipe", b"", stat.S_IFIFO | 0o644)], "pipe", "special file"),
    "char device": ([z_file("tty", b"", stat.S_IFCHR | 0o644)], "tty", "special file"),
    "socket": ([z_file("sock", b"", stat.S_IFSOCK | 0o644)], "sock", "special file"),
    "duplicate": ([z_file("a.txt"), z_file("a.txt", b"y")], "a.txt", "appears twice"),
    "duplicate after normalising": ([z_file("d/a.txt"), z_file("d/./a.txt")], "d/./a.txt", "appears twice"),
    "file used as folder": ([z_file("a"), z_file("a/b")], "a/b", "is a file"),
    "folder then same-named file": ([z_file("a/"), z_file("a")], "a", "both a file and a folder"),
    "bzip2 method (unbounded inflate)": (
        [z_file("w.bin", ZEROS, method=zipfile.ZIP_BZIP2)],
        "w.bin",
        "method 12",
    ),
}


@pytest.mark.parametrize("case", ZIP_REJECTIONS, ids=str)
def test_zip_rejections(tmp_path, case):
    entries, entry, why = ZIP_REJECTIONS[case]
    archive = write_zip(tmp_path / "in" / "a.zip", entries)
    assert_rejected(tmp_path, archive, [repr(entry), why])


def test_rejected_entry_late_in_archive_removes_earlier_files(tmp_path):
    members = [t_file(f"ok{i}.bin", b"data") for i in range(5)] + [t_file("../evil")]
    archive = write_tar(tmp_path / "in" / "a.tar", members)
    assert_rejected(tmp_path, archive, ["'../evil'"])


def test_encrypted_zip_entry(tmp_path):
    archive = write_zip(tmp_path / "in" / "a.zip", [z_file("secret.bin", b"data")])
    patch_zip(archive, flags=0x1)  # the "encrypted" bit; zipfile would then ask for a password
    assert_rejected(tmp_path, archive, ["'secret.bin'", "encrypted"])


# --- rejections: sizes and counts --------------------------------------------------------------

TAR_KINDS = ["", "gz", "bz2", "xz"]


def write_archive(path: Path, files: dict[str, bytes], kind: str) -> Path:
    if kind == "zip":
        return write_zip(path, [z_file(name, data) for name, data in files.items()])
    return write_tar(path, [t_file(name, data) for name, data in files.items()], kind)


@pytest.mark.parametrize("kind", TAR_KINDS)
def test_too_many_entries(tmp_path, kind):
    archive = write_archive(tmp_path / "in" / "a", {f"f{i}": b"x" for i in range(5)}, kind)
    assert_rejected(tmp_path, archive, ["more than 4 entries", "'f4'"], Limits(max_files=4))


END = {
    "disk": (4, 2),
    "entries_here": (8, 2),
    "entries": (10, 2),
    "size": (12, 4),
    "offset": (16, 4),
    "comment": (20, 2),
}


def patch_end(path: Path, **fields: int) -> None:
    """Overwrite fields of the zip's end-of-central-directory record (offset, width in END)."""
    raw = bytearray(path.read_bytes())
    end = raw.rfind(b"PK\x05\x06")
    for name, value in fields.items():
        at, width = END[name]
        raw[end + at : end + at + width] = value.to_bytes(width, "little")
    path.write_bytes(bytes(raw))


def to_zip64(path: Path, count: int | None = None, locator_offset: int | None = None) -> Path:
    """Rewrite the end of a zip the way writers do past 65,535 entries: 0xFFFF in the end record,
    the real values in a ZIP64 end record and its locator; `count` and `locator_offset` lie."""
    data = bytearray(path.read_bytes())
    end = data.rfind(b"PK\x05\x06")
    entries, cd_size, cd_offset = struct.unpack("<H2I", data[end + 10 : end + 20])
    count = entries if count is None else count
    zip64_end = struct.pack("<4sQ2H2I4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, count, count, cd_size, cd_offset)
    locator = struct.pack("<4sIQI", b"PK\x06\x07", 0, end if locator_offset is None else locator_offset, 1)
    record = struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, cd_size, cd_offset, 0)
    path.write_bytes(bytes(data[:end]) + zip64_end + locator + record)
    return path


@pytest.fixture
def watch_zipfile(monkeypatch):
    """Call it once the test's zips are written: from then on every zipfile.ZipFile constructed
    (archives.py shares the module) is recorded, then built as usual."""

    def watch() -> list:
        calls: list = []
        real = zipfile.ZipFile

        def recording(*args, **kwargs):
            calls.append(args)
            return real(*args, **kwargs)

        monkeypatch.setattr(zipfile, "ZipFile", recording)
        return calls

    return watch


@pytest.mark.parametrize("zip64", [False, True])
def test_a_zip_listing_too_many_entries_is_refused_before_its_directory_is_read(
    tmp_path, watch_zipfile, zip64
):
    """zipfile reads the whole central directory when it opens an archive (millions of entries:
    gigabytes); the entry count in the end record is checked first."""
    archive = write_zip(tmp_path / "in" / "a.zip", [z_file(f"f{i}") for i in range(5)])
    if zip64:
        to_zip64(archive)
        assert len(zipfile.ZipFile(archive).infolist()) == 5  # still a valid zip
    opened = watch_zipfile()
    assert_rejected(tmp_path, archive, ["lists 5 entries", "more than 4 entries"], Limits(max_files=4))
    assert opened == []


@pytest.fixture(scope="module")
def fifty_thousand_entries(tmp_path_factory) -> bytes:
    """A zip of 50,000 empty files whose central directory takes 2.5 MiB."""
    path = tmp_path_factory.mktemp("zips") / "many.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for i in range(50_000):
            zf.writestr(f"f{i}", b"")
    return path.read_bytes()


@pytest.mark.parametrize(
    "zip64, limits, words",
    [
        # The directory fits the byte cap of 1000 entries (4 MiB), so the walk counts the headers.
        (False, Limits(), ["holds more than 1000 entries", "end record declares 1;"]),
        (True, Limits(), ["holds more than 1000 entries", "end record declares 1;"]),  # in the ZIP64 record
        # 100 entries may take 405 KiB of directory; 2.5 MiB is refused before it is read.
        (
            False,
            Limits(max_files=100),
            ["directory takes 2.469 MiB", "more than the 404.5 KiB allowed for 100 entries"],
        ),
    ],
)
def test_a_zip_whose_end_record_understates_its_entries_is_refused_before_zipfile_sees_it(
    tmp_path, watch_zipfile, fifty_thousand_entries, zip64, limits, words
):
    archive = tmp_path / "in" / "a.zip"
    archive.parent.mkdir()
    archive.write_bytes(fifty_thousand_entries)
    if zip64:
        to_zip64(archive, count=1)
    else:
        patch_end(archive, entries_here=1, entries=1)
    assert len(zipfile.ZipFile(archive).infolist()) == 50_000  # what zipfile would have parsed
    opened = watch_zipfile()
    assert_rejected(tmp_path, archive, words, limits)
    assert opened == []


def patch_last_header(path: Path, at: int, data: bytes) -> None:
    """Overwrite bytes of the last central directory header, `at` bytes into it."""
    raw = bytearray(path.read_bytes())
    last = raw.rfind(b"PK\x01\x02")
    raw[last + at : last + at + len(data)] = data
    path.write_bytes(bytes(raw))


ZIP_LAYOUT_TRICKS = {
    # Within the limit of 4 either way, but the directory and the end record disagree.
    "count understated": (
        lambda p: patch_end(p, entries_here=2, entries=2),
        "holds 3 entries but its end record declares 2",
    ),
    "count overstated": (
        lambda p: patch_end(p, entries_here=4, entries=4),
        "holds 3 entries but its end record declares 4",
    ),
    "bytes after the comment": (
        lambda p: p.write_bytes(p.read_bytes() + b"\0" * 10),
        "comment does not end the file",
    ),
    "comment length overstated": (lambda p: patch_end(p, comment=5), "comment does not end the file"),
    # zipfile takes the comment-less record at the very end and never reads the offset (it is
    # recomputed); a check that takes the last signature lands inside the record and sees no count.
    "signature in the record's offset field": (
        lambda p: patch_end(p, offset=0x06054B50, entries_here=9, entries=9),
        "no end of central directory record",
    ),
    "another zip before the archive": (
        lambda p: p.write_bytes(write_zip(p.with_suffix(".x"), [z_file("x")]).read_bytes() + p.read_bytes()),
        "not where the end record says",
    ),
    "directory size overstated": (
        lambda p: patch_end(p, size=len(p.read_bytes()) - p.read_bytes().index(b"PK\x01\x02") - 22 + 1),
        "not where the end record says",
    ),
    "several disks": (lambda p: patch_end(p, disk=1), "spans several disks"),
    "ZIP64 locator pointing elsewhere": (
        lambda p: to_zip64(p, locator_offset=0),
        "not where its locator points",
    ),
    "broken header signature": (
        lambda p: patch_last_header(p, 0, b"PK\x09\x09"),
        "broken central directory header",
    ),
    "header running past the directory": (
        lambda p: patch_last_header(p, 32, b"\x05\x00"),
        "runs past the directory",
    ),
    "ZIP64 record disagreeing with the end record": (
        lambda p: (to_zip64(p), patch_end(p, entries_here=2, entries=2)),
        "end record and the ZIP64 end record disagree",
    ),
}


@pytest.mark.parametrize("case", ZIP_LAYOUT_TRICKS, ids=str)
def test_zip_layout_tricks_are_refused_before_zipfile_sees_them(tmp_path, watch_zipfile, case):
    trick, words = ZIP_LAYOUT_TRICKS[case]
    archive = write_zip(tmp_path / "in" / "a.zip", [z_file(f"f{i}") for i in range(3)])
    trick(archive)
    opened = watch_zipfile()
    assert_rejected(tmp_path, archive, [words], Limits(max_files=4))
    assert opened == []


def test_zips_with_comments_and_zip64_records_still_extract(tmp_path, watch_zipfile):
    entries = [z_file(name, data) for name, data in ADAPTER.items()]
    entries[0][0].comment = b"entry comment " * 100
    plain = write_zip(tmp_path / "plain.zip", entries)
    commented = write_zip(tmp_path / "commented.zip", entries)
    with zipfile.ZipFile(commented, "a") as zf:
        zf.comment = b"archive comment, PK and all " * 2000  # close to the 64 KiB maximum
    zip64 = to_zip64(write_zip(tmp_path / "zip64.zip", entries))
    opened = watch_zipfile()
    for archive in (plain, commented, zip64):
        folder = safe_extract(archive, tmp_path / f"out-{archive.stem}")
        assert snapshot(folder) == expected_tree(ADAPTER, "adapter/")
    assert len(opened) == 3  # each was checked, then handed to zipfile


@pytest.mark.parametrize("kind", [*TAR_KINDS, "zip"])
def test_per_file_bomb(tmp_path, kind):
    archive = write_archive(tmp_path / "in" / "a", {"small": b"x", "bomb.bin": ZEROS}, kind)
    assert archive.stat().st_size < 100_000 or kind == ""
    assert_rejected(tmp_path, archive, ["'bomb.bin'", "per-file limit of 1 MiB"], Limits(max_file_bytes=MiB))


@pytest.mark.parametrize("kind", [*TAR_KINDS, "zip"])
def test_total_bomb(tmp_path, kind):
    files = {f"part{i}.bin": bytes(MiB // 2) for i in range(3)}  # each under the per-file cap
    archive = write_archive(tmp_path / "in" / "a", files, kind)
    limits = Limits(max_total_bytes=MiB, max_file_bytes=MiB)
    assert_rejected(tmp_path, archive, ["more than 1 MiB", "'part2.bin'"], limits)


def test_zip_header_that_understates_the_size(tmp_path):
    archive = write_zip(tmp_path / "in" / "a.zip", [z_file("bomb.bin", ZEROS)])
    patch_zip(archive, file_size=100)  # claims 100 bytes, inflates to 2 MiB
    assert_rejected(tmp_path, archive, ["'bomb.bin'", "corrupt"], Limits(max_file_bytes=MiB))


def test_oversized_tar_header(tmp_path):
    info, data = t_file("a.txt")
    info.pax_headers = {"comment": "x" * (2 * MiB)}  # tarfile would buffer this whole header
    archive = write_tar(tmp_path / "in" / "a.tar.gz", [(info, data)], "gz")
    assert_rejected(tmp_path, archive, ["entry header over 1 MiB"])


def test_limits_must_be_positive():
    with pytest.raises(ValueError, match="max_files=0, timeout_s=-1"):
        Limits(max_files=0, timeout_s=-1)


# --- rejections: not an archive, or a damaged one ----------------------------------------------

NOT_ARCHIVES = {
    "text": b"this is not an archive\n" * 50,
    "random bytes": bytes(range(256)) * 8,
    "empty file": b"",
    "short file": b"hi",
    "gzip of text": gzip.compress(b"just text\n" * 100),
    "bzip2 of text": bz2.compress(b"just text\n" * 100),
    "xz of text": lzma.compress(b"just text\n" * 100),
}


@pytest.mark.parametrize("case", NOT_ARCHIVES, ids=str)
def test_not_an_archive(tmp_path, case):
    archive = tmp_path / "in" / "weights.tar"
    archive.parent.mkdir()
    archive.write_bytes(NOT_ARCHIVES[case])
    assert_rejected(tmp_path, archive, ["not a tar or zip archive", ".tar.gz", ".zip"])


@pytest.mark.parametrize("kind", ["gz", "xz", "zip"])
def test_truncated_archive(tmp_path, kind):
    archive = write_archive(tmp_path / "in" / "a", {"w.bin": os.urandom(200_000)}, kind)
    archive.write_bytes(archive.read_bytes()[:100_000])
    assert_rejected(tmp_path, archive, ["corrupt or truncated"])


# --- accepted archives -------------------------------------------------------------------------

ADAPTER = {
    "adapter/adapter_config.json": b'{"r": 8}',
    "adapter/sub/deep/w.bin": os.urandom(3000),
    "adapter/données/模型.txt": "héllo, 世界".encode(),
}


def expected_tree(files: dict[str, bytes], under: str = "") -> dict[str, bytes | None]:
    tree: dict[str, bytes | None] = {}
    for name, data in files.items():
        rel = name.removeprefix(under)
        parts = rel.split("/")
        for i in range(1, len(parts)):
            tree["/".join(parts[:i])] = None
        tree[rel] = data
    return dict(sorted(tree.items()))


@pytest.mark.parametrize("kind", [*TAR_KINDS, "zip"])
def test_single_top_folder_is_returned(tmp_path, kind):
    archive = write_archive(tmp_path / "in" / "a", ADAPTER, kind)
    dest = tmp_path / "out" / "dest"
    folder = safe_extract(archive, dest)
    assert folder == dest / "adapter"
    assert snapshot(folder) == expected_tree(ADAPTER, "adapter/")
    assert os.listdir(dest.parent) == ["dest"]  # no temporary folder left beside it


def test_stored_zip_with_folder_entries(tmp_path):
    entries = [z_file("adapter/"), z_file("adapter/sub/")]
    entries += [z_file(name, data, method=zipfile.ZIP_STORED) for name, data in ADAPTER.items()]
    archive = write_zip(tmp_path / "a.zip", entries)
    folder = safe_extract(archive, tmp_path / "out")
    assert snapshot(folder) == expected_tree(ADAPTER, "adapter/")


def test_dot_prefixed_tar_with_several_top_entries(tmp_path):
    # What `tar -C folder -cf a.tar .` writes: "./", "./a.txt", "./sub/", ...
    members = [
        t_dir("."),
        t_file("./a.txt", b"a"),
        t_dir("./sub"),
        t_file("./sub/b.txt", b"b"),
        t_dir("./sub"),
    ]
    archive = write_tar(tmp_path / "a.tar", members)
    dest = tmp_path / "out"
    assert safe_extract(archive, dest) == dest
    assert snapshot(dest) == {"a.txt": b"a", "sub": None, "sub/b.txt": b"b"}


def test_single_top_file_returns_dest(tmp_path):
    archive = write_zip(tmp_path / "a.zip", [z_file("only.bin", b"1")])
    assert safe_extract(archive, tmp_path / "out") == tmp_path / "out"


def test_empty_archives(tmp_path):
    for archive in (write_tar(tmp_path / "e.tar", []), write_zip(tmp_path / "e.zip", [])):
        dest = tmp_path / f"out-{archive.suffix}"
        assert safe_extract(archive, dest) == dest
        assert list(dest.iterdir()) == []


@pytest.mark.parametrize("kind, name", [("gz", "weights.zip"), ("zip", "weights.tar"), ("xz", "weights")])
def test_format_is_read_from_content_not_name(tmp_path, kind, name):
    archive = write_archive(tmp_path / name, ADAPTER, kind)
    assert safe_extract(archive, tmp_path / "out").name == "adapter"


def test_dest_must_be_absent_or_empty(tmp_path):
    archive = write_archive(tmp_path / "a.tar", ADAPTER, "")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert safe_extract(archive, empty) == empty / "adapter"
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        safe_extract(archive, busy)
    assert snapshot(busy) == {"keep.txt": b"mine"}


def test_extracted_files_are_plain_and_readable(tmp_path):
    info, data = t_file("run.sh", b"#!/bin/sh\n")
    info.mode = 0o4777  # setuid, world-writable: not carried over
    folder = safe_extract(write_tar(tmp_path / "a.tar", [(info, data)]), tmp_path / "out")
    mode = (folder / "run.sh").stat().st_mode
    assert not mode & (stat.S_ISUID | stat.S_IWOTH)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755


# --- pack_dir ----------------------------------------------------------------------------------


def make_tree(root: Path, mtime: float) -> Path:
    for name, data in ADAPTER.items():
        path = root / name.removeprefix("adapter/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (root / "empty").mkdir()
    (root / "tool.sh").write_bytes(b"#!/bin/sh\n")
    (root / "tool.sh").chmod(0o775)
    for path in root.rglob("*"):
        os.utime(path, (mtime, mtime))
    return root


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz"])
def test_pack_round_trip(tmp_path, suffix):
    src = make_tree(tmp_path / "src", 1e9)
    archive = pack_dir(src, tmp_path / f"adapter{suffix}")
    assert safe_extract(archive, tmp_path / "out") == tmp_path / "out"
    assert snapshot(tmp_path / "out") == snapshot(src)


@pytest.mark.parametrize("suffix", [".tar", ".tgz"])
def test_pack_is_deterministic(tmp_path, suffix):
    one = pack_dir(make_tree(tmp_path / "one", 1e9), tmp_path / f"one{suffix}")
    old = os.umask(0o077)  # a different umask and mtime for the second copy
    try:
        two = pack_dir(make_tree(tmp_path / "two", 2e9), tmp_path / f"two{suffix}")
    finally:
        os.umask(old)
    assert one.read_bytes() == two.read_bytes()
    with tarfile.open(one) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == [
        "adapter_config.json", "données", "données/模型.txt", "empty", "sub", "sub/deep", "sub/deep/w.bin", "tool.sh",
    ]  # fmt: skip
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname) for m in members} == {(0, 0, 0, "", "")}
    assert {m.name: m.mode for m in members if m.isfile()}["tool.sh"] == 0o755
    assert all(m.isfile() or m.isdir() for m in members)


def test_pack_refuses_links_and_leaves_nothing(tmp_path):
    src = make_tree(tmp_path / "src", 1e9)
    (src / "sub" / "link").symlink_to("/etc/passwd")
    with pytest.raises(ArchiveError, match="'sub/link'.*symbolic link"):
        pack_dir(src, tmp_path / "out" / "a.tar")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_pack_refuses_bad_targets(tmp_path):
    src = make_tree(tmp_path / "src", 1e9)
    with pytest.raises(ValueError, match="must end with"):
        pack_dir(src, tmp_path / "a.zip")
    with pytest.raises(ValueError, match="outside the folder"):
        pack_dir(src, src / "sub" / "a.tar")


# --- materialize: local paths and data URIs ----------------------------------------------------


def leftovers(workdir: Path) -> list[str]:
    return sorted(p.name for p in workdir.iterdir()) if workdir.exists() else []


def test_local_folder_is_returned_as_is(tmp_path):
    assert materialize(str(tmp_path), tmp_path / "work") == tmp_path
    assert not (tmp_path / "work").exists()


def test_local_archive_is_extracted_under_workdir(tmp_path):
    archive = write_archive(tmp_path / "a.tar.gz", ADAPTER, "gz")
    work = tmp_path / "work"
    folder = materialize(f"  {archive}\n", work)
    assert folder.name == "adapter" and folder.parent.parent == work
    assert snapshot(folder) == expected_tree(ADAPTER, "adapter/")
    assert materialize(str(archive), work) != folder  # every local archive gets a fresh folder


def test_local_bad_archive_leaves_workdir_clean(tmp_path):
    bad = tmp_path / "bad.tar"
    bad.write_text("nope")
    with pytest.raises(ArchiveError):
        materialize(str(bad), tmp_path / "work")
    assert leftovers(tmp_path / "work") == []


def test_local_paths_that_do_not_work(tmp_path):
    with pytest.raises(WeightsSourceError, match="does not exist.*http"):
        materialize(str(tmp_path / "missing.tar"), tmp_path / "work")
    with pytest.raises(WeightsSourceError, match="local paths are not accepted"):
        materialize(str(tmp_path), tmp_path / "work", allow_local=False)
    with pytest.raises(WeightsSourceError, match="no weights given"):
        materialize("  ", tmp_path / "work")


@pytest.mark.parametrize("media, kind", [("application/x-tar", ""), ("application/zip", "zip"), ("", "xz")])
def test_data_uri(tmp_path, media, kind):
    archive = write_archive(tmp_path / "a", ADAPTER, kind)
    encoded = base64.encodebytes(archive.read_bytes()).decode()  # line-wrapped, as encoders often do
    folder = materialize(f"data:{media};base64,{encoded}", tmp_path / "work")
    assert snapshot(folder) == expected_tree(ADAPTER, "adapter/")
    assert [p.name for p in (tmp_path / "work").iterdir()] == [folder.parent.name]  # the temp file is gone


@pytest.mark.parametrize(
    "uri, message",
    [
        ("data:application/x-tar,plain-text", "must be base64"),
        ("data:application/x-tar;base64", "must be base64"),
        ("data:application/x-tar;base64,not*base64!", "not valid base64"),
        ("data:application/x-tar;base64,QUJ", "not valid base64"),  # padding missing
        ("data:application/x-tar;base64,ññññ", "not valid base64"),
        ("data:application/x-tar;base64," + "A" * 2000, "limit of 1000 bytes"),
    ],
)
def test_bad_data_uris(tmp_path, uri, message):
    with pytest.raises(WeightsSourceError, match=message):
        materialize(uri, tmp_path / "work", Limits(max_download_bytes=1000))
    assert leftovers(tmp_path / "work") == []


@pytest.mark.parametrize(
    "source",
    ["file:///etc/passwd", "ftp://127.0.0.1/a.tar", "s3://bucket/a.tar", "gs://bucket/a.tar", "hf://org/m"],
)
def test_other_schemes_are_refused(tmp_path, source):
    with pytest.raises(WeightsSourceError) as info:
        materialize(source, tmp_path / "work")
    message = str(info.value)
    assert f"'{source.split(':')[0]}:'" in message
    assert all(form in message for form in ("local folder", "https://", "data:"))
    assert not (tmp_path / "work").exists()


# --- materialize: http(s) ----------------------------------------------------------------------

BIG = b"z" * 5000


SECRET = "SECRET123"
REDIRECTS = {"/to-file": f"file:///etc/passwd?token={SECRET}", "/to-secret": f"/missing?token={SECRET}"}


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        server: Server = self.server  # type: ignore[assignment]
        path = urlsplit(self.path).path
        server.hits[path] += 1
        if path == "/adapter.tar.gz":
            self.reply(server.payload)
        elif path == "/bad.tar":
            self.reply(b"<html>not an archive</html>")
        elif path == "/big":
            self.reply(BIG)
        elif path == "/big-undeclared":
            self.send_response(200)
            self.end_headers()  # HTTP/1.0: the body ends when the connection closes
            for i in range(0, len(BIG), 500):
                self.wfile.write(BIG[i : i + 500])
        elif path == "/slow-head":
            time.sleep(1)
            self.reply(b"late")
        elif path == "/drip":  # one byte every 50 ms: never trips a read timeout
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            for _ in range(2000):
                try:
                    self.wfile.write(b"x")
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(0.05)
        elif path in REDIRECTS:
            self.send_response(302)
            self.send_header("Location", REDIRECTS[path])
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/error":
            self.send_error(500)
        elif path == "/slow-body":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"x" * 10)
            self.wfile.flush()
            time.sleep(1)
        else:
            self.send_error(404)

    def reply(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


class Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # do not wait for the deliberately slow handlers

    def handle_error(self, request, client_address) -> None:
        pass  # clients hang up on the slow handlers on purpose


@pytest.fixture
def server(tmp_path, monkeypatch):
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    httpd = Server(("127.0.0.1", 0), Handler)
    httpd.payload = write_archive(tmp_path / "served.tar.gz", ADAPTER, "gz").read_bytes()
    httpd.hits = collections.Counter()
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    httpd.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def test_url_download_and_cache(tmp_path, server):
    work = tmp_path / "work"
    folder = materialize(f"{server.base}/adapter.tar.gz", work)
    assert snapshot(folder) == expected_tree(ADAPTER, "adapter/")
    assert materialize(f"{server.base}/adapter.tar.gz", work) == folder
    assert server.hits["/adapter.tar.gz"] == 1  # the second call used the cache
    assert leftovers(work) == [folder.parent.name]  # the downloaded archive was removed


def test_url_http_error_hides_secrets(tmp_path, server):
    url = server.base.replace("//", "//user:hunter2@") + "/missing.tar?token=s3cret"
    with pytest.raises(WeightsSourceError) as info:
        materialize(url, tmp_path / "work")
    message = str(info.value)
    assert f"{server.base}/missing.tar?..." in message and "HTTP 404 Not Found" in message
    assert "hunter2" not in message and "s3cret" not in message
    assert leftovers(tmp_path / "work") == []


def test_url_connection_refused_hides_secrets(tmp_path, server):
    with socket.socket() as s:  # a port that was just free: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(WeightsSourceError) as info:
        materialize(f"http://127.0.0.1:{port}/a.tar?sig=s3cret", tmp_path / "work", Limits(timeout_s=2))
    assert "could not download" in str(info.value) and "s3cret" not in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__


@pytest.mark.parametrize("path", ["/slow-head", "/slow-body"])
def test_url_timeout(tmp_path, server, path):
    started = time.monotonic()
    with pytest.raises(WeightsSourceError, match=r"timed out \(nothing received for 0.2 s\)"):
        materialize(server.base + path, tmp_path / "work", Limits(timeout_s=0.2))
    assert time.monotonic() - started < 0.9
    assert leftovers(tmp_path / "work") == []


def test_url_total_deadline_ends_a_dripping_download(tmp_path, server):
    started = time.monotonic()
    with pytest.raises(WeightsSourceError, match=r"took longer than 0.5 s in all"):
        materialize(server.base + "/drip", tmp_path / "work", Limits(timeout_s=5, deadline_s=0.5))
    assert 0.5 <= time.monotonic() - started < 1.5  # not the 100 s the drip would take
    assert leftovers(tmp_path / "work") == []


def test_url_download_stops_when_cancelled(tmp_path, server):
    cancel = threading.Event()
    outcome: list[BaseException] = []

    def fetch() -> None:
        try:
            materialize(server.base + "/drip", tmp_path / "work", Limits(timeout_s=5), cancel=cancel)
        except BaseException as e:
            outcome.append(e)

    worker = threading.Thread(target=fetch)
    worker.start()
    time.sleep(0.5)
    assert worker.is_alive()  # still downloading
    cancel.set()
    started = time.monotonic()
    worker.join(timeout=5)
    assert not worker.is_alive() and time.monotonic() - started < 1
    assert len(outcome) == 1 and isinstance(outcome[0], DownloadStopped)
    assert "was cancelled" in str(outcome[0])
    assert leftovers(tmp_path / "work") == []


@pytest.mark.parametrize("path", ["/big", "/big-undeclared"])
def test_url_over_download_cap(tmp_path, server, path):
    with pytest.raises(WeightsSourceError, match="larger than the download limit of 1000 bytes"):
        materialize(server.base + path, tmp_path / "work", Limits(max_download_bytes=1000))
    assert leftovers(tmp_path / "work") == []


def test_url_with_bad_archive_is_not_cached(tmp_path, server):
    for _ in range(2):
        with pytest.raises(ArchiveError, match="not a tar or zip archive"):
            materialize(f"{server.base}/bad.tar", tmp_path / "work")
    assert server.hits["/bad.tar"] == 2
    assert leftovers(tmp_path / "work") == []


# --- error messages never echo secrets ---------------------------------------------------------

PAYLOAD = base64.b64encode(b"not an archive, " * 20 + SECRET.encode()).decode()


def assert_no_secret(message: str) -> None:
    for secret in (SECRET, "hunter2", PAYLOAD[:12], PAYLOAD[-12:]):
        assert secret not in message, message


def assert_no_secret_in_chain(error: BaseException) -> None:
    """Neither the error nor any exception a traceback would print with it holds a secret."""
    seen: BaseException | None = error
    while seen is not None:
        assert_no_secret(str(seen))
        seen = seen.__cause__ or (None if seen.__suppress_context__ else seen.__context__)


@pytest.mark.parametrize(
    "source, shown",
    [
        (
            f"https://user:hunter2@host.example/a/b.tar?X-Amz-Signature={SECRET}#{SECRET}",
            "https://host.example/a/b.tar?...#...",
        ),
        (f"  http://host:8080/a.tar?sig={SECRET}\n", "http://host:8080/a.tar?..."),
        ("http://[::1]:8080/a.tar", "http://[::1]:8080/a.tar"),
        (f"s3://AKIA:{SECRET}@bucket/a.tar", "s3://bucket/a.tar"),
        (
            f"https://storage.example/b/a.tar?Credential=sa%40example.com&Signature={SECRET}",
            "https://storage.example/b/a.tar?...",
        ),
        # A password with an unencoded "/", "?" or "#" splits where a parser ends the host part, so
        # nothing after the scheme is shown once an "@" follows the host part.
        (f"http://user:{SECRET}/x@host/a.tar", "http://..."),
        (f"http://{SECRET}?x@host/a.tar", "http://..."),
        (f"http://user:1/{SECRET}#x@host/a.tar", "http://..."),
        ("https://host/models/llama@v2/a.tar", "https://..."),
        ("mailto:someone@example.com", "mailto:..."),
        (f"http://[::1/a.tar?sig={SECRET}", "http://..."),  # urlsplit refuses it
        (f"data:application/x-tar;base64,{PAYLOAD}", "data:application/x-tar;base64,... (329 bytes)"),
        (
            f"data:application/zip;name={SECRET};base64,{PAYLOAD}",
            "data:application/zip;base64,... (329 bytes)",
        ),
        (f"data:text/plain,{SECRET}", "data:text/plain,... (9 bytes)"),
        (f"data:{PAYLOAD}", f"data:,... ({len(PAYLOAD)} bytes)"),  # no comma: no header to show
        ("/models/adapter.tar.gz", "/models/adapter.tar.gz"),
        ("C:\\models\\adapter.zip", "C:\\models\\adapter.zip"),
        ("./odd?name.tar", "./odd?name.tar"),  # local paths are kept whole
    ],
)
def test_redact(source, shown):
    assert redact(source) == shown


def test_redact_cuts_long_sources(tmp_path):
    path = "/weights/" + "a" * 1000
    assert redact(path) == path[:197] + "..."
    url = "https://host/" + "b" * 1000 + f"?sig={SECRET}"
    assert len(redact(url)) == 200 and SECRET not in redact(url)
    with pytest.raises(WeightsSourceError) as info:
        materialize(path, tmp_path / "work")
    assert len(str(info.value)) < 500


LOCAL_ERRORS = {
    "data: URI not base64": (f"data:text/plain,{PAYLOAD}", {}, "must be base64"),
    "data: URI with bad base64": (f"data:application/x-tar;base64,{PAYLOAD}!", {}, "not valid base64"),
    "data: URI over the cap": (
        f"data:application/x-tar;base64,{PAYLOAD}",
        {"limits": Limits(max_download_bytes=10)},
        "more than the limit of 10 bytes",
    ),
    "data: URI not an archive": (f"data:application/x-tar;base64,{PAYLOAD}", {}, "not a tar or zip archive"),
    "refused scheme": (f"s3://AKIA:hunter2@bucket/a.tar?X-Amz-Signature={SECRET}", {}, "'s3:' sources"),
    "refused scheme that is a pasted secret": (f"token{SECRET}{SECRET}:hunter2", {}, "unknown sources"),
    "local path refused": (
        f"/weights/a.tar?token={SECRET}",
        {"allow_local": False},
        "local paths are not accepted",
    ),
}


@pytest.mark.parametrize("case", LOCAL_ERRORS, ids=str)
def test_errors_without_network_never_echo_secrets(tmp_path, case):
    source, kwargs, words = LOCAL_ERRORS[case]
    with pytest.raises((WeightsSourceError, ArchiveError)) as info:
        materialize(source, tmp_path / "work", **kwargs)
    assert words in str(info.value)
    assert_no_secret_in_chain(info.value)
    assert leftovers(tmp_path / "work") == []


DOWNLOAD_ERRORS = {
    "/missing.tar": ({}, "failed with HTTP 404 Not Found"),
    "/error": ({}, "failed with HTTP 500 Internal Server Error"),
    "/to-file": ({}, "could not download"),  # a redirect out of http(s)
    "/to-secret": ({}, "failed with HTTP 404 Not Found"),  # the redirect's own query is not shown either
    "/big": ({"limits": Limits(max_download_bytes=1000)}, "larger than the download limit"),
    "/slow-head": ({"limits": Limits(timeout_s=0.2)}, "timed out"),
    "/drip": ({"limits": Limits(timeout_s=5, deadline_s=0.3)}, "took longer than 0.3 s"),
}


@pytest.mark.parametrize("path", DOWNLOAD_ERRORS)
def test_download_errors_never_echo_secrets(tmp_path, server, path):
    kwargs, words = DOWNLOAD_ERRORS[path]
    url = f"{server.base.replace('//', '//user:hunter2@')}{path}?X-Amz-Signature={SECRET}#{SECRET}"
    with pytest.raises(WeightsSourceError) as info:
        materialize(url, tmp_path / "work", **kwargs)
    message = str(info.value)
    assert words in message and f"{server.base}{path}?...#..." in message
    assert_no_secret(message)
    assert_no_secret_in_chain(info.value)
    assert leftovers(tmp_path / "work") == []
