"""The login `agentid login` keeps: private whatever the umask, refused when others could read
it, and the commands' credential when neither --token nor $AGENTID_TOKEN is given."""

from __future__ import annotations

import dataclasses
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from agentid_server import stored_login
from agentid_server.cli.root import main
from agentid_server.stored_login import StoredLogin, StoredLoginError

LOGIN = StoredLogin(
    access_token="eyJ.secret-access.sig",
    issuer="http://127.0.0.1:9000",
    client_id="agentid-cli",
    subject="alice",
    expires_at=int(time.time()) + 600,
    auth_time=int(time.time()),
    acr="urn:pwd",
    id_token="eyJ.secret-id.sig",
)


@pytest.fixture
def config_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("AGENTID_TOKEN", raising=False)
    old = os.umask(0o022)
    try:
        yield tmp_path / "xdg" / "agentid"
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_login_is_private_whatever_the_umask(config_home: Path) -> None:
    path = stored_login.save(LOGIN)
    assert path == config_home / "login.json"
    assert (mode(config_home), mode(path)) == (0o700, 0o600)
    assert stored_login.load() == LOGIN
    config_home.chmod(0o755)  # an older, looser folder is tightened on the next save
    stored_login.save(dataclasses.replace(LOGIN, acr="urn:mfa"))
    assert mode(config_home) == 0o700
    assert [p.name for p in config_home.iterdir()] == ["login.json"]
    loaded = stored_login.load()
    assert loaded is not None
    assert loaded.acr == "urn:mfa"


def test_a_relative_xdg_config_home_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", "relative/dir")
    assert stored_login.config_directory() == Path.home() / ".config" / "agentid"


def test_a_login_others_could_read_is_refused(config_home: Path) -> None:
    path = stored_login.save(LOGIN)
    path.chmod(0o644)
    with pytest.raises(StoredLoginError, match="other users"):
        stored_login.load()


def test_commands_use_the_stored_login_and_say_when_it_expired(
    config_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["step-ups", "list"]) == 2
    assert "run `agentid login`" in capsys.readouterr().err
    stored_login.save(dataclasses.replace(LOGIN, expires_at=int(time.time()) - 1))
    assert main(["audit", "--limit", "1"]) == 2
    err = capsys.readouterr().err
    assert "has expired: run `agentid login` again" in err
    assert "secret" not in err
    assert main(["logout"]) == 0
    assert not (config_home / "login.json").exists()
