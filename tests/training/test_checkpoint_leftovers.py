"""What a killed checkpoint save leaves behind (its hidden staging file, or a folder under such a
name) is removed by the run's next save; checkpoints and every other entry stay byte for byte."""

import hashlib
import logging
import os
import secrets

import torch

from training.checkpoint import checkpoint_dir, list_checkpoints, load_checkpoint, remove_stale_staging, save_checkpoint


def _plant_leftovers(folder, outside):
    """Staging entries as killed saves leave them: a half-written file, an empty one, a folder
    with content, and a pid-named one from the earlier naming scheme, here a symlink to `outside`."""
    partial = folder / f".step-000002.pt.tmp-{secrets.token_hex(16)}"
    partial.write_bytes(b"PK\x03\x04 half a zip")
    empty = folder / f".step-000003.pt.tmp-{secrets.token_hex(16)}"
    empty.touch()
    nested = folder / f".step-000004.pt.tmp-{secrets.token_hex(16)}"
    (nested / "data").mkdir(parents=True)
    (nested / "data" / "0").write_bytes(b"tensor bytes")
    link = folder / f".step-000002.pt.tmp-{os.getpid()}"
    link.symlink_to(outside, target_is_directory=True)
    return [partial, empty, nested, link]


def _plant_unrelated(folder):
    """Entries the cleanup must not touch: near-miss names, user files, a nested staging name."""
    names = ["notes.txt", ".step-000002.pt.tmp-notes", "step-000002.pt.tmp-abc123", ".step-000002.pt",
             ".other.pt.tmp-abc123", ".step-x.pt.tmp-abc123", ".step-000002.pt.tmp-", ".step-000002.pt.old-abc123"]
    for name in names:
        (folder / name).write_text(name)
    (folder / "kept_folder").mkdir()
    (folder / "kept_folder" / ".step-000009.pt.tmp-abc123").write_text("not at the top level")
    return [folder / name for name in names]


def _digest(root):
    return {p.relative_to(root): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_next_save_removes_killed_saves_staging_and_nothing_else(tmp_path, caplog):
    first = save_checkpoint(tmp_path, 1, {"weights": torch.arange(4)}, keep=5)
    folder = checkpoint_dir(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep me")
    leftovers = _plant_leftovers(folder, outside)
    kept_before = {path: path.read_bytes() for path in [first, *_plant_unrelated(folder)]}
    outside_before = _digest(outside)

    with caplog.at_level(logging.INFO, logger="training.checkpoint"):
        second = save_checkpoint(tmp_path, 2, {"weights": torch.arange(5)}, keep=5)

    assert not any(os.path.lexists(path) for path in leftovers)
    assert {path: path.read_bytes() for path in kept_before} == kept_before
    assert (folder / "kept_folder" / ".step-000009.pt.tmp-abc123").read_text() == "not at the top level"
    assert _digest(outside) == outside_before  # the symlink went, not what it pointed at
    assert list_checkpoints(tmp_path) == [first, second]
    assert torch.equal(load_checkpoint(tmp_path)["weights"], torch.arange(5))
    assert torch.equal(load_checkpoint(tmp_path, first)["weights"], torch.arange(4))
    removal = [record.getMessage() for record in caplog.records if "stale checkpoint staging" in record.getMessage()]
    assert len(removal) == 1 and all(path.name in removal[0] for path in leftovers), removal
    # Nothing of this save's own staging survives it, and a save with no leftovers logs nothing.
    assert {p.name for p in folder.iterdir() if p.name.startswith(".")} == {p.name for p in kept_before if p.name.startswith(".")}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="training.checkpoint"):
        save_checkpoint(tmp_path, 3, {"weights": torch.arange(6)}, keep=5)
    assert not [record for record in caplog.records if "stale checkpoint staging" in record.getMessage()]


def test_cleanup_of_a_run_without_checkpoints_is_a_no_op(tmp_path):
    assert remove_stale_staging(tmp_path) == []
    assert not checkpoint_dir(tmp_path).exists()


def test_an_unremovable_leftover_is_logged_and_the_save_goes_on(tmp_path, monkeypatch, caplog):
    folder = checkpoint_dir(tmp_path)
    folder.mkdir(parents=True)
    leftover = folder / f".step-000001.pt.tmp-{secrets.token_hex(16)}"
    leftover.write_bytes(b"partial")
    real_unlink = type(leftover).unlink

    def refusing_unlink(path, *args, **kwargs):
        if path == leftover:
            raise PermissionError(13, "Permission denied", str(path))
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(type(leftover), "unlink", refusing_unlink)
    with caplog.at_level(logging.INFO, logger="training.checkpoint"):
        path = save_checkpoint(tmp_path, 1, {"x": torch.ones(2)}, keep=2)
    assert torch.equal(load_checkpoint(tmp_path, path)["x"], torch.ones(2))
    assert leftover.exists()
    assert any(record.levelno == logging.WARNING and leftover.name in record.getMessage() for record in caplog.records)
