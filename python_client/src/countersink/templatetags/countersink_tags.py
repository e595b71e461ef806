"""``{% load countersink_tags %}``: ``{% unread_count user %}`` and ``{% unread_badge user %}``."""

from __future__ import annotations

from typing import Any

from django import template

from countersink import reads

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
