"""The one device setting: "auto" (a CUDA GPU when there is one), "cpu" or "cuda"."""

from __future__ import annotations

import torch

from medfl.errors import ConfigError


def resolve_device(choice: str) -> torch.device:
    """"auto": CUDA when present, else CPU; "cuda" without a GPU is a config error."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but no CUDA GPU is available (use 'auto' or 'cpu')")
    return torch.device(choice)
