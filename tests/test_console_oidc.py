"""Console sign-in through an OpenID Connect provider: an issuer run inside the test (discovery, a
sign-in form, the token endpoint checking PKCE, RS256 ID tokens, published keys), the console, and
Debian's chromium following the redirects."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from temporalio.client import Client

from worker.console import ConsoleSettings, create_app
from worker.console.auth import User, Users, hash_password
from worker.console.oidc import OidcClient, OidcError, OidcSettings
from worker.console.serve import ConsoleServer
from worker.devserver import free_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CLIENT_ID = "kernelflow-console"
ROLES = {"olga": ["approver", "operator"], "vic": None, "nobody": None}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _jwt(key: rsa.RSAPrivateKey, claims: dict[str, Any], kid: str = "k1") -> str:
    head = _b64(json.dumps({"alg": "RS256", "typ": "JWT", "kid": kid}).encode())
    body = _b64(json.dumps(claims).encode())
    signature = key.sign(f"{head}.{body}".encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{head}.{body}.{_b64(signature)}"


class Issuer:
    """A small OpenID provider: a sign-in form, codes bound to PKCE challenges, signed ID tokens."""

    def __init__(self) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.url = ""
        self.codes: dict[str, dict[str, str]] = {}

    def claims(self, name: str, nonce: str, **extra: Any) -> dict[str, Any]:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.url, "aud": CLIENT_ID, "sub": f"id-{name}", "preferred_username": name,
            "iat": now, "exp": now + 300, "nonce": nonce, **extra,
        }  # fmt: skip
        if ROLES.get(name):
            claims["kernelflow_roles"] = ROLES[name]
        return claims

    def app(self) -> Starlette:
        async def discovery(request: Request) -> Response:
            return JSONResponse(
                {
                    "issuer": self.url, "authorization_endpoint": f"{self.url}/authorize",
                    "token_endpoint": f"{self.url}/token", "jwks_uri": f"{self.url}/jwks",
                }
            )  # fmt: skip

        async def authorize(request: Request) -> Response:
            q = request.query_params
            if q.get("client_id") != CLIENT_ID or q.get("code_challenge_method") != "S256":
                return HTMLResponse("bad request", 400)
            hidden = "".join(
                f'<input type="hidden" name="{k}" value="{q.get(k)}">'
                for k in ("redirect_uri", "state", "nonce", "code_challenge")
            )
            return HTMLResponse(
                f'<form method="post" action="/authorize">{hidden}<input id="who" name="username">'
                '<button id="go">Sign in</button></form>'
            )

        async def authorized(request: Request) -> Response:
            form = dict(urllib.parse.parse_qsl((await request.body()).decode()))
            code = uuid.uuid4().hex
            self.codes[code] = form
            target = (
                form["redirect_uri"] + "?" + urllib.parse.urlencode({"code": code, "state": form["state"]})
            )
            return RedirectResponse(target, 303)

        async def token(request: Request) -> Response:
            form = dict(urllib.parse.parse_qsl((await request.body()).decode()))
            grant = self.codes.pop(form.get("code", ""), None)
            challenge = _b64(hashlib.sha256(form.get("code_verifier", "").encode()).digest())
            if (
                grant is None
                or form.get("client_id") != CLIENT_ID
                or form.get("redirect_uri") != grant["redirect_uri"]
                or challenge != grant["code_challenge"]
            ):
                return JSONResponse({"error": "invalid_grant"}, 400)
            claims = self.claims(grant["username"], grant["nonce"])
            return JSONResponse({"id_token": _jwt(self.key, claims), "token_type": "Bearer"})

        async def jwks(request: Request) -> Response:
            numbers = self.key.public_key().public_numbers()
            n = numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")
            e = numbers.e.to_bytes(3, "big")
            return JSONResponse(
                {"keys": [{"kty": "RSA", "kid": "k1", "alg": "RS256", "n": _b64(n), "e": _b64(e)}]}
            )

        return Starlette(
            routes=[
                Route("/.well-known/openid-configuration", discovery),
                Route("/authorize", authorize, methods=["GET"]),
                Route("/authorize", authorized, methods=["POST"]),
                Route("/token", token, methods=["POST"]),
                Route("/jwks", jwks),
            ]
        )


@pytest.fixture(scope="module")
async def sso(client: Client) -> AsyncIterator[dict[str, Any]]:
    issuer = Issuer()
    port = free_port()
    issuer.url = f"http://127.0.0.1:{port}"
    users = Users(users=[User(name="vic", roles=["viewer"], password_hash=hash_password("pw"))])
    oidc = OidcSettings(issuer=issuer.url, client_id=CLIENT_ID)
    settings = ConsoleSettings(users=users, secret=os.urandom(32), oidc=oidc)
    async with (
        ConsoleServer(issuer.app(), port=port),
        ConsoleServer(create_app(client, settings), port=free_port()) as console,
    ):
        yield {"issuer": issuer, "console": console.url, "oidc": oidc}


@pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (`make browser` installs it)"
)
async def test_sign_in_through_the_provider_in_a_browser(sso: dict[str, Any]) -> None:
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            for name, lands, roles in (
                ("olga", True, "operator approver"),
                ("vic", True, "viewer"),
                ("nobody", False, ""),
            ):
                page = await (await browser.new_context(base_url=sso["console"])).new_page()
                await page.goto("/approvals")
                await page.click("#sso")
                await page.fill("#who", name)
                await page.click("#go")
                await page.wait_for_load_state()
                if lands:
                    await page.wait_for_url("**/approvals")
                    assert await page.locator(".who .name").inner_text() == name
                    shown = " ".join(await page.locator(".who .role").all_inner_texts())
                    assert shown == roles
                else:
                    assert "nobody has no console role" in await page.content()
                await page.context.close()
        finally:
            await browser.close()


async def test_the_callback_and_the_token_are_checked(sso: dict[str, Any]) -> None:
    issuer: Issuer = sso["issuer"]
    async with httpx.AsyncClient(base_url=sso["console"]) as http:
        # The start of the flow is a form with the sign-in page's token.
        assert (await http.post("/login/oidc", data={})).status_code == 403
        # A callback that did not start here, or whose state differs, is refused.
        assert (await http.get("/login/oidc/callback?code=x&state=y")).status_code == 400
        page = (await http.get("/login")).text
        token = page.split('name="csrf" value="')[1].split('"')[0]
        started = await http.post("/login/oidc", data={"csrf": token})
        assert started.status_code == 303 and started.headers["location"].startswith(
            f"{issuer.url}/authorize?"
        )
        wrong = await http.get("/login/oidc/callback?code=x&state=not-the-state")
        assert wrong.status_code == 400 and "state differs" in wrong.text
        # The right state with a code the issuer never gave: the token endpoint refuses, so does the console.
        state = urllib.parse.parse_qs(urllib.parse.urlparse(started.headers["location"]).query)["state"][0]
        forged = await http.get(f"/login/oidc/callback?code=made-up&state={state}")
        assert forged.status_code == 403 and "refused the code" in forged.text
        assert "kf_session" not in http.cookies

    # ID tokens: another key, another audience, an old one, another nonce are each refused.
    reader = OidcClient(sso["oidc"])
    good = issuer.claims("olga", "n1")
    assert (await reader.verify(_jwt(issuer.key, good), nonce="n1"))["preferred_username"] == "olga"
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cases = [
        (_jwt(other_key, good), "signature"),
        (_jwt(issuer.key, {**good, "aud": "someone-else"}), "audience"),
        (_jwt(issuer.key, {**good, "exp": int(time.time()) - 600}), "expiry"),
        (_jwt(issuer.key, {**good, "nonce": "n2"}), "nonce"),
        (_jwt(issuer.key, good, kid="unknown"), "no RSA key"),
    ]
    for token_text, says in cases:
        with pytest.raises(OidcError, match=says):
            await reader.verify(token_text, nonce="n1")
