"""Atomic writes: a failure leaves the previous state whole; fingerprints follow content."""

import pytest
import torch

from llmlab.checkpoint import atomic_dir, atomic_write_json, fingerprint, latest_checkpoint, save_checkpoint


def test_atomic_dir_failure_keeps_old_content_and_leaves_no_temp(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "w.bin").write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "w.bin").write_bytes(b"half")
            raise RuntimeError("killed mid-write")
    assert (target / "w.bin").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_atomic_dir_replaces_whole_folder(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    with atomic_dir(target) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b"]


def test_fingerprint_changes_with_content_not_location(tmp_path):
    for d in ("x", "y"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "f").write_text("same")
    assert fingerprint(tmp_path / "x") == fingerprint(tmp_path / "y")
    (tmp_path / "y" / "f").write_text("changed")
    assert fingerprint(tmp_path / "x") != fingerprint(tmp_path / "y")


def test_latest_checkpoint_ignores_incomplete_and_prunes(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, {"w": torch.tensor([float(step)]), "step": step})
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000002", "step-00000003"]
    (tmp_path / "step-00000009").mkdir()  # a crash before state.pt was renamed in
    (tmp_path / "latest").write_text("step-00000009\n")
    assert latest_checkpoint(tmp_path).name == "step-00000003"


def test_atomic_write_json_roundtrip(tmp_path):
    atomic_write_json(tmp_path / "a" / "s.json", {"b": 1})
    assert (tmp_path / "a" / "s.json").read_text().strip() == '{\n  "b": 1\n}'
