"""The real app with the GitHub, GitLab and Jira webhooks on, a forge fake that records the
replies, and senders that sign payloads the way each forge does."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from intake.app import create_app
from intake.channels.gitlab import sign_standard_webhook
from intake.channels.webhooks import sign_hmac_sha256
from intake.core.settings import Settings, load_settings

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "webhooks"
GITHUB_SECRET = "gh-webhook-secret-0123456789abcdef"
GITLAB_TOKEN = "gl-webhook-token-0123456789abcdef"
GITLAB_SIGNING = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
JIRA_SECRET = "jira-webhook-secret-0123456789abcdef"


def vector(name: str) -> dict[str, Any]:
    return json.loads((VECTORS / name).read_text())


class ForgeFake:
    """Records every POST (path, headers, JSON) on 127.0.0.1; answers 201, or 503 (counted in
    ``refused``, not recorded) while ``outage`` is set."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.url = ""
        self._runner: web.AppRunner | None = None
        self.outage = False
        self.refused = 0

    async def _any(self, request: web.Request) -> web.Response:
        if self.outage:
            self.refused += 1
            return web.json_response({"message": "Service Unavailable"}, status=503)
        self.calls.append({"path": request.path, "headers": dict(request.headers), "json": await request.json()})
        return web.json_response({"id": len(self.calls)}, status=201)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._any)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def wait_for(self, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(self.calls) < count:
            if time.monotonic() > deadline:
                pytest.fail(f"forge fake got {len(self.calls)} calls, wanted {count}")
            await asyncio.sleep(0.02)
        return self.calls


def webhook_settings(base: Settings, forge: ForgeFake, **extra: Any) -> Settings:
    assert base.redis_url is not None
    values: dict[str, Any] = dict(
        _env_file=None, data_dir=base.data_dir, redis_url=base.redis_url.get_secret_value(),
        policy=base.policy_path, sweep_interval=0.1,
        github_webhook_secret=GITHUB_SECRET, github_api_url=forge.url, github_token="ghp_test",
        gitlab_webhook_token=GITLAB_TOKEN, gitlab_api_url=forge.url, gitlab_token="glpat-test",
        jira_webhook_secret=JIRA_SECRET, jira_api_url=forge.url, jira_user="bot@example.com", jira_token="jt",
    )
    values.update(extra)
    return load_settings(**values)


@dataclass
class Sender:
    client: TestClient
    forge: ForgeFake

    async def raw(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
        resp = await self.client.post(path, data=body, headers=headers)
        text = await resp.text()
        try:
            return resp.status, json.loads(text)
        except ValueError:
            return resp.status, text

    async def github(self, event: str, payload: dict[str, Any] | bytes, *, delivery: str | None = None,
                     secret: str = GITHUB_SECRET, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        all_headers = {"Content-Type": "application/json", "X-GitHub-Event": event,
                       "X-GitHub-Delivery": delivery or str(uuid.uuid4()),
                       "X-Hub-Signature-256": sign_hmac_sha256(secret, body)}
        all_headers.update(headers or {})
        return await self.raw("/webhooks/github", body, all_headers)

    async def gitlab(self, event: str, payload: dict[str, Any] | bytes, *, key: str | None = None,
                     token: str = GITLAB_TOKEN, headers: dict[str, str] | None = None,
                     signing: str | None = None, stamp: int | None = None) -> tuple[int, Any]:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        key = key or str(uuid.uuid4())
        all_headers = {"Content-Type": "application/json", "X-Gitlab-Event": event, "X-Gitlab-Token": token,
                       "Idempotency-Key": key, "X-Gitlab-Event-UUID": str(uuid.uuid4())}
        if signing is not None:
            ts = str(stamp if stamp is not None else int(time.time()))
            all_headers.update({"webhook-id": key, "webhook-timestamp": ts,
                                "webhook-signature": sign_standard_webhook(signing, key, ts, body)})
        all_headers.update(headers or {})
        return await self.raw("/webhooks/gitlab", body, all_headers)

    async def jira(self, payload: dict[str, Any] | bytes, *, identifier: str | None = None,
                   secret: str = JIRA_SECRET, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        all_headers = {"Content-Type": "application/json",
                       "X-Atlassian-Webhook-Identifier": identifier or str(uuid.uuid4().int)[:12],
                       "X-Hub-Signature": sign_hmac_sha256(secret, body)}
        all_headers.update(headers or {})
        return await self.raw("/webhooks/jira", body, all_headers)


@asynccontextmanager
async def running_webhooks(base: Settings, **extra: Any) -> AsyncIterator[Sender]:
    forge = ForgeFake()
    await forge.start()
    client = TestClient(TestServer(create_app(webhook_settings(base, forge, **extra)), host="127.0.0.1"))
    await client.start_server()
    try:
        yield Sender(client, forge)
    finally:
        await client.close()
        await forge.stop()
