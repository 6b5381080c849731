"""The shared atomic writer: honest changed, check mode, mode bits, no half-written files."""

import os
import stat

import pytest

from ansible_collections.dsmesh.cluster.plugins.module_utils import files as ds_files
from ansible_collections.dsmesh.cluster.plugins.module_utils.files import FileWriteError, parse_mode, write_file


def test_changed_only_when_content_or_mode_differs(tmp_path):
    path = tmp_path / "f"
    assert write_file(str(path), "a\n", 0o644)["changed"]
    assert not write_file(str(path), "a\n", 0o644)["changed"]
    assert write_file(str(path), "a\n", 0o600)["changed"]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    result = write_file(str(path), "b\n", 0o600)
    assert result["changed"] and result["diff"]["before"] == "a\n" and result["diff"]["after"] == "b\n"


def test_check_mode_writes_nothing(tmp_path):
    path = tmp_path / "f"
    assert write_file(str(path), "a\n", check_mode=True)["changed"]
    assert not path.exists()


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "f"
    path.write_text("old\n")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    # The failure strikes after the new bytes went to the temporary file, before the rename.
    monkeypatch.setattr(ds_files.os, "fsync", disk_full)
    with pytest.raises(OSError):
        write_file(str(path), "new content\n")
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_missing_directory_and_modes(tmp_path):
    with pytest.raises(FileWriteError, match="does not exist"):
        write_file(str(tmp_path / "no" / "f"), "x")
    assert parse_mode("0644") == 0o644 and parse_mode("600") == 0o600 and parse_mode(0o755) == 0o755
    with pytest.raises(FileWriteError):
        parse_mode("rw-r--r--")
