"""Credentials of an HTTP request -> the :class:`~shared.tenancy.Principal` it acts as.

API keys (``Authorization: Bearer <key>`` or ``X-API-Key``) are looked up by their SHA-256; a
bearer JWT is verified (signature against the issuer's JWKS, issuer, expiry, audience) before its
claims name the tenant. The decisions on what a key or a claim means are :mod:`shared.tenancy`'s.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Executor

import jwt
from aiohttp import web

from shared.config import AccessConfig
from shared.tenancy import Principal, anonymous, principal_of_api_key, principal_of_claims

from . import metrics

log = logging.getLogger("dicomflow.web.auth")


class Unauthorized(Exception):
    """No acceptable credentials: answered 401 with the reason."""


def _looks_like_jwt(token: str) -> bool:
    return token.count(".") == 2 and token.startswith("eyJ")


class Authenticator:
    """Turns a request's headers into a principal, or raises :class:`Unauthorized`."""

    def __init__(self, access: AccessConfig, executor: Executor):
        self.access = access
        self.executor = executor
        self.jwks = jwt.PyJWKClient(access.jwt.jwks_url, cache_keys=True, lifespan=300) \
            if access.jwt.issuer and access.jwt.jwks_url else None

    async def principal(self, headers) -> Principal:
        """The principal of a request with these headers."""
        token = headers.get("X-API-Key", "").strip()
        authorization = headers.get("Authorization", "").strip()
        if not token and authorization:
            scheme, _, token = authorization.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                self._refuse("scheme", "only Bearer credentials (an API key or a JWT) are accepted")
            token = token.strip()
        if not token:
            who = anonymous(self.access)
            if who is None:
                self._refuse("missing", "credentials required: Authorization: Bearer <API key or JWT>")
            return who
        if _looks_like_jwt(token):
            return await self._from_jwt(token)
        who = principal_of_api_key(self.access, token)
        if who is None:
            self._refuse("unknown_key", "unknown API key")
        return who

    async def _from_jwt(self, token: str) -> Principal:
        if self.jwks is None:
            self._refuse("jwt_disabled", "JWTs are not accepted here (access.jwt.issuer is not set)")
        cfg = self.access.jwt
        try:
            claims = await asyncio.get_running_loop().run_in_executor(self.executor, self._verify, token)
        except jwt.PyJWTError as exc:
            self._refuse("invalid_jwt", f"invalid token: {exc}")
        who = principal_of_claims(self.access, claims)
        if who is None:
            self._refuse("no_tenant", f"the token names no configured tenant (claim {cfg.tenant_claim!r})")
        return who

    def _verify(self, token: str) -> dict:
        cfg = self.access.jwt
        key = self.jwks.get_signing_key_from_jwt(token)
        return jwt.decode(token, key.key, algorithms=[a for a in cfg.algorithms if a.lower() != "none"],
                          issuer=cfg.issuer, audience=cfg.audience or None,
                          options={"require": ["exp", "iss"], "verify_aud": bool(cfg.audience)})

    @staticmethod
    def _refuse(reason: str, message: str):
        metrics.auth_failures.labels(reason=reason).inc()
        raise Unauthorized(message)


AUTHENTICATOR = web.AppKey("authenticator", Authenticator)
