"""The audit log's view of what leaves a site: tensors by name, shape, dtype and bytes; small ones and plain
values as they are (class counts, sample counts, metric rows)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

SMALL_TENSOR = 64  # tensors up to this many values are written in full (counts)


def describe_values(statistics: dict[str, Any]) -> dict[str, Any]:
    """Statistics that leave a site: every tensor described (with its values when small), every other value as
    it is; `bytes` sums the tensors."""
    tensors = {k: v for k, v in statistics.items() if isinstance(v, Tensor)}
    described = describe_tensors(tensors)
    for entry in described:
        tensor = tensors[entry["name"]]
        if tensor.numel() <= SMALL_TENSOR:
            entry["value"] = tensor.tolist()
    plain = [{"name": k, "value": v} for k, v in statistics.items() if not isinstance(v, Tensor)]
    return {"statistics": described + plain, "bytes": sum(e["bytes"] for e in described)}


def describe_tensors(tensors: dict[str, Tensor]) -> list[dict[str, Any]]:
    """Names, shapes, dtypes and byte sizes of tensors."""
    return [
        {"name": k, "shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch."),
         "bytes": v.numel() * v.element_size()}
        for k, v in tensors.items()
    ]
