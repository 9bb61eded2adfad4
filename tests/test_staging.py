"""finetune.staging: a folder or file is written under a hidden name beside its final one, flushed,
then renamed into place; whatever goes wrong, the final name holds the old thing, the new one, or
nothing, and no temporary name is left behind."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from finetune.staging import staged_dir, staged_file


class Cancel(BaseException):
    """Like Cog's cancel: not an Exception, so `except Exception` would let it through."""


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def tree(folder: Path) -> dict[str, bytes | None]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() if p.is_file() else None
        for p in sorted(folder.rglob("*"))
    }


def fill(folder: Path, text: str) -> None:
    (folder / "sub").mkdir()
    (folder / "a.txt").write_text(text)
    (folder / "sub" / "b.txt").write_text(text * 2)


def old_folder(parent: Path) -> Path:
    final = parent / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    return final


@pytest.fixture
def renames(monkeypatch, synced) -> list[str]:
    """`synced`, with a "rename <src> -> <dst>" entry for every os.rename / os.replace."""
    for name in ("rename", "replace"):
        real = getattr(os, name)

        def recorded(src, dst, *args, _real=real, **kwargs):
            synced.append(f"rename {src} -> {dst}")
            return _real(src, dst, *args, **kwargs)

        monkeypatch.setattr(os, name, recorded)
    return synced


# --- staged_dir ----------------------------------------------------------------------------------


def test_a_clean_exit_puts_the_folder_in_place_with_its_mode(tmp_path):
    final = tmp_path / "deep" / "out"  # the parent is made too
    with staged_dir(final) as tmp:
        assert tmp.parent == final.parent and tmp.name.startswith(".out.") and tmp.name.endswith(".tmp")
        assert not final.exists()
        fill(tmp, "new")
    assert tree(final) == {"a.txt": b"new", "sub": None, "sub/b.txt": b"newnew"}
    assert stat.S_IMODE(final.stat().st_mode) == 0o755  # mkdtemp's folder was owner-only
    assert names(final.parent) == ["out"]


def test_mode_none_keeps_the_folder_owner_only(tmp_path):
    with staged_dir(tmp_path / "out", mode=None):
        pass
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o700


@pytest.mark.parametrize("replace", [False, True])
def test_an_empty_folder_is_filled(tmp_path, replace):
    (tmp_path / "out").mkdir()
    with staged_dir(tmp_path / "out", replace=replace) as tmp:
        fill(tmp, "new")
    assert tree(tmp_path / "out")["a.txt"] == b"new"
    assert names(tmp_path) == ["out"]


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt(), Cancel()])
@pytest.mark.parametrize("replace", [False, True])
def test_an_exception_leaves_nothing_and_the_old_folder_whole(tmp_path, error, replace):
    final = old_folder(tmp_path)
    with pytest.raises(type(error)), staged_dir(final, replace=replace) as tmp:
        fill(tmp, "new")
        raise error
    assert tree(final) == {"old.txt": b"old"}
    assert names(tmp_path) == ["out"]


@pytest.mark.parametrize("error", [ValueError("bad"), Cancel()])
def test_an_exception_with_no_folder_there_leaves_nothing(tmp_path, error):
    with pytest.raises(type(error)), staged_dir(tmp_path / "out"):
        raise error
    assert names(tmp_path) == []


def test_replace_puts_the_new_folder_in_the_old_ones_place(tmp_path):
    final = old_folder(tmp_path)
    (tmp_path / ".out.old").mkdir()  # left by a crash between the two renames of an earlier call
    with staged_dir(final, replace=True) as tmp:
        fill(tmp, "new")
    assert tree(final) == {"a.txt": b"new", "sub": None, "sub/b.txt": b"newnew"}
    assert names(tmp_path) == ["out"]  # neither the old folder nor the temporary one is left


def test_without_replace_a_full_folder_is_refused_and_kept(tmp_path):
    final = old_folder(tmp_path)
    with pytest.raises(FileExistsError, match="not an empty folder"), staged_dir(final) as tmp:
        fill(tmp, "new")
    assert tree(final) == {"old.txt": b"old"}
    assert names(tmp_path) == ["out"]


@pytest.mark.parametrize("replace", [False, True])
def test_a_file_in_the_way_is_refused_and_kept(tmp_path, replace):
    (tmp_path / "out").write_text("mine")
    with pytest.raises(FileExistsError), staged_dir(tmp_path / "out", replace=replace) as tmp:
        fill(tmp, "new")
    assert (tmp_path / "out").read_text() == "mine"
    assert names(tmp_path) == ["out"]


def test_a_failed_swap_puts_the_old_folder_back(tmp_path, monkeypatch):
    final = old_folder(tmp_path)
    real = os.rename

    def rename(src, dst):
        if Path(src).name.endswith(".tmp"):  # the new folder's rename into place
            raise OSError(5, "Input/output error")
        real(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="Input/output"), staged_dir(final, replace=True) as tmp:
        fill(tmp, "new")
    assert tree(final) == {"old.txt": b"old"}
    assert names(tmp_path) == ["out"]


@pytest.mark.parametrize("replace", [False, True])
def test_every_file_and_folder_reaches_the_disk_before_the_rename_and_the_parent_after(
    tmp_path, renames, replace
):
    final = tmp_path / "out"
    if replace:
        old_folder(tmp_path)
    with staged_dir(final, replace=replace) as tmp:
        fill(tmp, "new")
    into_place = renames.index(f"rename {tmp} -> {final}")
    flushed = renames[:into_place]
    for path in (tmp / "a.txt", tmp / "sub" / "b.txt", tmp / "sub", tmp):
        assert str(path) in flushed, path
    # children before the folders that name them
    assert (
        flushed.index(str(tmp / "sub" / "b.txt")) < flushed.index(str(tmp / "sub")) < flushed.index(str(tmp))
    )
    assert renames[-1] == str(tmp_path)  # the new entry in the parent, last


def test_nothing_is_flushed_or_renamed_when_the_body_fails(tmp_path, renames):
    with pytest.raises(Cancel), staged_dir(tmp_path / "out") as tmp:
        fill(tmp, "new")
        raise Cancel
    assert renames == []


# --- staged_file ---------------------------------------------------------------------------------


def test_a_file_appears_whole_with_its_mode(tmp_path):
    final = tmp_path / "deep" / "a.bin"
    with staged_file(final) as out:
        out.write(b"new")
        (tmp,) = final.parent.iterdir()
        assert tmp.name.startswith(".a.bin.") and tmp.name.endswith(".tmp")
        assert not final.exists()
    assert final.read_bytes() == b"new"
    assert stat.S_IMODE(final.stat().st_mode) == 0o644
    assert names(final.parent) == ["a.bin"]


def test_a_file_replaces_the_old_one_and_mode_none_keeps_it_owner_only(tmp_path):
    final = tmp_path / "a.bin"
    final.write_bytes(b"old")
    with staged_file(final, mode=None) as out:
        out.write(b"new")
    assert final.read_bytes() == b"new"
    assert stat.S_IMODE(final.stat().st_mode) == 0o600
    assert names(tmp_path) == ["a.bin"]


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), Cancel()])
def test_a_failed_file_leaves_the_old_one_and_no_temporary_file(tmp_path, error):
    final = tmp_path / "a.bin"
    final.write_bytes(b"old")
    with pytest.raises(type(error)), staged_file(final) as out:
        out.write(b"new")
        raise error
    assert final.read_bytes() == b"old"
    assert names(tmp_path) == ["a.bin"]


def test_a_file_reaches_the_disk_before_its_name_and_the_parent_after(tmp_path, renames):
    final = tmp_path / "a.bin"
    with staged_file(final) as out:
        out.write(b"new")
        tmp = Path(os.readlink(f"/proc/self/fd/{out.fileno()}"))
    assert renames == [str(tmp), f"rename {tmp} -> {final}", str(tmp_path)]
