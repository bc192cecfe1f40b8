"""A checkpoint's staging file cannot be hijacked: its name is unguessable and it is created
fresh, never through a symlink planted in the checkpoint folder."""

import os

import torch

from training.checkpoint import checkpoint_dir, load_checkpoint, save_checkpoint


def test_planted_symlinks_do_not_redirect_the_write(tmp_path):
    folder = checkpoint_dir(tmp_path)
    folder.mkdir(parents=True)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    # Every name a predictable scheme could pick for step 1 (pid-based, as before) points at the victim.
    for pid in {os.getpid(), os.getppid()}:
        os.symlink(victim, folder / f".step-000001.pt.tmp-{pid}")
    path = save_checkpoint(tmp_path, 1, {"weights": torch.arange(3)}, keep=2)
    assert victim.read_text() == "precious"
    assert torch.equal(load_checkpoint(tmp_path, path)["weights"], torch.arange(3))
    assert not path.is_symlink()


def test_staging_names_differ_between_saves(tmp_path, monkeypatch):
    opened = []
    real_open = os.open

    def recording_open(path, flags, *args):
        opened.append((os.path.basename(path), flags))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", recording_open)
    save_checkpoint(tmp_path, 1, {"x": 1}, keep=0)
    save_checkpoint(tmp_path, 1, {"x": 2}, keep=0)
    names = [name for name, _ in opened if ".tmp-" in name]
    assert len(names) == 2 and names[0] != names[1]
    assert all(flags & os.O_EXCL and flags & os.O_NOFOLLOW for name, flags in opened if ".tmp-" in name)
