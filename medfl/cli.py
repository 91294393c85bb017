"""medfl: personalized federated learning for medical imaging (PFA, DET, CPA on MONAI).

Each subcommand lives in `medfl/commands/<name>.py` with two functions: `add_arguments(parser)` and
`run(args) -> int`. Command modules import only the standard library at module level, so that
`medfl --help` answers quickly; inside `run` they validate configs and paths first and import torch and
MONAI only then, so that a misspelt key is reported in well under a second.

Exit status: 0 success; 1 a problem with the user's data or configs (a MedflError, one line on stderr);
2 bad usage (argparse); 130 interrupted. Messages go to stderr, results to stdout.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from medfl import __version__
from medfl.environment import keep_freed_memory, prefer_passive_openmp_waiting
from medfl.errors import MedflError, storage_failure

EXIT_OK, EXIT_PROBLEM, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

# (subcommand, module under medfl.commands, one-line help)
COMMANDS: list[tuple[str, str, str]] = [
    ("synth", "synth", "write a deterministic synthetic multi-site data set and its site configs"),
    ("check", "check", "validate site configs and their data; print per-site, per-split, per-class counts"),
    ("run", "run", "run a federated experiment (or resume one) and write its run folder"),
    ("export", "export", "turn a run folder into per-site deliverables: weights, torch.export program, manifest"),
    ("predict", "predict", "apply a site's exported model to dermoscopy images or MRI volumes"),
    ("evaluate", "evaluate", "score a site's exported model on a site's labelled data with the run's metrics"),
    ("verify", "verify", "check every file of an export or a MONAI bundle against the sha256 it records"),
    ("report", "report", "compare run folders: markdown tables per site and mean, PNG curves and plots"),
    ("nvflare-job", "nvflare_job", "write an NVIDIA FLARE job folder for an experiment (simulator, POC, production)"),
    ("config-reference", "config_reference", "print or write the site-config and experiment-config references"),
    ("init", "init", "write a commented site config and experiment config per task to start from"),
    ("docs", "docs", "list, print or write medfl's documentation (shipped with the package)"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medfl", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"medfl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name, help_text in COMMANDS:
        module = importlib.import_module(f"medfl.commands.{module_name}")
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(command_parser)
        command_parser.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    prefer_passive_openmp_waiting()  # before any command imports torch
    keep_freed_memory()  # torch's CPU allocations reuse freed pages instead of faulting them in again
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return EXIT_OK
    try:
        return int(args._run(args) or EXIT_OK)
    except MedflError as error:
        print(f"medfl {args.command}: error: {error}", file=sys.stderr)
        return EXIT_PROBLEM
    except KeyboardInterrupt:
        print(f"medfl {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:
        full = storage_failure(error)  # a full or read-only disk is the user's to fix, whatever carried it
        if full is None:
            raise
        print(f"medfl {args.command}: error: {full}", file=sys.stderr)
        return EXIT_PROBLEM


if __name__ == "__main__":
    sys.exit(main())
