"""medfl on NVIDIA FLARE: the same sites and the same aggregation, run by a distributed engine.

- `site_runner`: the site-side adapter on NVFlare's Client API; it drives the very `Site` (a MONAI
  ClientAlgo) that the in-process coordinator drives.
- `controller`: the server workflow, a `ModelController` that calls the engine-free strategies and sends
  each site its own model.
- `job`: writes a job folder (`medfl nvflare-job`) for the simulator, POC mode and production.
- `payloads`: what travels in NVFlare's `FLModel` in each direction; `layout`: where things lie in a job.

Everything here needs the `[nvflare]` extra; the rest of medfl imports and runs without it.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from medfl.errors import ConfigError

INSTALL_HINT = "pip install 'medfl[nvflare]'"


def require_nvflare() -> None:
    """Raise ConfigError with the install command when NVIDIA FLARE is not installed."""
    if importlib.util.find_spec("nvflare") is None:
        raise ConfigError(f"NVIDIA FLARE is not installed; install the extra: {INSTALL_HINT}")


def refuse_in_process_only(config: Any) -> None:
    """Raise ConfigError when the experiment's method runs only in one process (pooled training: one model on
    every site's data), before anything is written or started."""
    if config.spec.pools_data:
        source = f"{config.source_path}: " if config.source_path is not None else ""
        raise ConfigError(f"{source}method '{config.method}' trains one model on every site's data in one process "
                          "(the centralised reference): it runs with `medfl run` only, never under NVIDIA FLARE")
