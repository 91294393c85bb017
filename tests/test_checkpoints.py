import json
import math
import os

import pytest
import torch

from medfl.checkpoints import atomic_torch_save, atomic_write_json, atomic_write_text


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
