"""Sign-in through an OpenID Connect provider: the authorization code flow with PKCE, the ID token's
RS256 signature checked against the issuer's published keys, and its issuer, audience, expiry and nonce.

Environment: ``KERNELFLOW_CONSOLE_OIDC_ISSUER`` (turns it on), ``KERNELFLOW_CONSOLE_OIDC_CLIENT_ID``,
``KERNELFLOW_CONSOLE_OIDC_CLIENT_SECRET`` (confidential clients only), ``KERNELFLOW_CONSOLE_OIDC_NAME_CLAIM``
(default ``preferred_username``), ``KERNELFLOW_CONSOLE_OIDC_ROLES_CLAIM`` (default ``kernelflow_roles``).
A person's roles are the token's roles claim (values among viewer, operator, approver), else those of the
user of the same name in the users file; someone with neither is refused.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from kernel.errors import ConfigurationError

__all__ = ["OidcClient", "OidcError", "OidcSettings", "pkce_pair"]


class OidcError(Exception):
    """The provider's answer cannot be trusted or used; the message says which check failed."""


@dataclass(frozen=True)
class OidcSettings:
    issuer: str
    client_id: str
    client_secret: str | None = None
    name_claim: str = "preferred_username"
    roles_claim: str = "kernelflow_roles"
    scopes: str = "openid profile email"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> OidcSettings | None:
        issuer = env.get("KERNELFLOW_CONSOLE_OIDC_ISSUER")
        if not issuer:
            return None
        client_id = env.get("KERNELFLOW_CONSOLE_OIDC_CLIENT_ID")
        if not client_id:
            raise ConfigurationError(
                "KERNELFLOW_CONSOLE_OIDC_ISSUER is set but KERNELFLOW_CONSOLE_OIDC_CLIENT_ID is not"
            )
        return cls(
            issuer=issuer.rstrip("/"),
            client_id=client_id,
            client_secret=env.get("KERNELFLOW_CONSOLE_OIDC_CLIENT_SECRET") or None,
            name_claim=env.get("KERNELFLOW_CONSOLE_OIDC_NAME_CLAIM", "preferred_username"),
            roles_claim=env.get("KERNELFLOW_CONSOLE_OIDC_ROLES_CLAIM", "kernelflow_roles"),
        )


def pkce_pair() -> tuple[str, str]:
    """(verifier, S256 challenge)."""
    verifier = secrets.token_urlsafe(48)
    challenge = _b64(hashlib.sha256(verifier.encode()).digest())
    return verifier, challenge


class OidcClient:
    def __init__(self, settings: OidcSettings, *, timeout: float = 10.0) -> None:
        self.settings = settings
        self.timeout = timeout
        self._metadata: dict[str, Any] | None = None
        self._keys: dict[str, Any] = {}

    async def metadata(self) -> dict[str, Any]:
        if self._metadata is None:
            url = f"{self.settings.issuer}/.well-known/openid-configuration"
            found = await self._get_json(url)
            if found.get("issuer", "").rstrip("/") != self.settings.issuer:
                raise OidcError(f"{url} names issuer {found.get('issuer')!r}, not {self.settings.issuer!r}")
            self._metadata = found
        return self._metadata

    async def authorize_url(self, redirect_uri: str, *, state: str, nonce: str, challenge: str) -> str:
        endpoint = (await self.metadata())["authorization_endpoint"]
        query = {
            "response_type": "code", "client_id": self.settings.client_id, "redirect_uri": redirect_uri,
            "scope": self.settings.scopes, "state": state, "nonce": nonce,
            "code_challenge": challenge, "code_challenge_method": "S256",
        }  # fmt: skip
        return f"{endpoint}?{urllib.parse.urlencode(query)}"

    async def exchange(self, code: str, *, redirect_uri: str, verifier: str, nonce: str) -> dict[str, Any]:
        """Trade the code for tokens; returns the ID token's verified claims."""
        meta = await self.metadata()
        form = {
            "grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri,
            "client_id": self.settings.client_id, "code_verifier": verifier,
        }  # fmt: skip
        if self.settings.client_secret:
            form["client_secret"] = self.settings.client_secret
        async with httpx.AsyncClient(timeout=self.timeout) as http:
            try:
                answer = await http.post(meta["token_endpoint"], data=form)
            except httpx.HTTPError as exc:
                raise OidcError(f"the token endpoint could not be reached: {exc.__class__.__name__}") from exc
        if answer.status_code != 200:
            raise OidcError(
                f"the token endpoint refused the code ({answer.status_code}: {answer.text[:200]})"
            )
        id_token = answer.json().get("id_token")
        if not isinstance(id_token, str):
            raise OidcError("the token endpoint's answer has no id_token")
        return await self.verify(id_token, nonce=nonce)

    async def verify(self, token: str, *, nonce: str) -> dict[str, Any]:
        try:
            head_b64, body_b64, sig_b64 = token.split(".")
            header = json.loads(_unb64(head_b64))
            claims: dict[str, Any] = json.loads(_unb64(body_b64))
            signature = _unb64(sig_b64)
        except ValueError as exc:
            raise OidcError("the ID token is not a well-formed JWT") from exc
        if header.get("alg") != "RS256":
            raise OidcError(f"the ID token is signed with {header.get('alg')!r}; only RS256 is accepted")
        key = await self._key(header.get("kid"))
        try:
            key.verify(signature, f"{head_b64}.{body_b64}".encode(), padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature as exc:
            raise OidcError("the ID token's signature does not match the issuer's keys") from exc
        audience = claims.get("aud")
        audiences = audience if isinstance(audience, list) else [audience]
        checks = [
            (str(claims.get("iss", "")).rstrip("/") == self.settings.issuer, "issuer"),
            (self.settings.client_id in audiences, "audience"),
            (isinstance(claims.get("exp"), int | float) and claims["exp"] > time.time() - 30, "expiry"),
            (claims.get("nonce") == nonce, "nonce"),
        ]
        failed = [what for ok, what in checks if not ok]
        if failed:
            raise OidcError(f"the ID token fails the {', '.join(failed)} check")
        return claims

    async def _key(self, kid: str | None) -> rsa.RSAPublicKey:
        if kid not in self._keys:
            jwks = await self._get_json((await self.metadata())["jwks_uri"])
            for jwk in jwks.get("keys", []):
                if jwk.get("kty") == "RSA":
                    numbers = rsa.RSAPublicNumbers(
                        int.from_bytes(_unb64(jwk["e"]), "big"), int.from_bytes(_unb64(jwk["n"]), "big")
                    )
                    self._keys[jwk.get("kid")] = numbers.public_key()
        if kid not in self._keys:
            raise OidcError(f"the issuer publishes no RSA key {kid!r}")
        key: rsa.RSAPublicKey = self._keys[kid]
        return key

    async def _get_json(self, url: str) -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=self.timeout) as http:
            try:
                answer = await http.get(url)
                answer.raise_for_status()
                found: dict[str, Any] = answer.json()
            except (httpx.HTTPError, ValueError) as exc:
                raise OidcError(f"{url} could not be read: {exc.__class__.__name__}") from exc
        return found


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
