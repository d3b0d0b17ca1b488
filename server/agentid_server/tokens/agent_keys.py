"""The agents' client-assertion keys as the registry holds them, and what a JWK Set must be to
become an agent's keys.

An agent's keys are its `jwks_json` (CreateAgent / UpdateAgent, or a config agent's
`jwks_file` read at start), or, for a config agent, its `jwks_file` / `jwks_url` read again like an
IdP's JWKS (``JwksCache``). ``AgentKeys`` follows the registry: a change of an agent's keys
replaces what verifies its assertions on every replica as soon as the change is applied there.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from agentid_server.domain.agents import Agent, AgentSource
from agentid_server.tokens.client_assertion import KeySource
from agentid_server.tokens.idp import IdpKey, JwksCache, parse_jwks

MAX_AGENT_JWKS_BYTES = 64 << 10
MAX_AGENT_KEYS = 16
MAX_KID_LENGTH = 128
ASSERTION_KEY_ALGORITHMS = frozenset({"RS256", "PS256", "ES256", "EdDSA"})
# Members of a JWK that hold a private or secret part (RFC 7518 section 6).
PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})


class StaticKeys:
    """Keys given as a document (jwks_json): parsed once, never fetched."""

    def __init__(self, document: str) -> None:
        self._keys = parse_jwks(json.loads(document))

    async def key(self, kid: str) -> IdpKey | None:
        return self._keys.get(kid)

    async def refresh(self) -> None:
        return None


class AgentKeys(Mapping[str, KeySource]):
    """Agent id -> its keys, for the agents that have any; kept current by ``follow``."""

    def __init__(self, fetched: Mapping[str, JwksCache]) -> None:
        """``fetched``: the config agents whose keys are read from their file or URL."""
        self._fetched = dict(fetched)
        self._keys: dict[str, KeySource] = dict(fetched)

    def follow(self, agent: Agent) -> None:
        """The registry applied ``agent``: its keys are these from now on."""
        if agent.source == AgentSource.CONFIG and agent.id in self._fetched:
            self._keys[agent.id] = self._fetched[agent.id]
        elif agent.jwks_json:
            self._keys[agent.id] = StaticKeys(agent.jwks_json)
        else:
            self._keys.pop(agent.id, None)

    def __getitem__(self, agent_id: str) -> KeySource:
        return self._keys[agent_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def agent_jwks_problem(document: str) -> str | None:
    """Why ``document`` cannot be an agent's client-assertion keys, or None. Refused: not JSON or
    not a JWK Set, no key or more than 16, a key without a kid or a kid twice, a private or
    secret part, a key type or curve no assertion algorithm verifies with, RSA under 2048 bits."""
    if len(document.encode()) > MAX_AGENT_JWKS_BYTES:
        return f"larger than {MAX_AGENT_JWKS_BYTES} bytes"
    try:
        parsed: Any = json.loads(document)
    except ValueError:
        return "not JSON"
    if not isinstance(parsed, dict) or not isinstance(parsed.get("keys"), list):
        return 'not a JWK Set (an object with a "keys" array)'
    keys = parsed["keys"]
    if not keys:
        return "holds no key"
    if len(keys) > MAX_AGENT_KEYS:
        return f"holds more than {MAX_AGENT_KEYS} keys"
    kids: set[str] = set()
    for index, entry in enumerate(keys):
        problem = _key_problem(entry)
        if problem is not None:
            return f"key {index}: {problem}"
        if entry["kid"] in kids:
            return f"key {index}: its kid is used by another key"
        kids.add(entry["kid"])
    return None


def _key_problem(entry: Any) -> str | None:
    if not isinstance(entry, dict):
        return "not a JWK (an object)"
    if PRIVATE_MEMBERS & entry.keys():
        return "holds a private or secret part: give the public key only"
    kid = entry.get("kid")
    if not isinstance(kid, str) or not 0 < len(kid) <= MAX_KID_LENGTH or not kid.isprintable():
        return f"needs a kid of 1 to {MAX_KID_LENGTH} printable characters"
    if entry.get("use", "sig") != "sig":
        return 'is not for signatures ("use" must be "sig")'
    alg = entry.get("alg")
    if alg is not None and alg not in ASSERTION_KEY_ALGORITHMS:
        return f"alg must be one of {', '.join(sorted(ASSERTION_KEY_ALGORITHMS))}"
    try:
        material = jwt.PyJWK(entry).key
    except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError):
        return "not a valid public key"
    if isinstance(material, rsa.RSAPublicKey):
        return None if material.key_size >= 2048 else "an RSA key needs at least 2048 bits"
    if isinstance(material, ec.EllipticCurvePublicKey):
        return None if isinstance(material.curve, ec.SECP256R1) else "an EC key must be P-256"
    if isinstance(material, ed25519.Ed25519PublicKey):
        return None
    return "a key type no assertion algorithm verifies with (RSA, EC P-256 or Ed25519)"
