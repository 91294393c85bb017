"""`medfl nvflare-job EXPERIMENT.yaml --out JOB_DIR`: write an NVIDIA FLARE job for an experiment."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("experiment", help="experiment config (YAML); its site configs name the NVFlare sites")
    parser.add_argument("--out", required=True, help="job folder to write (must not exist or be empty)")
    parser.add_argument("--run-dir", help="run folder of the server and the sites "
                        "(default: <output_dir>/<name>-<method>-seed<seed>-nvflare; MEDFL_RUN_DIR overrides it per host)")
    parser.add_argument("--round-timeout", type=int, default=3600,
                        help="seconds a site may take for one round before the round goes on without it (0: none)")
    parser.add_argument("--start-timeout", type=int, default=3600,
                        help="seconds a site may take to load its data and answer first (0: none)")
    parser.add_argument("--min-sites", type=int, help="sites that must be connected for the job to start (default: all)")
    parser.add_argument("--rounds", type=int, help="override the number of rounds")
    parser.add_argument("--method", help="override the method (e.g. fedavg, prr)")
    parser.add_argument("--seed", type=int, help="override the seed")


def run(args: argparse.Namespace) -> int:
    from medfl.experiment import load_experiment_config
    from medfl.nvflare import refuse_in_process_only, require_nvflare

    config = load_experiment_config(args.experiment, rounds=args.rounds, method=args.method, seed=args.seed)
    sites = [site.name for site in config.load_sites()]  # validated before NVFlare, torch and MONAI load
    refuse_in_process_only(config)
    require_nvflare()
    from medfl.nvflare.job import CONTROLLER_CLASS, write_job

    out = write_job(config, args.out, run_dir=args.run_dir, start_timeout=args.start_timeout,
                    round_timeout=args.round_timeout, min_sites=args.min_sites)
    print(f"wrote NVFlare job {out} for sites {', '.join(sites)} (NVFlare client names must be the same)")
    print(f"simulator: nvflare simulator {out} -w <workspace> -t {len(sites)}")
    print(f"POC or production: allow {CONTROLLER_CLASS} in the server's local/resources.json class_allow_list, "
          f"then: nvflare job submit -j {out}")
    return 0
