"""Where things lie in a medfl NVFlare job, and the two environment variables a host may set.

Every app of a job carries `config/medfl/experiment.yaml` (the resolved experiment config); a site's app
also carries `config/medfl/site.yaml` (its own site config), `config/medfl/job.yaml` (its run folder) and
the entry script `custom/medfl_site.py`.
A hospital whose data lies elsewhere points `MEDFL_SITE_CONFIG` at its own site config; any host (server
or site) may move its part of the run folder with `MEDFL_RUN_DIR`.
"""

from __future__ import annotations

import os
from pathlib import Path

CONFIG_FOLDER = "medfl"  # under each app's config/ folder
EXPERIMENT_FILE = "experiment.yaml"
SITE_FILE = "site.yaml"
JOB_FILE = "job.yaml"  # settings of this job at a site: run_dir
SITE_SCRIPT = "medfl_site.py"  # under each site app's custom/ folder
RUN_DIR_ENV = "MEDFL_RUN_DIR"
SITE_CONFIG_ENV = "MEDFL_SITE_CONFIG"


def resolve_run_dir(from_job: str | Path) -> Path:
    """The run folder of this host: `MEDFL_RUN_DIR` when set, else the job's; relative to the working folder.

    It must outlive a job (the simulator wipes its workspace), so that a restarted job resumes from it.
    """
    return Path(os.environ.get(RUN_DIR_ENV) or from_job).expanduser().resolve()


def site_config_path(config_dir: Path) -> Path:
    """This site's config: `MEDFL_SITE_CONFIG` when set, else the one the job carries."""
    override = os.environ.get(SITE_CONFIG_ENV)
    return Path(override).expanduser() if override else config_dir / SITE_FILE
