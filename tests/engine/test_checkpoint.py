"""Atomic checkpoints: interrupted writes, weights_only loading, architecture checks."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from sharp_unlearn.config import load_config
from sharp_unlearn.engine import checkpoint as ckpt
from sharp_unlearn.engine.checkpoint import load_checkpoint, load_model_state, save_checkpoint
from sharp_unlearn.errors import ConfigError
from sharp_unlearn.models import build_model


def payload(value: float) -> dict:
    return {"model": {"w": torch.full((64, 64), value)}, "epoch": int(value), "config_hash": "abc",
            "history": [{"epoch": 1, "train_loss": 0.5}], "completed": False}


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name != "checkpoint.pt")


def test_round_trip(tmp_path):
    path = save_checkpoint(tmp_path / "sub" / "checkpoint.pt", payload(3.0))
    state = load_checkpoint(path)
    assert state["format_version"] == ckpt.FORMAT_VERSION
    assert torch.equal(state["model"]["w"], torch.full((64, 64), 3.0))
    assert state["epoch"] == 3 and state["config_hash"] == "abc"
    assert state["history"] == [{"epoch": 1, "train_loss": 0.5}]
    assert leftovers(path.parent) == []


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit, OSError])
def test_interrupted_write_keeps_old_checkpoint_and_no_temp(tmp_path, monkeypatch, interrupt):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, payload(1.0))
    real_save = torch.save

    def half_then_die(obj, handle, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        handle.write(data[: len(data) // 2])  # part of the new file reaches the disk...
        handle.flush()
        raise interrupt("killed mid-write")  # ...then the process is interrupted

    monkeypatch.setattr(ckpt.torch, "save", half_then_die)
    with pytest.raises(interrupt):
        save_checkpoint(path, payload(2.0))
    monkeypatch.undo()
    state = load_checkpoint(path)
    assert torch.equal(state["model"]["w"], torch.full((64, 64), 1.0))
    assert leftovers(tmp_path) == []  # the half-written temp file was removed


def test_sigkill_mid_write_keeps_old_checkpoint(tmp_path):
    """A real process killed with SIGKILL while writing: no cleanup runs at all."""
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, payload(1.0))
    script = textwrap.dedent(f"""
        import io, os, signal, torch
        from sharp_unlearn.engine import checkpoint as ckpt
        real_save = torch.save
        def die_half_way(obj, handle, *a, **k):
            buf = io.BytesIO(); real_save(obj, buf, *a, **k); data = buf.getvalue()
            handle.write(data[: len(data) // 2]); handle.flush(); os.fsync(handle.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        ckpt.torch.save = die_half_way
        ckpt.save_checkpoint({str(path)!r}, {{"model": {{"w": torch.full((64, 64), 2.0)}}}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    state = load_checkpoint(path)
    assert torch.equal(state["model"]["w"], torch.full((64, 64), 1.0))
    # the orphan is a hidden temp file, never the checkpoint name; the next save still works
    orphans = leftovers(tmp_path)
    assert len(orphans) == 1 and orphans[0].startswith(".checkpoint.pt.") and orphans[0].endswith(".tmp")
    save_checkpoint(path, payload(4.0))
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.full((64, 64), 4.0))


class _Exploit:
    """Unpickling this would run code: weights_only loading must refuse it."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_loading_is_weights_only(tmp_path):
    path = tmp_path / "evil.pt"
    marker = tmp_path / "pwned"
    torch.save({"model": {}, "extra": _Exploit(str(marker))}, path)
    with pytest.raises(ConfigError, match="cannot be read"):
        load_checkpoint(path)
    assert not marker.exists()
    # the same object through a full unpickler would have run (the test can fail)
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_corrupt_missing_and_foreign_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    good = save_checkpoint(tmp_path / "good.pt", payload(1.0))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:300])
    with pytest.raises(ConfigError, match="truncated.pt"):
        load_checkpoint(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(ConfigError, match="not a sharp-unlearn checkpoint"):
        load_checkpoint(foreign)


def small_cnn(width: int, feature_dim: int = 16, classes: int = 10):
    cfg = load_config([], ["model.name=small_cnn", f"model.options={{width: {width}, feature_dim: {feature_dim}}}",
                           "tracking.enabled=false"])
    return build_model(cfg.model, classes, (1, 8, 8))


def test_architecture_mismatch_is_config_error():
    source = small_cnn(8)
    with pytest.raises(ConfigError, match=r"shape of .*\(8, 1, 3, 3\) vs model \(4, 1, 3, 3\)"):
        load_model_state(small_cnn(4), source.state_dict(), "checkpoint x.pt")
    with pytest.raises(ConfigError, match="head.weight"):  # 10 vs 3 classes
        load_model_state(small_cnn(8, classes=3), source.state_dict())
    partial = {k: v for k, v in source.state_dict().items() if not k.startswith("head")}
    with pytest.raises(ConfigError, match="missing"):
        load_model_state(small_cnn(8), partial)
    extra = dict(source.state_dict(), **{"extra.weight": torch.zeros(1)})
    with pytest.raises(ConfigError, match="unexpected"):
        load_model_state(small_cnn(8), extra)
    # the matching architecture loads exactly
    target = small_cnn(8)
    load_model_state(target, source.state_dict())
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value)


def test_temp_file_lives_beside_target(tmp_path, monkeypatch):
    """os.replace is atomic only within one file system: the temp file must be in the target dir."""
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append((Path(src).parent, Path(dst).parent))
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", spy)
    save_checkpoint(tmp_path / "a" / "checkpoint.pt", payload(1.0))
    assert seen == [(tmp_path / "a", tmp_path / "a")]
