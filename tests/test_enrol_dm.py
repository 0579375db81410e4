"""Enrolment links go to the person by Slack DM when they have a Slack id (the admin never sees
the link), through the Slack Web API simulator; the link is never on the audit log."""

from __future__ import annotations

from intake.console.enrol import EnrolLinks, send_by_dm
from intake.core.settings import Settings, load_settings
from intake.storage.store import Store
from tests.slack_sim import SlackSim


async def test_the_link_is_sent_by_dm_and_kept_off_the_record(settings: Settings, store: Store) -> None:
    sim = await SlackSim().start()
    try:
        slack = load_settings(_env_file=None, data_dir=settings.data_dir, policy=settings.policy_path,
                              redis_url=settings.redis_url.get_secret_value(),  # type: ignore[union-attr]
                              slack_bot_token="xoxb-test", slack_api_url=sim.base_url)
        token = EnrolLinks(store).create("dave", actor="approver:alice")
        link = f"http://localhost:8080/console/enrol/{token}"
        assert await send_by_dm(slack, store, "UDAVE00000", "dave", link, actor="approver:alice")
        (call,) = sim.calls_to("chat.postMessage")
        assert call.params["channel"] == "UDAVE00000" and link in call.params["text"]
        exported = "\n".join(str(e) for e in store.audit.export())
        assert token not in exported and "approver.enrolment_link_sent" in exported
        sim.fail_next("chat.postMessage", error="channel_not_found")
        assert not await send_by_dm(slack, store, "UGONE00000", "dave", link, actor="approver:alice")
        plain = load_settings(_env_file=None, data_dir=settings.data_dir, policy=settings.policy_path)
        assert not await send_by_dm(plain, store, "UDAVE00000", "dave", link, actor="approver:alice")
    finally:
        await sim.stop()
