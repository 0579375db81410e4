"""Single sign-on for the console: OpenID Connect, authorization code flow with PKCE.

SSO only says who the person is. It signs a browser in as the approver linked to the identity
``oidc:<issuer>#<sub>`` in the person registry; every power action still needs its own fresh
step-up (TOTP or passkey), exactly as after a TOTP sign-in.

Checks, in order, on the way back from the provider:

- the flow cookie (AES-GCM sealed with the console key, ``SameSite=Lax`` so the provider's
  redirect carries it, scoped to ``/console/sso/``) must open and its ``state`` must equal the
  query's (constant time): a callback started in another browser, or forged, is refused (login CSRF);
- the code is exchanged at the discovered token endpoint with the PKCE verifier (S256; Authlib's
  ``create_s256_code_challenge``) and the client's secret (HTTP Basic);
- the ID token's signature is checked with the provider's JWKS, asymmetric algorithms only
  (no ``none``, no HMAC with a public value); then ``iss`` must be the configured issuer exactly,
  ``aud`` must contain the client id (and ``azp`` must be it when there are several audiences),
  ``exp``/``iat`` within 60 s leeway, and ``nonce`` the one sealed in the flow cookie;
- the discovery document must name the configured issuer exactly (OpenID Connect Discovery §4.3).

Not protected: a compromised provider or client secret can sign anyone in as a linked person;
they still cannot use power without that person's own factor.
"""

from __future__ import annotations

import base64
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote_plus, urlencode

import aiohttp
from authlib.oauth2.rfc7636 import create_s256_code_challenge
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from intake.core.errors import Refused
from intake.core.settings import Settings

FLOW_COOKIE = "intake_sso"
FLOW_PATH = "/console/sso/"
FLOW_TTL_S = 600
LEEWAY_S = 60
ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
_AAD = b"intake-console-sso-flow-v1"


def identity_for(issuer: str, sub: str) -> str:
    """The person-registry identity of an OIDC subject."""
    return f"oidc:{issuer}#{sub}"


@dataclass(frozen=True)
class Flow:
    """One sign-in in progress: what the callback must match."""

    state: str
    nonce: str
    verifier: str
    exp: float


class OidcClient:
    """The console's OIDC relying party (one provider, from settings)."""

    def __init__(self, settings: Settings, key: bytes) -> None:
        assert settings.oidc_issuer and settings.oidc_client_id and settings.oidc_client_secret
        self.issuer = settings.oidc_issuer
        self.client_id = settings.oidc_client_id
        self._secret = settings.oidc_client_secret.get_secret_value()
        self.redirect_uri = f"{settings.console_origin}/console/sso/callback"
        self._aead = AESGCM(key)
        self._meta: dict[str, Any] | None = None

    # -- the flow cookie -------------------------------------------------------------------
    def new_flow(self) -> Flow:
        return Flow(state=secrets.token_urlsafe(32), nonce=secrets.token_urlsafe(32),
                    verifier=secrets.token_urlsafe(48), exp=time.time() + FLOW_TTL_S)

    def seal(self, flow: Flow) -> str:
        nonce = secrets.token_bytes(12)
        body = json.dumps({"state": flow.state, "nonce": flow.nonce, "verifier": flow.verifier, "exp": flow.exp})
        return base64.urlsafe_b64encode(nonce + self._aead.encrypt(nonce, body.encode(), _AAD)).decode().rstrip("=")

    def open(self, cookie: str | None, state: str) -> Flow:
        """The flow the browser started, matching ``state``; Refused otherwise."""
        if not cookie or len(cookie) > 1024 or not state:
            raise Refused("sso_state", "this sign-in was not started in this browser (or took too long): start again")
        try:
            raw = base64.urlsafe_b64decode(cookie + "=" * (-len(cookie) % 4))
            data = json.loads(self._aead.decrypt(raw[:12], raw[12:], _AAD))
            flow = Flow(state=str(data["state"]), nonce=str(data["nonce"]), verifier=str(data["verifier"]),
                        exp=float(data["exp"]))
        except (InvalidTag, ValueError, KeyError, TypeError):
            raise Refused("sso_state", "this sign-in was not started in this browser: start again") from None
        if flow.exp < time.time() or not hmac.compare_digest(flow.state.encode(), state.encode()):
            raise Refused("sso_state", "this sign-in was not started in this browser (or took too long): start again")
        return flow

    # -- the provider ----------------------------------------------------------------------
    async def metadata(self, session: aiohttp.ClientSession) -> dict[str, Any]:
        """The provider's discovery document, which must name the configured issuer exactly."""
        if self._meta is None:
            url = self.issuer.rstrip("/") + "/.well-known/openid-configuration"
            meta = await self._get_json(session, url)
            if meta.get("issuer") != self.issuer:
                raise Refused("sso_issuer", "the provider's discovery document names another issuer")
            for field in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
                if not isinstance(meta.get(field), str):
                    raise Refused("sso_provider", f"the provider's discovery document has no {field}")
            self._meta = meta
        return self._meta

    async def authorization_url(self, session: aiohttp.ClientSession, flow: Flow) -> str:
        meta = await self.metadata(session)
        query = urlencode({
            "response_type": "code", "client_id": self.client_id, "redirect_uri": self.redirect_uri,
            "scope": "openid", "state": flow.state, "nonce": flow.nonce,
            "code_challenge": create_s256_code_challenge(flow.verifier), "code_challenge_method": "S256",
        })
        return f"{meta['authorization_endpoint']}?{query}"

    async def subject(self, session: aiohttp.ClientSession, flow: Flow, code: str) -> str:
        """Exchange ``code`` and verify the ID token; the verified ``sub``."""
        meta = await self.metadata(session)
        basic = base64.b64encode(f"{_form_encode(self.client_id)}:{_form_encode(self._secret)}".encode()).decode()
        form = {"grant_type": "authorization_code", "code": code, "redirect_uri": self.redirect_uri,
                "code_verifier": flow.verifier}
        try:
            async with session.post(meta["token_endpoint"], data=form, headers={"Authorization": f"Basic {basic}"},
                                    timeout=aiohttp.ClientTimeout(total=15)) as resp:
                answer = await resp.json(content_type=None)
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, ValueError):
            raise Refused("sso_provider", "the identity provider's token endpoint did not answer") from None
        if status != 200 or not isinstance(answer, dict) or not isinstance(answer.get("id_token"), str):
            raise Refused("sso_token", "the identity provider refused the sign-in code")
        keys = KeySet.import_key_set(await self._get_json(session, meta["jwks_uri"]))
        try:
            token = jwt.decode(answer["id_token"], keys, algorithms=list(ALGORITHMS))
        except (JoseError, ValueError):
            raise Refused("sso_token", "the ID token's signature does not verify") from None
        return self._check_claims(token.claims, flow)

    def _check_claims(self, claims: dict[str, Any], flow: Flow) -> str:
        registry = jwt.JWTClaimsRegistry(
            leeway=LEEWAY_S, iss={"essential": True, "value": self.issuer},
            aud={"essential": True, "value": self.client_id}, sub={"essential": True},
            exp={"essential": True}, iat={"essential": True}, nonce={"essential": True, "value": flow.nonce},
        )
        try:
            registry.validate(claims)
        except JoseError as exc:
            raise Refused("sso_token", f"the ID token was refused ({exc.error})") from None
        audiences = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
        if len(audiences) > 1 and claims.get("azp") != self.client_id:
            raise Refused("sso_token", "the ID token is for several clients and not authorised for this one")
        sub = claims["sub"]
        if not isinstance(sub, str) or not 0 < len(sub) <= 255:
            raise Refused("sso_token", "the ID token's subject is not a string")
        return sub

    @staticmethod
    async def _get_json(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
        try:
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=15)) as resp:
                if resp.status != 200:
                    raise Refused("sso_provider", f"the identity provider answered HTTP {resp.status}")
                data = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError):
            raise Refused("sso_provider", "the identity provider did not answer") from None
        if not isinstance(data, dict):
            raise Refused("sso_provider", "the identity provider's answer is not a JSON object")
        return data


def _form_encode(value: str) -> str:
    """RFC 6749 §2.3.1: client id and secret are form-urlencoded before HTTP Basic."""
    return quote_plus(value)
