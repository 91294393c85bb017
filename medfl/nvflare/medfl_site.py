"""Entry point of a medfl site under NVIDIA FLARE's Client API (copied into each site app's custom/ folder).

NVFlare runs this file as a script; it reads the job's `config/medfl/` folder next to `custom/`. Like the
`medfl` command, it makes medfl's process-wide settings before torch loads (when NVFlare has not loaded
torch already).
"""

from pathlib import Path

from medfl.environment import keep_freed_memory, prefer_passive_openmp_waiting

if __name__ == "__main__":
    prefer_passive_openmp_waiting()
    keep_freed_memory()
    from medfl.nvflare.site_runner import main

    main(Path(__file__).resolve().parents[1] / "config" / "medfl")
