"""The forge adapter against a local fake of GitHub's pulls endpoint."""

from __future__ import annotations

import pytest

from intake.workers.forge import ForgeError, create_pull_request
from tests.workers.fake_forge import FakeForge, fake_forge  # noqa: F401


def _open(forge: FakeForge) -> str:
    return create_pull_request(api_url=forge.url, repository="acme/web", token="tok-123456",
                               title="t", head="intake/T-1", base="main", body="b")


def test_creates_a_pull_request_with_the_github_shape(fake_forge: FakeForge) -> None:  # noqa: F811
    assert _open(fake_forge) == "https://forge.test/acme/web/pull/1"
    assert fake_forge.calls == [{
        "path": "/repos/acme/web/pulls", "authorization": "Bearer tok-123456",
        "json": {"title": "t", "head": "intake/T-1", "base": "main", "body": "b", "draft": False},
    }]


def test_redirects_are_not_followed(fake_forge: FakeForge) -> None:  # noqa: F811
    fake_forge.redirect_to = f"{fake_forge.url}/elsewhere"
    with pytest.raises(ForgeError, match="HTTP 307"):
        _open(fake_forge)
    assert [c["path"] for c in fake_forge.calls] == ["/repos/acme/web/pulls"]


def test_errors_are_one_line_without_the_token(fake_forge: FakeForge) -> None:  # noqa: F811
    fake_forge.status = 401
    with pytest.raises(ForgeError) as err:
        _open(fake_forge)
    assert "tok-123456" not in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ForgeError, match="cannot reach"):
        create_pull_request(api_url="http://127.0.0.1:9", repository="a/b", token="tok-123456",
                            title="t", head="h", base="main", body="b", timeout=2)
