import errno
import json
import math
import os
import pathlib
import stat

import pytest
import torch

from medfl.checkpoints import (
    atomic_folder,
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
    load_torch_file,
    staging_folder,
)
from medfl.errors import DataError, WriteError


class Payload:
    """Unpickling this writes a marker file: proof that loading ran code."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "file.txt"
    atomic_write_text(target, "first")
    atomic_write_text(target, "second")
    assert target.read_text() == "second"
    assert [p.name for p in target.parent.iterdir()] == ["file.txt"]


def test_failed_write_keeps_previous_file(tmp_path):
    target = tmp_path / "state.pt"
    atomic_torch_save({"a": torch.ones(2)}, target)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError):
        atomic_torch_save({"bad": Unpicklable()}, target)
    assert torch.equal(torch.load(target, weights_only=True)["a"], torch.ones(2))
    assert sorted(os.listdir(tmp_path)) == ["state.pt"]


def test_json_writes_nan_and_inf_as_null(tmp_path):
    target = atomic_write_json(tmp_path / "s.json", {"x": math.nan, "y": [1.0, math.inf], "z": 2})
    assert json.loads(target.read_text()) == {"x": None, "y": [1.0, None], "z": 2}


def test_load_torch_file_returns_tensors_and_plain_containers(tmp_path):
    state = {"round": 3, "models": {"P": {"w": torch.arange(4.0)}}, "names": ["a", "b"], "ratio": 0.5}
    atomic_torch_save(state, tmp_path / "state.pt")
    loaded = load_torch_file(tmp_path / "state.pt")
    assert loaded["round"] == 3 and loaded["names"] == ["a", "b"] and loaded["ratio"] == 0.5
    assert torch.equal(loaded["models"]["P"]["w"], torch.arange(4.0))


@pytest.mark.parametrize("form", ["zip", "legacy"])
def test_a_crafted_pickle_is_refused_without_running(tmp_path, form):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "last.pt"
    # Both torch formats run the payload under weights_only=False.
    torch.save({"round": 1, "state": Payload(marker)}, path, _use_new_zipfile_serialization=form == "zip")
    with pytest.raises(DataError, match="refused") as caught:
        load_torch_file(path, site="derm_a")
    message = str(caught.value)
    assert message.startswith(f"site 'derm_a': {path}: refused") and "\n" not in message
    assert "weights_only=False" not in message
    assert not marker.exists()


def test_corrupt_truncated_empty_and_missing_files_are_one_line_naming_the_file(tmp_path):
    atomic_torch_save({"w": torch.ones(100)}, tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file at all")
    (tmp_path / "empty.pt").write_bytes(b"")
    for name in ("truncated.pt", "garbage.pt", "empty.pt", "missing.pt"):
        with pytest.raises(DataError) as caught:
            load_torch_file(tmp_path / name)
        message = str(caught.value)
        assert message.startswith(f"{tmp_path / name}: ") and "\n" not in message, message


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002], ids=["umask022", "umask077", "umask002"])
def test_atomic_writes_get_the_permissions_of_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "new" / "summary.json", "{}")
        atomic_torch_save({"w": torch.ones(2)}, tmp_path / "new" / "last.pt")
        atomic_write_text(tmp_path / "new" / "summary.json", "{}")  # a replaced file too
        with atomic_folder(tmp_path / "export" / "derm_a") as staging:
            atomic_write_text(staging / "manifest.json", "{}")
            (staging / "models").mkdir()
        with staging_folder(tmp_path, "mask.nii.gz") as staging:
            staging_mode = stat.S_IMODE(staging.stat().st_mode)
    finally:
        os.umask(previous)
    modes = {path.relative_to(tmp_path).as_posix(): stat.S_IMODE(path.stat().st_mode)
             for path in tmp_path.rglob("*")}
    folder, file = 0o777 & ~umask, 0o666 & ~umask
    assert modes == {"new": folder, "new/summary.json": file, "new/last.pt": file, "export": folder,
                     "export/derm_a": folder, "export/derm_a/manifest.json": file, "export/derm_a/models": folder}
    assert staging_mode == folder


class FullDisk:
    """A file on a full disk: every write fails with ENOSPC, as the system call does."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def flush(self):
        self.stream.flush()

    def fileno(self):
        return self.stream.fileno()

    def close(self):
        self.stream.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def test_a_full_disk_is_one_line_naming_the_file_and_the_previous_file_stays(tmp_path, monkeypatch):
    """torch.save writing into such a file raises `RuntimeError: [enforce fail at inline_container.cc:672]
    unexpected pos`: every writer must turn it into the one line naming the file."""
    target = tmp_path / "last.pt"
    atomic_torch_save({"a": torch.ones(2)}, target)
    atomic_write_text(tmp_path / "summary.json", "{}")
    real = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, *args, **kwargs: FullDisk(real(fd, *args, **kwargs)))
    for write, path in ((lambda: atomic_torch_save({"a": torch.zeros(1000)}, target), target),
                        (lambda: atomic_write_json(tmp_path / "summary.json", {"b": 1}), tmp_path / "summary.json")):
        with pytest.raises(WriteError) as caught:
            write()
        assert str(caught.value) == f"{path}: cannot write (No space left on device)"
    monkeypatch.undo()
    assert torch.equal(torch.load(target, weights_only=True)["a"], torch.ones(2))
    assert (tmp_path / "summary.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "summary.json"], "no temporary file is left"
