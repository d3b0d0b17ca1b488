"""Files only the service's own user may read: the SQLite database (with its -wal and -shm) and
the folders holding it and the keys.

Folders this creates are 0700, files 0600, whatever the process umask. SQLite creates the -wal
and -shm files with the database file's own permissions, so creating the database file 0600
before SQLite opens it makes all three private. Existing files and folders are never changed
(they are the operator's); looser ones are named in a warning at start, with the fix."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger(__name__)

PRIVATE_DIRECTORY = 0o700
PRIVATE_FILE = 0o600
SQLITE_COMPANIONS = ("-wal", "-shm")


def private_directory(path: Path) -> None:
    """Creates ``path`` and each missing parent 0700 (existing ones are left as they are)."""
    missing: list[Path] = []
    current = path
    while not current.exists():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=PRIVATE_DIRECTORY)
        except FileExistsError:
            continue  # made meanwhile (another process starting): checked like any other
        os.chmod(directory, PRIVATE_DIRECTORY)  # mkdir's mode is masked by the umask


def private_sqlite_file(database: Path) -> None:
    """Creates the folder (0700) and the database file (0600, empty: SQLite takes an empty file
    as a new database) when they are missing; warns when what exists is readable by others."""
    private_directory(database.parent)
    try:
        fd = os.open(database, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
    except FileExistsError:
        pass
    else:
        os.fchmod(fd, PRIVATE_FILE)
        os.close(fd)
    warn_if_exposed(database.parent, [database, *_companions(database)])


def warn_if_exposed(directory: Path, files: list[Path]) -> list[str]:
    """Logs a warning for each of ``files`` that group or others may read or write, and for a
    ``directory`` that others may enter or write; returns the warnings (for tests)."""
    warnings = []
    for path in files:
        mode = _mode(path)
        if mode is not None and mode & 0o077:
            warnings.append(
                f"{path} is mode {mode:04o}: other users of this machine may read it;"
                f" chmod 600 {path}"
            )
    mode = _mode(directory)
    if mode is not None and mode & 0o077:
        warnings.append(
            f"{directory} is mode {mode:04o}: other users of this machine may see or replace"
            f" the files in it; chmod 700 {directory}"
        )
    for warning in warnings:
        log.warning("%s", warning)
    return warnings


def _companions(database: Path) -> list[Path]:
    return [database.with_name(database.name + suffix) for suffix in SQLITE_COMPANIONS]


def _mode(path: Path) -> int | None:
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return None
