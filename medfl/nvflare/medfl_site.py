"""Entry point of a medfl site under NVIDIA FLARE's Client API (copied into each site app's custom/ folder).

NVFlare runs this file as a script; it reads the job's `config/medfl/` folder next to `custom/`.
"""

from pathlib import Path

from medfl.nvflare.site_runner import main

if __name__ == "__main__":
    main(Path(__file__).resolve().parents[1] / "config" / "medfl")
