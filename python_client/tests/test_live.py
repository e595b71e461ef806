"""Live counts: stream tokens minted by Django against the real sidecar, the live badge tag, the
token-refresh view, and the badge in headless Chromium following a notification created through
the ORM (pushed over Server-Sent Events by the real sidecar)."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.template import Context, Template
from django.test import Client
from helpers import make_user, notify, settle
from testproject.notifications.models import Notification

from countersink import live

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("live_sidecar")]

CHROMIUM = os.environ.get("COUNTERSINK_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("COUNTERSINK_TEST_CHROMEDRIVER", "/usr/bin/chromedriver")
#: How soon a change must reach the page.
PUSHED_WITHIN = 5.0


def first_event(url: str) -> dict[str, Any]:
    """Opens a stream like a browser would and returns its first event's fields."""
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.headers["content-type"] == "text/event-stream"
        fields: dict[str, Any] = {}
        for raw in response:
            line = raw.decode().rstrip("\n")
            if not line:
                if "event" in fields:
                    return fields
                continue
            name, _, value = line.partition(":")
            if name:
                fields[name] = value.lstrip(" ")
    raise AssertionError("the stream ended before its first event")


def test_the_sidecar_accepts_a_token_minted_by_django_for_that_user_only() -> None:
    user, other = make_user(), make_user()
    notify(user, 2)
    settle()
    event = first_event(live.stream_url(user) or "")
    assert event["event"] == "count"
    assert json.loads(event["data"]) == {"user_id": user.pk, "unread_count": 2}
    assert event["id"] == "2"

    foreign = (live.stream_url(user) or "").replace(f"/users/{user.pk}/", f"/users/{other.pk}/")
    expired = (live.stream_url(user) or "").split("?")[0] + f"?token={live.stream_token(user.pk, ttl=-10)}"
    for url in (foreign, expired, (live.stream_url(user) or "").split("?")[0]):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url, timeout=5)
        assert refused.value.code == 401


def test_the_live_badge_renders_the_count_the_stream_and_the_refresh_url() -> None:
    user, quiet = make_user(), make_user()
    notify(user, 3)
    settle()
    template = Template("{% load countersink_tags %}{% live_unread_badge user %}|{% live_unread_badge quiet %}")
    html = template.render(Context({"user": user, "quiet": quiet}))
    busy, idle = html.split("|")
    assert f"/v1/users/{user.pk}/unread-count/stream?token=" in busy
    assert 'data-unread-count="3"' in busy and ">3</span>" in busy and " hidden" not in busy
    assert 'data-countersink-refresh="/countersink/stream-url/"' in busy
    assert 'data-unread-count="0"' in idle and " hidden" in idle, "kept on the page, hidden, ready to show"
    script = Template("{% load countersink_tags %}{% countersink_live_script nonce='abc' %}").render(Context())
    assert script.startswith('<script nonce="abc">') and "EventSource" in script


def test_the_refresh_view_gives_a_logged_in_user_a_fresh_stream_url_and_no_one_else() -> None:
    user = make_user()
    client = Client()
    assert client.get("/countersink/stream-url/").status_code == 403
    client.force_login(user)
    response = client.get("/countersink/stream-url/")
    assert response.status_code == 200
    assert f"/v1/users/{user.pk}/unread-count/stream?token=" in response.json()["url"]
    assert first_event(response.json()["url"])["event"] == "count"


@pytest.fixture
def browser() -> Iterator[Any]:
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        message = f"headless Chromium needs {CHROMIUM} and {CHROMEDRIVER} (Debian: chromium chromium-driver)"
        if os.environ.get("COUNTERSINK_REQUIRE_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def badge(driver: Any) -> dict[str, Any]:
    return dict(
        driver.execute_script(
            "var b = document.querySelector('.countersink-badge');"
            "return b ? {count: b.getAttribute('data-unread-count'), text: b.textContent, hidden: b.hidden,"
            " live: b.getAttribute('data-countersink-live')} : {};"
        )
    )


def wait_until(driver: Any, predicate: Callable[[dict[str, Any]], bool], timeout: float) -> float:
    """Seconds until ``predicate(badge)`` held; fails with the badge's last state after ``timeout``."""
    start = time.monotonic()
    while not predicate(state := badge(driver)):
        assert time.monotonic() - start < timeout, f"badge stuck at {state}"
        time.sleep(0.05)
    return time.monotonic() - start


def test_a_notification_created_through_django_changes_the_badge_on_the_page(live_server: Any, browser: Any) -> None:
    user = make_user()
    notify(user, 2)
    settle()
    browser.get(f"{live_server.url}/badge/{user.pk}/")
    wait_until(browser, lambda b: b == {"count": "2", "text": "2", "hidden": False, "live": "open"}, PUSHED_WITHIN)

    Notification.objects.create(recipient=user, text="a new one")
    wait_until(browser, lambda b: (b["count"], b["text"]) == ("3", "3"), PUSHED_WITHIN)

    for notification in Notification.objects.filter(recipient=user):
        notification.unread = False
        notification.save()
    wait_until(browser, lambda b: (b["count"], b["hidden"]) == ("0", True), PUSHED_WITHIN)
