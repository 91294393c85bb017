"""`medfl` commands in processes of their own that do not import torch and MONAI again each time.

Some tests need a real process: one they kill with SIGKILL, one that resumes a run from its folder alone, two
that race for a run folder's lock. A fresh interpreter spends 5-9 CPU-seconds importing torch and MONAI before
it does anything, so these processes fork from multiprocessing's fork server instead, which imported medfl's
command line and its training modules once (per test process) and does nothing else: no torch operation, no
run, no open run folder. Each forked process then calls `medfl.cli.main` as `python -m medfl.cli` would.
medfl's parallel site workers fork from the same server (medfl.federated.parallel), which preloads the
modules named below too. The server keeps the environment and working folder it started with: tests give
absolute paths and change no environment for these processes. As with any start method but fork, the test
process's main module must import without running anything (pytest's and pytest-xdist's do).
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

# What every `medfl run` imports, torch._dynamo included (torch's optimizers import it on first use: 2 s).
PRELOADED = ["medfl.cli", "medfl.commands.run", "medfl.federated.coordinator", "medfl.federated.parallel",
             "medfl.federated.site", "medfl.tasks", "torch._dynamo"]


def _medfl(arguments: list[str], stdout: str, stderr: str | None, ready: str | None, go: str | None) -> None:
    """In the forked process: stdout and stderr into files, then (after the go file, if asked) the command."""
    for fd, path in ((1, stdout), (2, stderr or stdout)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(target, fd)
        os.close(target)
    from medfl.cli import main

    if ready is not None:
        Path(ready).touch()
        while not Path(go).exists():
            time.sleep(0.001)
    sys.exit(main(arguments))


class MedflProcess:
    """`medfl ARGUMENTS` in a process of its own; its output (stdout and, unless `stderr` names a file of its own,
    stderr) goes to the file `stdout`. With `ready` and `go`, the process touches `ready` once medfl is loaded and
    waits for the file `go` before it runs the command."""

    def __init__(self, arguments: Sequence[str], stdout: Path, stderr: Path | None = None,
                 ready: Path | None = None, go: Path | None = None):
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOADED)  # where this starts the server; else it preloaded these already
        self.args = ["medfl", *arguments]  # as subprocess.Popen names it (conftest.wait_for_files says which ended)
        self.stdout, self.stderr = Path(stdout), Path(stderr) if stderr else None
        self.process = context.Process(target=_medfl, name="medfl", args=(
            list(arguments), str(stdout), str(stderr) if stderr else None, str(ready) if ready else None,
            str(go) if go else None))
        self.process.start()
        self.pid = self.process.pid

    def poll(self) -> int | None:
        """The exit status (negative: the signal that ended it) once the process has ended, else None."""
        return self.process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        """The exit status, once the process has ended; one still running after `timeout` is killed."""
        self.process.join(timeout)
        if self.process.exitcode is None:
            self.process.kill()
            self.process.join()
            raise TimeoutError(f"medfl did not end within {timeout} s:\n{self.output()[-3000:]}")
        return self.process.exitcode

    def output(self) -> str:
        return self.stdout.read_text() if self.stdout.exists() else ""

    def errors(self) -> str:
        return self.stderr.read_text() if self.stderr and self.stderr.exists() else ""
