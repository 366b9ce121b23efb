"""Atomic writes: a failure leaves the previous state whole; fingerprints follow content."""

import errno

import pytest
import torch

from llmlab.checkpoint import (CheckpointWriteFailed, atomic_dir, atomic_write_json, fingerprint, latest_checkpoint,
                               load_checkpoint, save_checkpoint)
from llmlab.errors import expected_failure


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


def test_a_save_that_fails_halfway_names_the_path_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 2, {"w": torch.tensor([2.0])})
    real_save = torch.save

    def save_then_fail(obj, f):  # half the bytes reach the disk, then it is full
        real_save(obj, f)
        f.truncate(f.tell() // 2)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", save_then_fail)
    with pytest.raises(CheckpointWriteFailed) as info:
        save_checkpoint(tmp_path, 4, {"w": torch.tensor([4.0])})
    message = expected_failure(info.value, "pretrain")
    assert message.startswith("stage 'pretrain': could not write checkpoint ") and str(tmp_path / "step-00000004") in message
    assert "No space left on device" in message and "step-00000002 stays latest" in message
    assert latest_checkpoint(tmp_path).name == "step-00000002"
    assert float(load_checkpoint(latest_checkpoint(tmp_path))["w"]) == 2.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000002"]  # no half-written folder


def test_a_training_run_whose_save_fails_resumes_from_the_previous_checkpoint(tmp_path, monkeypatch):
    from helpers import CountingBatches, tiny_model, train_spec
    from llmlab.train.loop import train
    from llmlab.train.objectives import LanguageModeling

    real_save, calls = torch.save, []

    def fail_second(obj, f):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos; file write failed")
        real_save(obj, f)

    monkeypatch.setattr(torch, "save", fail_second)
    with pytest.raises(CheckpointWriteFailed, match="step-00000004 stays latest"):
        train(tiny_model(), LanguageModeling(), CountingBatches(4), train_spec(), tmp_path, seed=1)
    monkeypatch.setattr(torch, "save", real_save)
    result = train(tiny_model(), LanguageModeling(), CountingBatches(4), train_spec(), tmp_path, seed=1)
    assert result.resumed_from == 4 and result.step == 12
