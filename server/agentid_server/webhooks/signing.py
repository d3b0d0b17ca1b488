"""Standard Webhooks 1.0 symmetric signatures: HMAC-SHA256 over ``{webhook-id}.{timestamp}.{body}``,
sent as ``webhook-signature: v1,<base64>``. The secret is ``whsec_`` followed by the base64 of
24 to 64 random bytes, as the spec serialises it, so receivers can use its libraries as they are.
A secret is read at start from an environment variable or a file, never from the config file,
and never appears in a message or a log line."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from collections.abc import Mapping
from pathlib import Path

from agentid_server.config import ConfigError, WebhookSettings

SECRET_PREFIX = "whsec_"  # noqa: S105 - the spec's prefix, not a secret
MIN_SECRET_BYTES = 24
MAX_SECRET_BYTES = 64
_SECRET_FORMAT = (
    f"is not a webhook secret: {SECRET_PREFIX} followed by the base64 of"
    f" {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} random bytes"
)


def parse_secret(text: str) -> bytes:
    """The HMAC key of a ``whsec_…`` secret; ValueError (without the secret) if it is not one."""
    text = text.strip()
    if not text.startswith(SECRET_PREFIX):
        raise ValueError(_SECRET_FORMAT)
    try:
        key = base64.b64decode(text[len(SECRET_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(_SECRET_FORMAT) from None
    if not MIN_SECRET_BYTES <= len(key) <= MAX_SECRET_BYTES:
        raise ValueError(_SECRET_FORMAT)
    return key


def load_secret(
    hook: WebhookSettings, key: str, source: str, environ: Mapping[str, str] | None = None
) -> bytes | None:
    """The endpoint's HMAC key from ``secret_env`` or ``secret_file`` (None: it has neither,
    and its notifications go unsigned). ``key`` names the endpoint in errors
    (``step_up.notify[0]``)."""
    env = os.environ if environ is None else environ
    if hook.secret_env:
        where = f"{key}.secret_env"
        text = env.get(hook.secret_env, "")
        if not text:
            raise ConfigError(source, where, f"the environment variable {hook.secret_env} is unset")
    elif hook.secret_file:
        where = f"{key}.secret_file"
        try:
            text = Path(hook.secret_file).read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as exc:
            problem = exc.strerror if isinstance(exc, OSError) else "not ASCII"
            raise ConfigError(source, where, f"cannot read {hook.secret_file}: {problem}") from None
    else:
        return None
    try:
        return parse_secret(text)
    except ValueError as exc:
        raise ConfigError(source, where, f"the secret {exc}") from None


def signature(secret: bytes, message_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value for one attempt."""
    signed = f"{message_id}.{timestamp}.".encode("ascii") + body
    mac = hmac.new(secret, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode("ascii")
