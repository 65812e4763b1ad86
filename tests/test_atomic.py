"""Atomic writes: permissions from the umask without touching it, data and directory entry fsynced."""

from __future__ import annotations

import os
import stat

import pytest

from dsire import atomic


def test_mode_follows_the_umask_which_is_never_changed(tmp_path, monkeypatch):
    previous = os.umask(0o027)
    try:
        monkeypatch.setattr(os, "umask", lambda mask: pytest.fail("the umask was set (races with other threads)"))
        atomic.atomic_write_text(tmp_path / "sub" / "a.txt", "hello")
    finally:
        monkeypatch.undo()
        os.umask(previous)
    written = tmp_path / "sub" / "a.txt"
    assert written.read_text() == "hello" and stat.S_IMODE(written.stat().st_mode) == 0o640
    assert os.listdir(tmp_path / "sub") == ["a.txt"]


def test_data_and_directory_are_fsynced(tmp_path, monkeypatch):
    synced = []
    fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(stat.S_ISDIR(os.fstat(fd).st_mode)) or fsync(fd))
    atomic.atomic_write_text(tmp_path / "a.txt", "hello")
    assert synced == [False, True]  # the file's data, then the directory holding the rename
    synced.clear()
    with atomic.atomic_path(tmp_path / "b.txt", durable=False) as tmp:  # cache entries: no fsync
        tmp.write_text("hello")
    assert synced == [] and (tmp_path / "b.txt").read_text() == "hello"


def test_failure_leaves_the_old_file(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic.atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["a.txt"]
