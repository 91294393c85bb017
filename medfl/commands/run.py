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
    parser.add_argument("--parallel", type=_workers, metavar="N|auto",
                        help="train the sites of a round side by side in N worker processes (overrides the "
                             "config's runtime.parallel_sites; 1: one after another in this process)")
    parser.add_argument("--quiet", action="store_true", help="one line per round instead of a live display")


def _workers(value: str) -> int | str:
    if value == "auto":
        return value
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"'{value}' is neither a number of workers (at least 1) nor auto")
    return int(value)


def run(args: argparse.Namespace) -> int:
    from medfl.errors import WriteError
    from medfl.experiment import load_experiment_config
    from medfl.runfolder import RunFolder, run_directory

    config = load_experiment_config(
        args.experiment, device=args.device, rounds=args.rounds, method=args.method, seed=args.seed
    )
    config.load_sites()  # every site config too, before torch and MONAI load
    run_dir = run_directory(config, args.out)
    try:  # one process per run folder: held from before anything in it is read until the run ends
        with RunFolder(run_dir).lock(create=not args.resume):
            return _run(args, config, run_dir)
    except WriteError as error:  # a full or read-only disk: say what the folder still holds
        raise WriteError(f"{error}; {_what_is_kept(run_dir)}") from None


def _run(args: argparse.Namespace, config, run_dir) -> int:
    from medfl.devices import check_device
    from medfl.runfolder import RunFinished, RunFolder

    try:  # the run folder's checks too: a wrong --out or --resume fails before anything heavy loads
        if args.resume:
            RunFolder.open(run_dir).resume_from(config)
        else:
            RunFolder(run_dir).refuse_to_start()
    except RunFinished as finished:
        print(f"medfl run: {finished}", file=sys.stderr)
        return 0
    check_device(config.device)

    from medfl.devices import resolve_device
    from medfl.federated.coordinator import Coordinator
    from medfl.progress import ProgressDisplay, print_summary
    from medfl.tasks import task_for

    device = resolve_device(config.device)
    task = task_for(config.task, config)
    refusal = task.memory_refusal(config, device)  # 3-D: a batch that cannot fit stops the run before it starts
    if refusal:
        from medfl.errors import ConfigError

        raise ConfigError(refusal)
    if config.runtime.threads:
        import torch

        torch.set_num_threads(config.runtime.threads)
    with ProgressDisplay(quiet=args.quiet) as display:
        coordinator = Coordinator(config, run_dir, device, progress=display.event, parallel=args.parallel,
                                  task=task)
        try:
            summary = coordinator.run(resume=args.resume)
        except KeyboardInterrupt:
            display.stop()
            print(f"medfl run: interrupted; {_what_is_kept(run_dir)}", file=sys.stderr)
            return 130
    print_summary(summary, run_dir)
    return 0


def _what_is_kept(run_dir) -> str:
    """What an interrupted run leaves: its last completed round, a started folder, or nothing at all."""
    from medfl.runfolder import RunFolder

    folder = RunFolder(run_dir)
    if not folder.record_file.is_file():
        return "the run did not start: no run folder was written"
    done = folder.completed_rounds()
    if done == 0:
        return f"no round was completed; {run_dir} restarts at round 0 with --resume"
    kept = "round 0 is" if done == 1 else f"rounds 0..{done - 1} are"
    return f"{kept} kept in {run_dir}: continue with --resume"
