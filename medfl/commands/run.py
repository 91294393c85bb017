"""`medfl run EXPERIMENT.yaml`: run a federated experiment in process, or resume it."""

from __future__ import annotations

import argparse
import sys

from medfl.commands import DEVICE_CHOICES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("experiment", help="experiment config (YAML)")
    parser.add_argument("--out", help="run folder (default: <output_dir>/<experiment name>)")
    parser.add_argument("--resume", action="store_true", help="continue after the last completed round")
    parser.add_argument("--device", choices=DEVICE_CHOICES,
                        help="override the config's device (whose default is auto: a CUDA GPU when there is one)")
    parser.add_argument("--rounds", type=int, help="override the number of rounds")
    parser.add_argument("--method", help="override the method (e.g. fedavg, prr)")
    parser.add_argument("--seed", type=int, help="override the seed")
    parser.add_argument("--quiet", action="store_true", help="one line per round instead of a live display")


def run(args: argparse.Namespace) -> int:
    from medfl.experiment import load_experiment_config

    config = load_experiment_config(
        args.experiment, device=args.device, rounds=args.rounds, method=args.method, seed=args.seed
    )
    config.load_sites()  # every site config too, before torch and MONAI load

    from medfl.federated.coordinator import Coordinator, resolve_device, run_directory
    from medfl.progress import ProgressDisplay, print_summary

    run_dir = run_directory(config, args.out)
    device = resolve_device(config.device)
    if config.runtime.threads:
        import torch

        torch.set_num_threads(config.runtime.threads)
    with ProgressDisplay(quiet=args.quiet) as display:
        coordinator = Coordinator(config, run_dir, device, progress=display.event)
        try:
            summary = coordinator.run(resume=args.resume)
        except KeyboardInterrupt:
            display.stop()
            print(f"medfl run: interrupted; the last completed round is kept in {run_dir}: continue with --resume",
                  file=sys.stderr)
            return 130
    print_summary(summary, run_dir)
    return 0
