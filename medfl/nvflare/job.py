"""`medfl nvflare-job`: write an NVFlare job folder that runs an experiment in the simulator, POC or production.

The job has one app for the server (the medfl controller, the experiment config) and one app per site,
named after the site configs (NVFlare's client names must be the same): the entry script, the experiment
config, the site's own config and its run folder. medfl itself is not copied into the job: every host
installs `medfl[nvflare]`, so the job holds configs only, and the server's controller is referenced by its
class path (`medfl.nvflare.controller.MedflController`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from medfl.checkpoints import atomic_write_text
from medfl.errors import ConfigError
from medfl.experiment import ExperimentConfig
from medfl.nvflare import refuse_in_process_only, require_nvflare
from medfl.nvflare.layout import CONFIG_FOLDER, EXPERIMENT_FILE, JOB_FILE, SITE_FILE, SITE_SCRIPT
from medfl.runfolder import run_directory

CONTROLLER_CLASS = "medfl.nvflare.controller.MedflController"


def default_run_dir(config: ExperimentConfig) -> Path:
    """`<output_dir>/<name>-<method>-seed<seed>-nvflare`: beside, never inside, an in-process run folder."""
    base = run_directory(config, None)
    return base.with_name(base.name + "-nvflare")


def job_name(config: ExperimentConfig) -> str:
    return f"medfl-{config.name}-{config.method}"


@contextmanager
def _working_folder(path: Path) -> Iterator[None]:
    """FedJob resolves a Client API script against the working folder (when added and when exported), and
    writes that path into the client config: a bare file name keeps the job free of the writer's paths."""
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def write_job(
    config: ExperimentConfig,
    out: str | Path,
    run_dir: str | Path | None = None,
    start_timeout: int = 3600,
    round_timeout: int = 3600,
    min_sites: int | None = None,
) -> Path:
    """Write the job folder `out` (it must not exist or be empty) and return it.

    `run_dir` is where the server and the sites keep the run (absolute once written; each host may move its
    part with `MEDFL_RUN_DIR`). `min_sites` is how many sites must be connected for the job to start (all
    by default); the timeouts are in seconds, 0 for none.
    """
    refuse_in_process_only(config)
    require_nvflare()
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out}: already exists and is not empty; choose a new job folder")
    sites = config.load_sites()
    names = [site.name for site in sites]
    min_sites = len(names) if min_sites is None else min_sites
    if not 1 <= min_sites <= len(names):
        raise ConfigError(f"min_sites must be between 1 and the number of sites ({len(names)}), got {min_sites}")
    for label, value in (("start_timeout", start_timeout), ("round_timeout", round_timeout)):
        if value < 0:
            raise ConfigError(f"{label} must be >= 0 seconds (0: no limit), got {value}")
    run_dir = Path(run_dir).expanduser().resolve() if run_dir is not None else default_run_dir(config)

    # start-up: the [nvflare] extra, torch and MONAI load only here, once everything is checked
    from nvflare.client.config import ExchangeFormat
    from nvflare.job_config.api import FedJob
    from nvflare.job_config.script_runner import FrameworkType, ScriptRunner

    from medfl.nvflare.controller import MedflController

    job = FedJob(name=job_name(config), min_clients=min_sites)
    job.set_app_packages(["medfl"])
    job.to_server(MedflController(sites=names, run_dir=str(run_dir), start_timeout=start_timeout,
                                  round_timeout=round_timeout), id="controller")
    with tempfile.TemporaryDirectory(prefix="medfl-job-") as tmp:
        staging = Path(tmp)
        experiment = atomic_write_text(staging / EXPERIMENT_FILE, yaml.safe_dump(config.resolved(), sort_keys=False))
        settings = atomic_write_text(staging / JOB_FILE, yaml.safe_dump({"run_dir": str(run_dir)}))
        shutil.copyfile(Path(__file__).with_name(SITE_SCRIPT), staging / SITE_SCRIPT)
        job.add_file_to_server(str(experiment), dest_dir=CONFIG_FOLDER, app_folder_type="config")
        with _working_folder(staging):
            for site in sites:
                # the Client API in the site's job process, torch tensors on the wire in both directions
                job.to(ScriptRunner(script=SITE_SCRIPT, framework=FrameworkType.PYTORCH,
                                    server_expected_format=ExchangeFormat.PYTORCH), site.name)
                site_file = atomic_write_text(staging / "sites" / site.name / SITE_FILE,
                                              yaml.safe_dump(site.model_dump(mode="json"), sort_keys=False))
                for path in (experiment, settings, site_file):
                    job.add_file_to(str(path), site.name, dest_dir=CONFIG_FOLDER, app_folder_type="config")
            job.export_job(str(staging / "export"))
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            out.rmdir()
        shutil.move(str(staging / "export" / job.name), str(out))
    return out
