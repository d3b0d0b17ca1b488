"""The SQLite database, its -wal and -shm, and the folders holding them and the dev keys are
private to the service's user (0600 files in 0700 folders) whatever the umask; looser ones that
exist already are named in a warning at start."""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from agentid_server.cli.root import main as agentid_main
from agentid_server.storage.private_files import warn_if_exposed

from tests.conftest import FakeClock, IdpFixture, running_harness


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@contextlib.contextmanager
def umask(value: int) -> Iterator[None]:
    previous = os.umask(value)
    try:
        yield
    finally:
        os.umask(previous)


async def test_database_files_and_folders_are_private(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    folder = tmp_path / "state" / "agentid"
    database = folder / "agentid.db"

    def mutate(config: dict[str, object]) -> None:
        config["database"] = {"url": f"sqlite+aiosqlite:///{database}"}

    with umask(0o022):  # the usual umask: SQLite alone made these 0644 in 0755 folders
        async with running_harness(tmp_path, idp, clock, mutate=mutate) as h:
            await h.delegate()  # a write: the -wal and -shm exist now
            companions = [folder / "agentid.db-wal", folder / "agentid.db-shm"]
            assert all(path.exists() for path in companions)
            for path in (database, *companions):
                assert mode(path) == 0o600, f"{path.name} is {mode(path):04o}"
    assert mode(folder) == 0o700
    assert mode(folder.parent) == 0o700  # each folder it had to make


async def test_looser_existing_files_are_named_at_start(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "shared"
    folder.mkdir(mode=0o755)
    os.chmod(folder, 0o755)  # noqa: S103 (the looser folder under test)
    database = folder / "agentid.db"
    database.touch()
    os.chmod(database, 0o644)

    def mutate(config: dict[str, object]) -> None:
        config["database"] = {"url": f"sqlite+aiosqlite:///{database}"}

    with caplog.at_level(logging.WARNING, logger="agentid_server.storage.private_files"):
        async with running_harness(tmp_path, idp, clock, mutate=mutate):
            pass
    warned = caplog.text
    assert f"{database} is mode 0644" in warned
    assert f"chmod 600 {database}" in warned
    assert f"{folder} is mode 0755" in warned
    assert f"chmod 700 {folder}" in warned
    assert mode(database) == 0o644  # the operator's file: named, never changed


def test_a_private_folder_raises_no_warning(tmp_path: Path) -> None:
    folder = tmp_path / "private"
    folder.mkdir(mode=0o700)
    secret = folder / "db"
    secret.touch(mode=0o600)
    os.chmod(secret, 0o600)
    os.chmod(folder, 0o700)
    assert warn_if_exposed(folder, [secret, folder / "missing"]) == []


def test_dev_init_keeps_keys_in_private_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with umask(0o022):
        assert agentid_main(["dev", "init"]) == 0
    dev = tmp_path / "var" / "dev"
    assert mode(dev) == 0o700
    assert mode(dev.parent) == 0o700
    assert mode(dev / "kek") == 0o600
    assert mode(dev / "idp-private.pem") == 0o600
    assert mode(dev / "check-service-key") == 0o600


def test_dev_init_writes_the_dev_idp_privately_and_dev_users_lists_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    with umask(0o022):
        assert agentid_main(["dev", "init"]) == 0
    idp = tmp_path / "var" / "dev" / "idp"
    assert mode(idp) == 0o700
    for name in ("config.json", "users.json", "console-secret"):
        assert mode(idp / name) == 0o600
    capsys.readouterr()
    assert agentid_main(["dev", "users"]) == 0
    listed = capsys.readouterr().out
    assert "alice: password " in listed
    assert "bob: password " in listed
