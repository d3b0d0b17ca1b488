"""The login `agentid login` keeps for the other commands: one JSON file in the user's config
folder (`$XDG_CONFIG_HOME/agentid/`, else `~/.config/agentid/`).

It holds bearer tokens, so the folder is 0700 and the file 0600 whatever the umask, written
whole or not at all (a temporary file in the same folder, then a rename), and a file others
could read is refused rather than used: its tokens may be someone else's by now. Nothing here
prints or logs a token.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

FILE_NAME = "login.json"
PRIVATE_DIRECTORY = 0o700
PRIVATE_FILE = 0o600


class StoredLoginError(Exception):
    """The stored login cannot be used; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class StoredLogin:
    """A completed `agentid login`: the access token is the user's credential at agentid."""

    access_token: str
    issuer: str
    client_id: str
    subject: str
    expires_at: int | None  # from the token response's expires_in; None: not said
    auth_time: int | None
    acr: str | None
    id_token: str | None = None
    refresh_token: str | None = None

    def expired(self, now: float | None = None) -> bool:
        return self.expires_at is not None and (now or time.time()) >= self.expires_at


def config_directory() -> Path:
    """`$XDG_CONFIG_HOME/agentid` (the XDG Base Directory spec ignores a relative value), else
    `~/.config/agentid`."""
    base = os.environ.get("XDG_CONFIG_HOME", "")
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".config"
    return root / "agentid"


def login_file() -> Path:
    return config_directory() / FILE_NAME


def save(login: StoredLogin) -> Path:
    """Writes ``login`` atomically, 0600 in a 0700 folder; the file's path."""
    directory = config_directory()
    directory.mkdir(mode=PRIVATE_DIRECTORY, parents=True, exist_ok=True)
    os.chmod(directory, PRIVATE_DIRECTORY)  # mkdir's mode is masked; an older folder tightened
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=".login-", suffix=".tmp")
    try:
        os.fchmod(fd, PRIVATE_FILE)  # mkstemp makes it 0600 already; said, not assumed
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(asdict(login), handle)
            handle.flush()
            os.fsync(handle.fileno())
        target = directory / FILE_NAME
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    _sync_directory(directory)
    return target


def _sync_directory(directory: Path) -> None:
    """The rename itself survives a crash (POSIX: the folder is synced too)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load() -> StoredLogin | None:
    """The stored login; None when there is none. StoredLoginError when it cannot be trusted
    (readable by others) or read."""
    path = login_file()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as error:
        raise StoredLoginError(f"cannot read {path}: {error.strerror}") from None
    with os.fdopen(fd, encoding="utf-8") as handle:
        mode = os.fstat(handle.fileno()).st_mode
        if stat.S_IMODE(mode) & 0o077:
            raise StoredLoginError(
                f"{path} may be read by other users (mode {stat.S_IMODE(mode):o}): delete it and"
                " run `agentid login` again"
            )
        try:
            data = json.load(handle)
        except ValueError:
            data = None
    known = {f.name for f in fields(StoredLogin)}
    if not isinstance(data, dict) or not isinstance(data.get("access_token"), str):
        raise StoredLoginError(f"{path} is not a stored login: run `agentid login` again")
    try:
        return StoredLogin(**{k: v for k, v in data.items() if k in known})
    except TypeError:
        raise StoredLoginError(f"{path} is incomplete: run `agentid login` again") from None


def remove() -> bool:
    """Forgets the stored login; whether there was one."""
    try:
        login_file().unlink()
    except FileNotFoundError:
        return False
    return True
