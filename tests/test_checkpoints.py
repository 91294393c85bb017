import json
import math
import os
import pathlib

import pytest
import torch

from medfl.checkpoints import atomic_torch_save, atomic_write_json, atomic_write_text, load_torch_file
from medfl.errors import DataError


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
