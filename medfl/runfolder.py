"""A run folder as one object: every path of a run, what the run is, atomic writes, and the only loads.

`RunFolder` is the server's side (config, record, checkpoint, the run's CSVs and summary, TensorBoard);
`SiteFolder` is one site's own part under `sites/<name>/` (its models per round, restart state, audit log and
its record: config hash, data fingerprint, training files), which stays with the site and is never sent to the
server. Both refuse a folder that does not carry their record before reading anything else from it; every
torch file is read with weights_only=True; every write is atomic, and a failed write (full disk, read-only
folder) is one line naming the path, with the last completed round's files left as they were.
One process at a time writes in a run folder, and in a site's part of one: it holds the folder's
`FolderLock` from before it reads anything there until it ends.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from medfl import __version__
from medfl.checkpoints import (
    atomic_torch_save,
    atomic_write_csv,
    atomic_write_json,
    atomic_write_text,
    load_torch_file,
    write_error,
)
from medfl.errors import ConfigError, MedflError, WriteError
from medfl.experiment import load_experiment_config
from medfl.yaml_files import describe_error, load_yaml

try:
    import fcntl
except ImportError:  # not a POSIX system: folders cannot be locked (FolderLock says so once)
    fcntl = None  # type: ignore[assignment]

SCHEMA_VERSION = 1
RECORD_FILE = "run.json"
SITE_RECORD_FILE = "site.json"
LOCK_FILE = "run.lock"  # in a run folder: the OS lock of the process that runs in it, and its PID
SITE_LOCK_FILE = "site.lock"  # the same in a site's part of a run folder
METRIC_COLUMNS = ("round", "epoch", "site", "model", "split", "metric", "value")
RETROGRESS_COLUMNS = ("round", "site", "model", "before", "after", "after_first_epoch", "retrogress", "recovery",
                      "after_bn_reestimated", "retrogress_bn_reestimated")
PARTICIPATION_COLUMNS = ("round", "site", "status")
STATES_KEPT = 2  # restart states kept per site: the last completed round and the one before
_STATE_FILE = re.compile(r"state_round_(\d{4,})\.pt")
_SITE_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_INTEGER_COLUMNS = ("round", "epoch")
_TEXT_COLUMNS = ("site", "model", "split", "metric", "state", "status")
T = TypeVar("T")


class RunFolderError(MedflError):
    """A run folder cannot be used or written: one line naming the folder or file."""


class RunFinished(MedflError):
    """A resumed run has nothing left to do."""


class FolderInUse(RunFolderError):
    """Another process holds the folder's lock: one line naming the folder and that process."""


class RunRecord(BaseModel):
    """What a run is: written when the folder is created, updated as rounds complete."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int
    medfl_version: str
    experiment: str
    task: str
    method: str
    config_sha256: str  # of the resolved config without `rounds` (the one setting a resume may change)
    rounds: int
    completed_rounds: int = 0


class SiteRecord(BaseModel):
    """What a site's part of a run was made from; kept at the site, compared on every restart."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int
    site: str
    site_config_sha256: str
    data_fingerprint: str
    training_files: list[str]
    # How the site names files that are not inputs (segmentation: its mask suffix), from its task, so that an
    # export made where the site config is out of reach can tell a bundle what to leave out. Empty in records
    # written before medfl recorded it.
    inputs: dict[str, str] = {}
    # How data_fingerprint was made (medfl.data.fingerprint.DATA_FINGERPRINT_VERSION); absent, as in the
    # site.json of a medfl that compared image files by size only: 1.
    data_fingerprint_version: int = 1


def _without_worker_count(resolved: Mapping[str, Any]) -> dict[str, Any]:
    """A resolved config without `runtime.parallel_sites`, which a resume may change."""
    runtime = {k: v for k, v in (resolved.get("runtime") or {}).items() if k != "parallel_sites"}
    return {**resolved, "runtime": runtime} if "runtime" in resolved else dict(resolved)


def config_digest(resolved: Mapping[str, Any]) -> str:
    """sha256 of a resolved experiment config, `rounds` left out."""
    text = json.dumps({k: v for k, v in resolved.items() if k != "rounds"}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _guard(path: Path, write: Callable[[], T]) -> T:
    """Run a write; an OS error (full disk, read-only folder, no permission) becomes one WriteError naming
    `path`. What the folder still holds is said by the caller that knows it (`medfl run` names the last
    completed round, read from the folder)."""
    try:
        return write()
    except OSError as error:
        raise write_error(path, error) from None


@dataclass
class _Hold:
    fd: int | None  # the open lock file (None where the platform has no fcntl)
    created: list[Path]  # folders made to hold the lock, deepest first
    count: int = 0  # FolderLock objects of this process holding it


class FolderLock:
    """This process's hold on a folder (a run folder, or a site's part of one): one process at a time writes
    in it.

    An exclusive OS lock (fcntl.flock) on a lock file inside the folder, taken before anything in the folder
    is read, with the holder's PID and host written in the file for the one line a second process gets
    (FolderInUse). The OS drops the lock when the process ends, however it ends: a killed run leaves no
    stale lock, and a lock file left behind means nothing. The lock belongs to the open file, which a forked
    worker process inherits: the folder stays held until the holder and every worker forked while it held
    the lock have ended (a worker started with exec, not fork, must be handed `fileno()`). Within one
    process holding is re-entrant: the run command, the round loop and the NVFlare controller each hold
    the folder, and only the outermost release lets it go. Readers (`report`, `export`, `evaluate`) take
    no lock (see docs/run-folder.md).

    `create`: make the folder when it is missing (a new run), so that two new runs on one folder contend for
    one lock before either looks at the folder. `record`: the file that makes the folder a started run (or
    site part); when the holder lets go of a folder without it, the lock file and the (then empty) folders
    made for it are removed again: a run that never started, or was refused, leaves nothing behind.
    """

    _held: ClassVar[dict[str, _Hold]] = {}
    _registry: ClassVar[threading.Lock] = threading.Lock()
    _warned: ClassVar[bool] = False

    def __init__(self, folder: str | Path, file_name: str, record: str, create: bool = False):
        self.folder = Path(folder)
        self.path = self.folder / file_name
        self.record = self.folder / record
        self.create = create
        self._key: str | None = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.release()

    @property
    def held(self) -> bool:
        return self._key is not None

    def fileno(self) -> int | None:
        """The lock file's descriptor (None without fcntl), for a worker process that must keep the lock."""
        return FolderLock._held[self._key].fd if self._key is not None else None

    def acquire(self) -> FolderLock:
        """Take the folder, or raise FolderInUse naming the process that holds it."""
        if self._key is not None:
            return self
        key = os.path.realpath(self.path)
        with FolderLock._registry:
            hold = FolderLock._held.get(key) or self._take()
            hold.count += 1
            FolderLock._held[key] = hold
        self._key = key
        return self

    def release(self) -> None:
        """Let the folder go (once every holder in this process has let it go)."""
        if self._key is None:
            return
        with FolderLock._registry:
            hold = FolderLock._held[self._key]
            hold.count -= 1
            if hold.count == 0:
                del FolderLock._held[self._key]
                self._let_go(hold)
        self._key = None

    # ------------------------------------------------------------------ the OS lock
    def _take(self) -> _Hold:
        if fcntl is None:
            if not FolderLock._warned:
                FolderLock._warned = True
                print("medfl: this system has no fcntl, so run folders are not locked: make sure that one process "
                      "at a time runs in a run folder", file=sys.stderr)
            return _Hold(None, [])
        created = self._make_folder()
        for _ in range(100):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except FileNotFoundError:  # a holder that gave the folder up removed it meanwhile
                created = self._make_folder() or created
                continue
            except OSError as error:
                raise write_error(self.path, error) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _lock_holder(fd)
                os.close(fd)
                raise FolderInUse(f"{self.folder} is in use by {holder}: one process at a time works in it "
                                  "(wait until that one ends)") from None
            except OSError as error:
                os.close(fd)
                raise RunFolderError(f"{self.path}: cannot lock the folder ({error.strerror or error}); "
                                     "its file system may not support locks") from None
            if _same_file(fd, self.path):
                _write_holder(fd)
                return _Hold(fd, created)
            os.close(fd)  # locked a lock file that its holder removed when it let the folder go: take the new one
        raise RunFolderError(f"{self.path}: the lock file keeps changing; is another program removing it?")

    def _make_folder(self) -> list[Path]:
        """The folders made for the lock, deepest first (none when the folder exists)."""
        if self.folder.is_dir():
            return []
        if self.folder.exists():
            raise RunFolderError(f"{self.folder} exists and is not a folder; nothing was written")
        if not self.create:
            raise RunFolderError(f"{self.folder}: no such folder")
        missing = [folder for folder in (self.folder, *self.folder.parents) if not folder.exists()]
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise write_error(self.folder, error, "cannot create the folder") from None
        return missing

    def _let_go(self, hold: _Hold) -> None:
        if hold.fd is None:
            return
        try:
            if not self.record.exists():
                self.path.unlink()  # still locked: a process that opened this file sees it gone and takes a new one
                for folder in hold.created:
                    folder.rmdir()
        except OSError:
            pass  # not empty (another process started there meanwhile, or a folder of other files): leave it
        finally:
            os.close(hold.fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _write_holder(fd: int) -> None:
    data = f"{os.getpid()} {socket.gethostname()}\n".encode()
    try:
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
    except OSError:
        pass  # a full disk: the lock holds all the same, only the message of a second process lacks the PID


def _lock_holder(fd: int) -> str:
    """Who holds a lock file: "process PID on HOST", read from the file (written right after locking)."""
    for _ in range(50):
        words = os.pread(fd, 256, 0).decode("utf-8", "replace").split()
        if len(words) >= 2 and words[0].isdigit():
            return f"process {words[0]} on {words[1]}"
        time.sleep(0.01)  # the holder has locked the file and is about to write its PID
    return "another process"


def write_rows(path: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> None:
    """Rows (dicts) as CSV, atomically (see medfl.checkpoints.atomic_write_csv)."""
    _guard(path, lambda: atomic_write_csv(path, rows, columns))


def read_rows(path: Path) -> list[dict[str, Any]]:
    """CSV rows with rounds and epochs as ints, text columns as strings and every other value as float."""
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as stream:
        rows = list(csv.DictReader(stream))
    try:
        return [{key: _parse(key, value) for key, value in row.items()} for row in rows]
    except (TypeError, ValueError):
        raise RunFolderError(f"{path}: not a medfl table (unreadable values)") from None


def _parse(key: str, value: str) -> Any:
    if key in _INTEGER_COLUMNS:
        return int(value)
    if key in _TEXT_COLUMNS:
        return value
    return float(value) if value != "" else math.nan


def _read_record(path: Path, model: type[BaseModel], what: str) -> Any:
    if not path.is_file():
        raise RunFolderError(f"{path.parent}: not a {what} (no {path.name}); refusing to read anything in it")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise RunFolderError(f"{path}: unreadable {what} record") from None
    if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION:
        found = data.get("schema_version") if isinstance(data, dict) else None
        raise RunFolderError(f"{path}: {what} of schema version {found!r}; this medfl reads version {SCHEMA_VERSION}")
    try:
        return model.model_validate(data)
    except ValidationError:
        raise RunFolderError(f"{path}: not a valid {what} record") from None


class RunFolder:
    """The server's side of one run folder. Build with `create` (a new run) or `open` (an existing one)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    # ------------------------------------------------------------------ paths
    @property
    def config_file(self) -> Path:
        return self.root / "config.yaml"

    @property
    def record_file(self) -> Path:
        return self.root / RECORD_FILE

    @property
    def checkpoint_file(self) -> Path:
        return self.root / "checkpoints" / "last.pt"

    @property
    def summary_file(self) -> Path:
        return self.root / "summary.json"

    @property
    def metrics_file(self) -> Path:
        return self.root / "metrics.csv"

    @property
    def det_file(self) -> Path:
        return self.root / "det_states.csv"

    @property
    def retrogress_file(self) -> Path:
        return self.root / "retrogress.csv"

    @property
    def timing_file(self) -> Path:
        return self.root / "timing.csv"

    @property
    def participation_file(self) -> Path:
        return self.root / "participation.csv"

    @property
    def tensorboard_dir(self) -> Path:
        return self.root / "tensorboard"

    def site(self, name: str) -> SiteFolder:
        """A site's own part of this folder (in process, or a site's local copy under NVFlare). The name is
        checked as site configs check it, so that a name read from a file cannot lead outside the folder."""
        if not _SITE_NAME.fullmatch(str(name)) or name in (".", ".."):
            raise RunFolderError(f"{self.root}: '{name}' is not a site name")
        return SiteFolder(self.root / "sites" / name, name)

    # ------------------------------------------------------------------ life cycle
    @classmethod
    def create(cls, root: str | Path, config: Any) -> RunFolder:
        """A new run folder for `config` (an ExperimentConfig): the folder must not exist or be empty.

        Call it only after every config, site and model was checked: nothing is written before."""
        folder = cls(root)
        folder.refuse_to_start()
        resolved = config.resolved()
        record = RunRecord(schema_version=SCHEMA_VERSION, medfl_version=__version__, experiment=config.name,
                           task=config.task, method=config.method, config_sha256=config_digest(resolved),
                           rounds=config.rounds)
        _guard(folder.root, lambda: folder.root.mkdir(parents=True, exist_ok=True))
        try:
            _guard(folder.config_file, lambda: atomic_write_text(folder.config_file,
                                                                 yaml.safe_dump(resolved, sort_keys=False)))
            folder._write_record(record)
        except WriteError:  # the run did not start: leave no half-made folder
            for path in (folder.record_file, folder.config_file):
                path.unlink(missing_ok=True)
            raise
        return folder

    def refuse_to_start(self) -> None:
        """A new run may only go into a folder that does not exist or is empty: never over a run, and never
        into a folder of other files (they are left untouched)."""
        if self.record_file.is_file():
            raise RunFolderError(f"{self.root} already holds a run; use --resume to continue it or --out for a new folder")
        if self.root.exists() and (not self.root.is_dir() or _holds_files(self.root, LOCK_FILE)):
            raise RunFolderError(f"{self.root} exists and is not a medfl run folder (no {RECORD_FILE}); "
                                 "choose an empty or new folder with --out")

    def lock(self, create: bool = False) -> FolderLock:
        """This process's hold on the folder (`with folder.lock(...)`, see FolderLock). `create`: a new run,
        whose folder is made when missing; a resume (False) is refused, as `open` refuses it, when the
        folder does not exist."""
        if not create and not self.root.is_dir():
            raise RunFolderError(f"nothing to resume in {self.root}: no such run folder")
        if self.root.exists() and not self.root.is_dir():
            self.refuse_to_start()  # a file where the folder should be: the message names --out
        return FolderLock(self.root, LOCK_FILE, RECORD_FILE, create)

    @classmethod
    def open(cls, root: str | Path) -> RunFolder:
        """An existing run folder; refused with one line unless it carries a run record this medfl reads."""
        folder = cls(root)
        if not folder.root.is_dir():
            raise RunFolderError(f"nothing to resume in {folder.root}: no such run folder")
        _read_record(folder.record_file, RunRecord, "medfl run folder")
        return folder

    @property
    def record(self) -> RunRecord:
        return _read_record(self.record_file, RunRecord, "medfl run folder")

    def _write_record(self, record: RunRecord) -> None:
        _guard(self.record_file, lambda: atomic_write_json(self.record_file, record.model_dump()))

    def config_dict(self) -> dict[str, Any]:
        """The resolved config as the run wrote it (plain data)."""
        try:
            data = load_yaml(self.config_file.read_text(encoding="utf-8"))
        except yaml.YAMLError as error:
            raise RunFolderError(f"{self.config_file}: {describe_error(error)} (unreadable run config)") from None
        except (OSError, UnicodeDecodeError):
            raise RunFolderError(f"{self.config_file}: unreadable run config") from None
        if not isinstance(data, dict) or "method" not in data:
            raise RunFolderError(f"{self.config_file}: not a medfl run config")
        return data

    def config(self) -> Any:
        """The run's ExperimentConfig (refused when config.yaml was edited after the run: `check_config`)."""
        self.check_config()
        return load_experiment_config(self.config_file)

    def check_config(self) -> dict[str, Any]:
        """config.yaml as the run wrote it, refused in one line when it was edited afterwards: its digest
        (`config_digest`, `rounds` left out) must be the one run.json records. A run's results are read only
        under the config they came from; a site under NVFlare keeps the config the job sent, which passes."""
        data = self.config_dict()
        if config_digest(data) != self.record.config_sha256:
            raise RunFolderError(f"{self.config_file}: changed after the run (it is not the config whose sha256 "
                                 f"{RECORD_FILE} records); put back the config.yaml the run wrote")
        return data

    def config_sha256(self) -> str:
        """sha256 of config.yaml's bytes (what an export records as its provenance)."""
        return hashlib.sha256(self.config_file.read_bytes()).hexdigest()

    def completed_rounds(self) -> int:
        """Rounds completed: the checkpoint marks a round complete, the record follows it."""
        if not self.checkpoint_file.is_file():
            return 0
        return int(self.load_checkpoint()["round"]) + 1

    def resume_from(self, config: Any) -> int:
        """The round a resume of `config` starts at, after checking (without writing) that it continues this run.

        The config must be the one the run started with, except `rounds` and `runtime.parallel_sites` (the
        results are the same whatever the workers, as with `medfl run --parallel`): fewer rounds are refused, more
        only for methods whose result then equals a fresh longer run (see `extension_blockers`). A finished
        run raises RunFinished; a run that never completed a round starts again at round 0.
        """
        saved, current = (_without_worker_count(c) for c in (self.check_config(), config.resolved()))
        changed = sorted(k for k in set(saved) | set(current) if k != "rounds" and saved.get(k) != current.get(k))
        if changed:
            raise ConfigError(f"cannot resume {self.root}: the config differs from the one it started with in "
                              f"{', '.join(changed)}")
        planned = int(saved["rounds"])
        if config.rounds < planned:
            raise ConfigError(f"cannot resume {self.root} with {config.rounds} rounds: it was planned with {planned} "
                              "and a run never shrinks (start a new run)")
        blockers = extension_blockers(config) if config.rounds > planned else []
        if blockers:
            raise ConfigError(f"cannot extend {self.root} from {planned} to {config.rounds} rounds: "
                              + "; ".join(blockers) + f", so the result would match no fresh run of {config.rounds} "
                              "rounds (start a new run)")
        done = self.completed_rounds()
        if done >= config.rounds:
            raise RunFinished(f"{self.root}: the run has finished all {config.rounds} rounds; nothing to do")
        return done

    def continue_with(self, config: Any) -> None:
        """Adopt a resumed run's config (its rounds may have grown) and remove what killed writes left behind.

        Called once every check of the resume passed."""
        if int(self.config_dict()["rounds"]) != config.rounds:
            _guard(self.config_file, lambda: atomic_write_text(self.config_file,
                                                               yaml.safe_dump(config.resolved(), sort_keys=False)))
            self._write_record(self.record.model_copy(update={"rounds": config.rounds}))
        self.clean_temporaries()

    def clean_temporaries(self) -> list[Path]:
        """Remove the temporary files of writes that a killed process left behind."""
        stale = [path for path in self.root.rglob(".*.tmp") if path.is_file()]
        for path in stale:
            _guard(path, lambda path=path: path.unlink(missing_ok=True))
        return stale

    # ------------------------------------------------------------------ server checkpoint
    def save_checkpoint(self, state: Mapping[str, Any]) -> None:
        """The server's state after a round (tensors and plain containers only); it marks the round complete."""
        _guard(self.checkpoint_file, lambda: atomic_torch_save(dict(state), self.checkpoint_file))
        self._write_record(self.record.model_copy(update={"completed_rounds": int(state["round"]) + 1}))

    def load_checkpoint(self) -> dict[str, Any]:
        return load_torch_file(self.checkpoint_file)

    # ------------------------------------------------------------------ the run's tables
    def write_tables(self, rows: Sequence[Mapping[str, Any]], det_rows: Sequence[Mapping[str, Any]],
                     retrogress_rows: Sequence[Mapping[str, Any]], timing_rows: Sequence[Mapping[str, Any]],
                     summary: Mapping[str, Any]) -> None:
        write_rows(self.metrics_file, rows, METRIC_COLUMNS)
        write_rows(self.det_file, det_rows)
        write_rows(self.retrogress_file, retrogress_rows, RETROGRESS_COLUMNS)
        write_rows(self.timing_file, timing_rows)
        _guard(self.summary_file, lambda: atomic_write_json(self.summary_file, summary))

    def write_participation(self, round_: int, statuses: Mapping[str, str]) -> None:
        """Which sites took part in `round_` (a resumed round replaces its rows)."""
        rows = [row for row in read_rows(self.participation_file) if row["round"] < round_]
        rows += [{"round": round_, "site": site, "status": status} for site, status in statuses.items()]
        write_rows(self.participation_file, rows, PARTICIPATION_COLUMNS)

    def site_results(self, site: str) -> dict[str, Any]:
        """What one site needs to export its own model where it runs: the config and record of the run, the
        summary with only its own entry, and its own rows of the run's tables (nothing of another site)."""
        summary = self.summary()
        own = {key: value for key, value in summary.items() if key not in ("sites", "mean", "reference_protocol")}
        own["sites"] = {site: summary["sites"][site]} if site in summary["sites"] else {}
        reference = summary.get("reference_protocol", {})
        own["reference_protocol"] = {**{k: v for k, v in reference.items() if k not in ("sites", "mean")},
                                     "sites": {site: reference.get("sites", {}).get(site, {})}}
        return {"config": self.config_dict(), "record": self.record.model_dump(), "summary": own,
                "metrics": [r for r in self.metrics() if r["site"] == site],
                "det_states": [r for r in self.det_states() if r["site"] == site],
                "retrogress": [r for r in self.retrogress() if r["site"] == site]}

    def keep_site_results(self, results: Mapping[str, Any]) -> bool:
        """At a site whose part of the run lies on its own machine (NVIDIA FLARE), write what the server sent of
        the run (`site_results`), so that `medfl export` works there from the site's folder alone. A folder
        that already holds this run's record (the server's own, or an earlier copy) is left as it is; whether
        written."""
        if self.record_file.is_file():
            if self.record.config_sha256 != results["record"]["config_sha256"]:
                raise RunFolderError(f"{self.root} holds another run; the run's results were not written")
            return False
        _guard(self.root, lambda: self.root.mkdir(parents=True, exist_ok=True))
        _guard(self.config_file, lambda: atomic_write_text(self.config_file,
                                                           yaml.safe_dump(dict(results["config"]), sort_keys=False)))
        self.write_tables(results["metrics"], results["det_states"], results["retrogress"], [], results["summary"])
        self._write_record(RunRecord.model_validate(results["record"]))
        return True

    def summary(self) -> dict[str, Any]:
        try:
            data = json.loads(self.summary_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RunFolderError(f"{self.root}: no completed round (no {self.summary_file.name})") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            raise RunFolderError(f"{self.summary_file}: unreadable run summary") from None
        if not isinstance(data, dict) or "sites" not in data:
            raise RunFolderError(f"{self.summary_file}: not a medfl run summary")
        return data

    def metrics(self) -> list[dict[str, Any]]:
        return read_rows(self.metrics_file)

    def det_states(self) -> list[dict[str, Any]]:
        return read_rows(self.det_file)

    def retrogress(self) -> list[dict[str, Any]]:
        return read_rows(self.retrogress_file)

    def timing(self) -> list[dict[str, Any]]:
        return read_rows(self.timing_file)


def _holds_files(folder: Path, lock_file: str) -> bool:
    """Whether `folder` holds anything but its lock file (which a folder gets before a run starts in it)."""
    return any(path.name != lock_file for path in folder.iterdir())


def run_directory(config: Any, out: str | Path | None) -> Path:
    """--out when given, else <output_dir>/<name>-<method>-seed<seed>/, so that methods and seeds sit side by side."""
    if out is not None:
        return Path(out)
    return Path(config.output_dir) / f"{config.name}-{config.method}-seed{config.seed}"


def extension_blockers(config: Any) -> list[str]:
    """Why a run of `config` could not be extended to more rounds and still equal a fresh longer run."""
    spec = config.spec
    reasons = []
    if spec.aggregation == "pfa":
        reasons.append("PFA's low-frequency ratio grows over the planned rounds")
    if spec.loss == "cpa" and config.cpa.warmup_rounds is None:
        reasons.append("CPA's warm-up is 30% of the planned rounds")
    return reasons


class SiteFolder:
    """One site's own part of a run: `<run>/sites/<name>/`. Only the site reads and writes it."""

    def __init__(self, root: str | Path, name: str):
        self.root = Path(root)
        self.name = name

    @property
    def record_file(self) -> Path:
        return self.root / SITE_RECORD_FILE

    @property
    def audit_file(self) -> Path:
        return self.root / "audit.jsonl"

    def model_file(self, round_: int) -> Path:
        return self.root / "models" / f"round_{round_:04d}.pt"

    def state_file(self, round_: int) -> Path:
        return self.root / f"state_round_{round_:04d}.pt"

    def lock(self) -> FolderLock:
        """The site's hold on its part of the run (`with site_folder.lock()`, see FolderLock), made when
        missing: taken by whoever drives the site (the in-process run, or the site's NVFlare process) before
        it reads its part."""
        return FolderLock(self.root, SITE_LOCK_FILE, SITE_RECORD_FILE, create=True)

    # ------------------------------------------------------------------ record
    def start(self, record: SiteRecord) -> None:
        """Write the site's record, or check that the site still reads the data it started with."""
        if not self.record_file.is_file():
            if self.root.is_dir() and _holds_files(self.root, SITE_LOCK_FILE):
                raise RunFolderError(f"{self.root}: holds files but no {SITE_RECORD_FILE}: not this medfl's site "
                                     "folder; refusing to use it")
            _guard(self.record_file, lambda: atomic_write_json(self.record_file, record.model_dump()))
            return
        saved = self.record
        if saved.data_fingerprint_version != record.data_fingerprint_version:
            raise ConfigError(f"site '{self.name}': {self.record_file} was written by an earlier medfl, whose data "
                              "fingerprint compared image files by size, not content; this medfl cannot tell whether "
                              "the site's data changed since the run started (start a new run, or finish this one "
                              "with the medfl that started it)")
        for field, what in (("site_config_sha256", "its site config"), ("data_fingerprint", "its data (files, their "
                                                                                              "contents, labels or "
                                                                                              "splits)")):
            if getattr(saved, field) != getattr(record, field):
                raise ConfigError(f"site '{self.name}': {what} changed since this run started ({self.record_file}); "
                                  "a run continues only on the data it started with (start a new run)")

    @property
    def record(self) -> SiteRecord:
        return _read_record(self.record_file, SiteRecord, f"medfl site folder of '{self.name}'")

    # ------------------------------------------------------------------ models and restart state
    def save_round_models(self, round_: int, payload: Mapping[str, Any]) -> None:
        path = self.model_file(round_)
        _guard(path, lambda: atomic_torch_save(dict(payload), path))

    def load_round_models(self, round_: int) -> dict[str, Any]:
        self.record  # noqa: B018 - refuse a folder without the site's record before loading from it
        return load_torch_file(self.model_file(round_), site=self.name)

    def save_state(self, round_: int, state: Mapping[str, Any]) -> None:
        """The site's restart state after `round_`; only the newest STATES_KEPT are kept."""
        path = self.state_file(round_)
        _guard(path, lambda: atomic_torch_save(dict(state), path))
        for old in self.saved_rounds()[:-STATES_KEPT]:
            _guard(self.state_file(old), lambda old=old: self.state_file(old).unlink(missing_ok=True))

    def load_state(self, round_: int) -> dict[str, Any]:
        self.record  # noqa: B018 - refuse a folder without the site's record before loading from it
        path = self.state_file(round_)
        if not path.is_file():
            raise RunFolderError(f"site '{self.name}': no saved state for round {round_} ({path})")
        return load_torch_file(path, site=self.name)

    def saved_rounds(self) -> list[int]:
        """Rounds whose restart state is saved, in increasing order."""
        matches = (_STATE_FILE.fullmatch(path.name) for path in self.root.glob("state_round_*.pt"))
        return sorted(int(match.group(1)) for match in matches if match)

    # ------------------------------------------------------------------ audit log
    def audit(self, entries: Sequence[Mapping[str, Any]]) -> None:
        """Append what left the site (one JSON line per entry)."""
        lines = "".join(json.dumps(entry, default=_plain) + "\n" for entry in entries)
        _guard(self.audit_file, lambda: atomic_write_text(self.audit_file, self._audit_text() + lines))

    def forget_audit_after(self, round_: int) -> None:
        """Drop the entries of rounds after `round_`: a restart redoes them and logs them again, once."""
        kept = [line for line in self._audit_text().splitlines(keepends=True)
                if line.strip() and json.loads(line).get("round", -1) <= round_]
        _guard(self.audit_file, lambda: atomic_write_text(self.audit_file, "".join(kept)))

    def audit_entries(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self._audit_text().splitlines() if line.strip()]

    def _audit_text(self) -> str:
        return self.audit_file.read_text(encoding="utf-8") if self.audit_file.is_file() else ""


def _plain(value: Any) -> Any:
    """JSON for the few non-JSON values an audit entry may hold (tensors' lists, numpy numbers)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
