"""files.atomic_write / atomic_path: old file or new file, never half of one; no temp left behind."""

import os
import stat
import subprocess
import sys
import textwrap

import pytest

from sharp_unlearn import files
from sharp_unlearn.files import atomic_path, atomic_write


def _leftovers(folder):
    return sorted(p.name for p in folder.glob(".*tmp"))


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_write_text_and_bytes(tmp_path):
    target = tmp_path / "sub" / "out.json"  # missing parent folders are created
    assert atomic_write(target, "héllo") == target
    assert target.read_text(encoding="utf-8") == "héllo"
    atomic_write(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert _leftovers(target.parent) == []


def test_temp_file_is_hidden_in_the_same_folder(tmp_path):
    temp = files.temp_path_for(tmp_path / "a.txt")
    assert temp.parent == tmp_path and temp.name == f".a.txt.{os.getpid()}.tmp"


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch, failing):
    target = tmp_path / "state.json"
    target.write_text("old")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(files.os, failing, boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, "new")
    monkeypatch.undo()
    assert target.read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_interrupt_inside_atomic_path_keeps_old_file(tmp_path):
    target = tmp_path / "model.pt"
    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise KeyboardInterrupt
    assert target.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []


def test_atomic_path_replaces_on_success(tmp_path):
    target = tmp_path / "table.parquet"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".") and tmp.name.endswith(".tmp")
        assert not target.exists()  # nothing visible until the block ends
        tmp.write_bytes(b"data")
    assert target.read_bytes() == b"data"
    assert _leftovers(tmp_path) == []


def test_atomic_path_without_a_write_is_an_error_and_keeps_old_file(tmp_path):
    target = tmp_path / "x.bin"
    target.write_bytes(b"old")
    with pytest.raises(FileNotFoundError, match="nothing was written"):
        with atomic_path(target):
            pass
    assert target.read_bytes() == b"old"


def test_killed_writer_leaves_old_file_intact(tmp_path):
    """A process killed mid-write (no cleanup possible) never exposes a partial destination."""
    target = tmp_path / "scores.bin"
    target.write_bytes(b"old")
    script = textwrap.dedent(f"""
        import os, signal
        from sharp_unlearn.files import atomic_path
        with atomic_path({str(target)!r}) as tmp:
            with open(tmp, "wb") as handle:
                handle.write(b"partial")
                handle.flush()
                os.kill(os.getpid(), signal.SIGKILL)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert result.returncode == -9
    assert target.read_bytes() == b"old"


def test_permissions_default_follow_umask_then_old_file(tmp_path):
    previous = os.umask(0o027)
    try:
        fresh = atomic_write(tmp_path / "fresh.txt", "x")
        with atomic_path(tmp_path / "fresh2.txt") as tmp:
            tmp.write_text("x")
    finally:
        os.umask(previous)
    assert _mode(fresh) == 0o640  # 0o666 less the umask, like open(path, "w")
    assert _mode(tmp_path / "fresh2.txt") == 0o640
    existing = tmp_path / "kept.txt"
    existing.write_text("old")
    os.chmod(existing, 0o604)
    atomic_write(existing, "new")
    assert existing.read_text() == "new" and _mode(existing) == 0o604  # rewriting keeps the file's mode


def test_explicit_mode(tmp_path):
    target = atomic_write(tmp_path / "secret", "s", mode=0o600)
    assert _mode(target) == 0o600
    with atomic_path(tmp_path / "public", mode=0o644) as tmp:
        tmp.write_text("p")
    assert _mode(tmp_path / "public") == 0o644
