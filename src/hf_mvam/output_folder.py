"""The output folder of ``training/run.py``: one run at a time, nothing a user put there
overwritten silently, and the model folder replaced as a whole.

    OUTPUT_DIR/
        config.json, model.safetensors, processor files, README.md, eval_results.json,
        training_args.json, figures/       the model folder (what the Hub repository gets)
        checkpoints/                       training checkpoints (hf_mvam.checkpointing)
        logs/                              the trackers' logs (tensorboard)
        .hf_mvam/                          this module's, never uploaded: the lock and its holder,
                                           the files runs wrote, the run's local paths

:meth:`OutputFolder.claim` locks the folder for the whole run (``filelock``; a second run stops at
once, naming the holder's pid and host) and refuses files that no run of ``training/run.py`` wrote
unless ``overwrite``. :meth:`OutputFolder.replace_model_folder` writes the new model folder into a
sibling staging folder, carries ``checkpoints/``, ``logs/``, ``.hf_mvam/`` and the user's own files
over as hard links (no data is copied), and swaps the two folders' names in one atomic exchange
(Linux ``renameat2(RENAME_EXCHANGE)``): a process killed at any moment leaves either the previous
complete folder or the new one. Where the exchange is unavailable, two renames do it, and the next
claim puts the previous folder back if a kill fell between them.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock, Timeout

__all__ = ["LOCAL_PATHS_NAME", "RUN_DIR", "OutputFolder", "OutputFolderError", "read_local_paths"]

RUN_DIR = ".hf_mvam"
LOCK_NAME = "lock"
HOLDER_NAME = "lock_holder.json"
WRITTEN_FILES_NAME = "written_files.json"  # the model-folder files the last run wrote
LOCAL_PATHS_NAME = "local_paths.json"  # absolute paths of the run's data (for check_folder.py)
# Folders runs own as a whole: carried into every new model folder as they are.
RUN_OWNED = ("checkpoints", "logs", RUN_DIR)


class OutputFolderError(RuntimeError):
    """The output folder cannot be used as asked (held by another run, or holding others' files)."""


class OutputFolder:
    """``training/run.py``'s hold on its ``--output_dir`` (use on the main process only).

    Args:
        path: the output folder (created if missing).
        overwrite: replace model-folder files that no run wrote (the user's other files are kept).
    """

    def __init__(self, path: str | os.PathLike, overwrite: bool = False):
        self.path = Path(path)
        self.overwrite = overwrite
        self._lock: FileLock | None = None
        self._previous = self.path.parent / f".{self.path.name}.previous"

    # --- holding the folder ----------------------------------------------------------------------

    def claim(self) -> list[str]:
        """Lock the folder, clear what killed runs left beside it, and check its files.

        Returns:
            the files no run wrote (kept, or replaced where the new model folder has the same
            name), ``[]`` unless ``overwrite``.

        Raises:
            OutputFolderError: another run holds the folder, or it holds files no run wrote and
                ``overwrite`` is not set.
        """
        if not self.path.exists() and self._previous.is_dir():  # a kill between the fallback's two renames
            os.rename(self._previous, self.path)
        (self.path / RUN_DIR).mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.path / RUN_DIR / LOCK_NAME))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise OutputFolderError(
                f"--output_dir {self.path} is in use by another run of training/run.py ({self._holder()}); "
                "wait for it to end, or choose another --output_dir"
            ) from None
        self._lock = lock
        _write_atomically(self.path / RUN_DIR / HOLDER_NAME, json.dumps(
            {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        ))
        for leftover in [*self.path.parent.glob(f".{self.path.name}.staging-*"), self._previous]:
            shutil.rmtree(leftover, ignore_errors=True)  # a killed run's: every run writes them under the lock
        foreign = self.foreign_files()
        if foreign and not self.overwrite:
            self.release()
            listed = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise OutputFolderError(
                f"--output_dir {self.path} holds files no run of training/run.py wrote ({listed}); choose another "
                "--output_dir, or pass --overwrite_output_dir to replace the model files there (other files are kept)"
            )
        return foreign

    def release(self) -> None:
        """Unlock the folder (the lock file stays: waiters must share its inode)."""
        if self._lock is not None:
            (self.path / RUN_DIR / HOLDER_NAME).unlink(missing_ok=True)
            self._lock.release()
            self._lock = None

    def __enter__(self) -> "OutputFolder":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _holder(self) -> str:
        try:
            holder = json.loads((self.path / RUN_DIR / HOLDER_NAME).read_text())
            return f"pid {holder['pid']} on {holder['host']}, since {holder['since']}"
        except (OSError, ValueError, KeyError):
            return "pid and host not recorded yet"

    # --- what is in it ---------------------------------------------------------------------------

    def written_files(self) -> set[str]:
        """The model-folder files (relative POSIX paths) the last run wrote."""
        try:
            return set(json.loads((self.path / RUN_DIR / WRITTEN_FILES_NAME).read_text()))
        except (OSError, ValueError):
            return set()

    def foreign_files(self) -> list[str]:
        """Files outside ``checkpoints/``, ``logs/`` and ``.hf_mvam/`` that no run wrote, sorted."""
        ours = self.written_files()
        return sorted(path for path in _files(self.path) if path.split("/")[0] not in RUN_OWNED and path not in ours)

    # --- writing ---------------------------------------------------------------------------------

    def replace_model_folder(self, write: Callable[[Path], None], local_paths: dict | None = None) -> list[str]:
        """Write a new model folder with ``write(folder)`` and put it in place of the old one at once.

        ``write`` fills an empty staging folder beside the output folder. Then ``checkpoints/``,
        ``logs/``, ``.hf_mvam/`` (with the list of the files ``write`` wrote, and ``local_paths``)
        and every file no run wrote that ``write`` did not replace are linked in, and the staging
        folder and the output folder exchange names; the old one is deleted. Files an earlier run
        wrote that this one did not are gone with it (no figure of another model type stays).

        Returns:
            the files no run wrote that the new folder replaced (only with ``overwrite``).
        """
        staging = self.path.parent / f".{self.path.name}.staging-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            write(staging)
            written = sorted(_files(staging))
            old_written = self.written_files()
            replaced = [path for path in self.foreign_files() if path in written]
            for relative in _files(self.path):
                top = relative.split("/")[0]
                if relative in (f"{RUN_DIR}/{WRITTEN_FILES_NAME}", f"{RUN_DIR}/{LOCAL_PATHS_NAME}"):
                    continue
                if top in RUN_OWNED or (relative not in written and relative not in old_written):
                    _link(self.path / relative, staging / relative)
            _write_atomically(staging / RUN_DIR / WRITTEN_FILES_NAME, json.dumps(written, indent=1))
            if local_paths:
                _write_atomically(staging / RUN_DIR / LOCAL_PATHS_NAME, json.dumps(local_paths, indent=1))
            _sync_tree(staging)
            if not self.path.exists():
                os.rename(staging, self.path)
            elif not _exchange(staging, self.path):
                os.rename(self.path, self._previous)
                os.rename(staging, self.path)
                staging = self._previous
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return replaced

    def write_file(self, name: str, text: str) -> Path:
        """Write one file of the folder atomically (a temporary file, then renamed) and record it
        as written by a run."""
        path = _write_atomically(self.path / name, text)
        written = self.written_files() | {name}
        _write_atomically(self.path / RUN_DIR / WRITTEN_FILES_NAME, json.dumps(sorted(written), indent=1))
        return path


def read_local_paths(folder: str | os.PathLike) -> dict:
    """The local paths a run recorded in ``folder/.hf_mvam/local_paths.json`` (``{}`` when there are none)."""
    try:
        return json.loads((Path(folder) / RUN_DIR / LOCAL_PATHS_NAME).read_text())
    except (OSError, ValueError):
        return {}


# --------------------------------------------------------------------------- helpers


def _files(folder: Path) -> list[str]:
    """Every file and symlink under ``folder``, as relative POSIX paths."""
    if not folder.is_dir():
        return []
    found = []
    for root, directories, names in os.walk(folder):
        names += [d for d in directories if os.path.islink(os.path.join(root, d))]  # not followed by os.walk
        found += [Path(root, name).relative_to(folder).as_posix() for name in names]
    return found


def _link(source: Path, target: Path) -> None:
    """A hard link of ``source`` (a symlink itself, not what it points to) at ``target``; a copy
    where the file system has no hard links."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target, follow_symlinks=False)
    except OSError:
        shutil.copy2(source, target, follow_symlinks=False)


def _write_atomically(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(temporary, "w", encoding="utf-8") as file:
        file.write(text if text.endswith("\n") else text + "\n")
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    return path


def _sync_tree(folder: Path) -> None:
    """Flush the files of ``folder`` to disk, so that the exchange never publishes a folder whose
    contents a crash of the machine could still lose."""
    for relative in _files(folder):
        path = folder / relative
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as file:
                os.fsync(file.fileno())


def _exchange(first: Path, second: Path) -> bool:
    """Swap the names of two folders in one step (Linux renameat2 with RENAME_EXCHANGE); ``False``
    where the platform or the file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:  # a C library without the wrapper
        return False
    at_fdcwd, rename_exchange = -100, 2  # from fcntl.h and linux/fs.h
    if renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.EXDEV, errno.ENOTSUP):
        return False
    raise OSError(error, os.strerror(error), str(first), None, str(second))
