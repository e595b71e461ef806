"""``{% load countersink_tags %}``: ``{% unread_count user %}``, ``{% unread_badge user %}``, and
the live badge, ``{% live_unread_badge user %}`` with ``{% countersink_live_script %}``."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from django import template
from django.urls import NoReverseMatch, reverse
from django.utils.html import format_html
from django.utils.safestring import SafeString, mark_safe

from countersink import live, reads

register = template.Library()

#: Counts above this show as "99+" in the badge.
BADGE_MAX = 99


@register.simple_tag
def unread_count(user: Any) -> int:
    """The user's real-time unread count (``{% unread_count user as n %}`` stores it)."""
    return reads.unread_count(user)


@register.inclusion_tag("countersink/unread_badge.html")
def unread_badge(user: Any) -> dict[str, Any]:
    """A ``<span class="countersink-badge">`` with the count; nothing when it is 0.

    Override ``countersink/unread_badge.html`` to change the markup.
    """
    count = reads.unread_count(user)
    return {"count": count, "label": f"{BADGE_MAX}+" if count > BADGE_MAX else str(count)}


@register.inclusion_tag("countersink/live_unread_badge.html")
def live_unread_badge(user: Any) -> dict[str, Any]:
    """The badge, kept up to date in the browser (Server-Sent Events from the sidecar).

    Rendered with the current count (hidden at 0), and the stream URL with a token for this user;
    ``{% countersink_live_script %}`` once on the page makes it live. Nothing for an anonymous user.
    """
    url = live.stream_url(user)
    count = reads.unread_count(user) if url is not None else 0
    try:
        refresh_url: str | None = reverse("countersink-stream-url")
    except NoReverseMatch:
        refresh_url = None  # countersink.urls not included: no token refresh
    return {
        "stream_url": url,
        "refresh_url": refresh_url,
        "count": count,
        "max": BADGE_MAX,
        "label": f"{BADGE_MAX}+" if count > BADGE_MAX else str(count),
    }


@functools.cache
def _live_js() -> str:
    return (Path(__file__).resolve().parents[1] / "static" / "countersink" / "live.js").read_text()


@register.simple_tag
def countersink_live_script(nonce: str | None = None) -> SafeString:
    """``<script>`` with ``live.js`` inline (pass ``nonce=`` under a Content-Security-Policy).

    With ``django.contrib.staticfiles`` you can load ``countersink/live.js`` yourself instead.
    """
    if nonce:
        return format_html('<script nonce="{}">{}</script>', nonce, mark_safe(_live_js()))
    return mark_safe(f"<script>{_live_js()}</script>")
