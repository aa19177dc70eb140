"""API keys: the key file, constant-time lookup by sha256, scopes, and whether a server may run without keys."""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import re
import secrets
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

PREDICT, JOBS, ADMIN = "predict", "jobs", "admin"
SCOPES = (PREDICT, JOBS, ADMIN)

# A key's name is its owner's identity: it is stored on jobs and in Redis keys, and shown in logs.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class KeyFileError(ValueError):
    """API_KEYS_FILE cannot be used; the process refuses to start."""


class ExposedWithoutKeys(RuntimeError):
    """No API keys, AUTH is not off, and a bind address is reachable from other machines."""


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


@dataclass(frozen=True)
class ApiKey:
    """One configured key: its name, the sha256 of the key itself, and its scopes."""

    name: str
    sha256: bytes
    scopes: frozenset[str]


@dataclass(frozen=True)
class Principal:
    """Who a request acts for: a key's name, or nobody (None) when the service runs without keys."""

    name: str | None
    scopes: frozenset[str]

    def allows(self, scope: str) -> bool:
        """`admin` includes the other scopes."""
        return scope in self.scopes or ADMIN in self.scopes

    @property
    def sees_every_job(self) -> bool:
        return ADMIN in self.scopes

    def sees(self, owner: str | None) -> bool:
        """A job is visible to the key that created it and to admin keys; scheduled runs (no owner) to admin only."""
        return self.sees_every_job or (owner is not None and owner == self.name)


ANONYMOUS = Principal(None, frozenset(SCOPES))


class KeyRing:
    """The configured keys; `find` compares the presented key's hash with every one of them."""

    def __init__(self, keys: Iterable[ApiKey]):
        self.keys = tuple(keys)

    def __len__(self) -> int:
        return len(self.keys)

    def find(self, presented: str) -> ApiKey | None:
        """The key whose hash matches, in time independent of which key (if any) matches: no early exit."""
        wanted = digest(presented)
        found = None
        for key in self.keys:
            if hmac.compare_digest(wanted, key.sha256):
                found = key
        return found


def parse_entry(entry: object, where: str) -> ApiKey:
    """One entry of the key file; `where` names it in errors until its name is known."""
    if not isinstance(entry, dict):
        raise KeyFileError(f"{where} is not an object with name, sha256 and scopes")
    name, sha, scopes = entry.get("name"), entry.get("sha256"), entry.get("scopes")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise KeyFileError(f"{where}: the name must be 1 to 64 letters, digits, '_', '.', '@' or '-', "
                           "starting with a letter or digit")
    where = f"key {name!r}"
    if not isinstance(sha, str) or not _SHA256.fullmatch(sha.lower()):
        raise KeyFileError(f"{where}: sha256 must be the 64 hex digits of the key's sha256, not the key itself")
    if not isinstance(scopes, list) or not scopes or not all(isinstance(s, str) for s in scopes):
        raise KeyFileError(f"{where}: scopes must be a non-empty list drawn from {', '.join(SCOPES)}")
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown:
        raise KeyFileError(f"{where}: unknown scope {', '.join(unknown)}; the scopes are {', '.join(SCOPES)}")
    return ApiKey(name, bytes.fromhex(sha), frozenset(scopes))


def load_keys(path: str) -> KeyRing:
    """Read the contract's `{"keys": [{"name", "sha256", "scopes"}]}`; any flaw is a KeyFileError naming it."""
    prefix = f"API_KEYS_FILE {path}"
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise KeyFileError(f"{prefix} cannot be read: {e.strerror or e}") from e
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise KeyFileError(f"{prefix} is not JSON: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise KeyFileError(f'{prefix} must be an object {{"keys": [{{"name", "sha256", "scopes"}}, ...]}}')
    if not data["keys"]:
        raise KeyFileError(f"{prefix} lists no keys; add one (predq new-key NAME) or unset API_KEYS_FILE")
    try:
        keys = [parse_entry(entry, f"keys[{i}]") for i, entry in enumerate(data["keys"])]
    except KeyFileError as e:
        raise KeyFileError(f"{prefix}: {e}") from None
    for seen, what in (([k.name for k in keys], "name"), ([k.sha256 for k in keys], "sha256")):
        if len(set(seen)) != len(seen):
            raise KeyFileError(f"{prefix}: two keys have the same {what}")
    return KeyRing(keys)


def new_key(name: str, scopes: list[str]) -> tuple[str, dict]:
    """A new random key and the entry for the key file (which holds only its hash)."""
    entry = {"name": name, "sha256": "0" * 64, "scopes": scopes}
    parse_entry(entry, f"key {name!r}")  # the same checks as the file's, before a key is made
    key = "pq_" + secrets.token_urlsafe(32)
    entry["sha256"] = hashlib.sha256(key.encode()).hexdigest()
    return key, entry


# -- serving without keys --------------------------------------------------------------------------

def is_loopback_host(host: str) -> bool:
    """Whether every address `host` stands for is a loopback address (a name is resolved)."""
    host = host.strip("[]")
    try:
        addresses = [ipaddress.ip_address(host)]
    except ValueError:
        try:
            addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in socket.getaddrinfo(host, None)]
        except (OSError, UnicodeError, ValueError):
            return False
    for address in addresses:
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if not address.is_loopback:
            return False
    return bool(addresses)


def is_local_bind(address: object) -> bool:
    """A gunicorn bind: (host, port) on loopback, or a unix socket path; fd:// binds are not known to be local."""
    if isinstance(address, str):
        return True
    if isinstance(address, tuple) and address and isinstance(address[0], str):
        return is_loopback_host(address[0])
    return False


def startup_mode(auth: str, keys_file: str | None, binds: list[object]) -> str:
    """The one line a server logs at start about keys; ExposedWithoutKeys when it must not serve."""
    shown = ", ".join(_bind_text(b) for b in binds)
    if auth == "off":
        ignored = f" (API_KEYS_FILE {keys_file} is ignored)" if keys_file else ""
        return f"auth: AUTH=off, serving without API keys on {shown}{ignored}"
    if keys_file:
        ring = load_keys(keys_file)
        return f"auth: API keys required ({len(ring)} keys from {keys_file}) on {shown}"
    exposed = [_bind_text(b) for b in binds if not is_local_bind(b)]
    if exposed:
        raise ExposedWithoutKeys(
            f"refusing to serve without API keys on {', '.join(exposed)}, which other machines can reach: set "
            "API_KEYS_FILE (see `predq new-key`), bind to 127.0.0.1, or set AUTH=off if a proxy in front "
            "authenticates requests")
    return f"auth: no API keys configured; serving without keys on loopback only ({shown})"


def _bind_text(address: object) -> str:
    if isinstance(address, tuple):
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    if isinstance(address, str):
        return f"unix:{address}"
    return f"fd://{address}"
