"""Who may use the console: configured users with scrypt password hashes, signed session cookies,
CSRF tokens bound to the session, and three roles.

Roles: every signed-in user may look (``viewer``); ``operator`` may reroute, pause, resume, cancel,
check providers and replay dead letters; ``approver`` may decide approvals. A user holds one or more
roles. The users file (``KERNELFLOW_CONSOLE_USERS``) is YAML::

    users:
      - {name: ada, roles: [operator, approver], password_hash: "scrypt$16384$8$1$<salt>$<hash>"}
      - {name: vic, roles: [viewer], password_hash: "..."}

``kernelflow console --hash-password`` prints a hash for a password read from standard input.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import secrets
import time
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError

from kernel.errors import ConfigurationError
from kernel.pipeline import format_validation_error

__all__ = [
    "ROLES",
    "Role",
    "Session",
    "SessionSigner",
    "User",
    "Users",
    "hash_password",
    "load_users",
    "verify_password",
]

Role = Literal["viewer", "operator", "approver"]
ROLES: tuple[Role, ...] = ("viewer", "operator", "approver")

_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """``scrypt$N$r$p$salt$hash`` with base64 salt and hash (stdlib scrypt, 16 MiB of memory)."""
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P, dklen=32)
    return "$".join(["scrypt", str(_SCRYPT_N), str(_SCRYPT_R), str(_SCRYPT_P), _b64(salt), _b64(digest)])


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = _unb64(digest)
        got = hashlib.scrypt(
            password.encode(), salt=_unb64(salt), n=int(n), r=int(r), p=int(p), dklen=len(expected)
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, expected)


def _viewer_only() -> list[Role]:
    return ["viewer"]


class User(BaseModel):
    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9._@-]+$")
    roles: list[Role] = Field(default_factory=_viewer_only, min_length=1)
    password_hash: str | None = Field(
        default=None, pattern=r"^scrypt\$", description="None: signs in only through the OIDC provider."
    )

    def can(self, role: Role) -> bool:
        return role == "viewer" or role in self.roles


class Users(BaseModel):
    users: list[User] = Field(default_factory=list)

    def find(self, name: str) -> User | None:
        return next((u for u in self.users if u.name == name), None)

    def authenticate(self, name: str, password: str) -> User | None:
        """The user if the password matches. An unknown name costs as much as a wrong password."""
        user = self.find(name)
        if user is None:
            verify_password(password, _dummy_hash())
            return None
        if user.password_hash is None:
            verify_password(password, _dummy_hash())
            return None
        return user if verify_password(password, user.password_hash) else None


@functools.cache
def _dummy_hash() -> str:
    return hash_password("not a password", salt=b"\0" * 16)


def load_users(path: str | Path) -> Users:
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as exc:
        raise ConfigurationError(f"console users file {str(path)!r} cannot be read: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigurationError(f"console users file {str(path)!r} is not valid YAML: {exc}") from exc
    try:
        users = Users.model_validate(raw)
    except ValidationError as exc:
        raise ConfigurationError(
            f"console users file {str(path)!r}: {format_validation_error(exc)}; each user takes name, "
            f"roles (some of {', '.join(ROLES)}) and password_hash (from `kernelflow console --hash-password`)"
        ) from exc
    names = [u.name for u in users.users]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigurationError(f"console users file {str(path)!r} names {', '.join(duplicates)} twice")
    return users


class Session(BaseModel):
    user: str
    csrf: str
    expires: float
    roles: list[Role] | None = Field(default=None, description="Set for OIDC sign-ins: roles from the token.")


class SessionSigner:
    """Sessions live in a cookie signed with HMAC-SHA256: nothing is stored on the server, and a
    changed cookie is refused. The CSRF token is part of the session, so it cannot be swapped."""

    def __init__(self, secret: bytes, *, max_age_s: float = 12 * 3600) -> None:
        if len(secret) < 16:
            raise ConfigurationError("the console's session secret must be at least 16 bytes")
        self._secret = secret
        self.max_age_s = max_age_s

    def new(self, user: str, roles: list[Role] | None = None) -> Session:
        return Session(
            user=user, csrf=secrets.token_urlsafe(24), expires=time.time() + self.max_age_s, roles=roles
        )

    def seal(self, data: dict[str, Any]) -> str:
        """Any small JSON object, signed (the OIDC flow's state between redirect and callback)."""
        body = _b64(json.dumps(data).encode())
        return f"{body}.{self._sign(body)}"

    def unseal(self, cookie: str | None) -> dict[str, Any] | None:
        if not cookie or "." not in cookie:
            return None
        body, _, signature = cookie.rpartition(".")
        if not hmac.compare_digest(signature, self._sign(body)):
            return None
        try:
            data = json.loads(_unb64(body))
        except ValueError:
            return None
        return data if isinstance(data, dict) else None

    def dump(self, session: Session) -> str:
        body = _b64(session.model_dump_json().encode())
        return f"{body}.{self._sign(body)}"

    def load(self, cookie: str | None) -> Session | None:
        if not cookie or "." not in cookie:
            return None
        body, _, signature = cookie.rpartition(".")
        if not hmac.compare_digest(signature, self._sign(body)):
            return None
        try:
            data: Any = json.loads(_unb64(body))
            session = Session.model_validate(data)
        except (ValueError, ValidationError):
            return None
        return session if session.expires > time.time() else None

    def _sign(self, body: str) -> str:
        return _b64(hmac.new(self._secret, body.encode(), hashlib.sha256).digest())


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
