"""The example page: a navigation bar with a live unread badge."""

from __future__ import annotations

from django.contrib.auth import get_user_model
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, render


def badge_page(request: HttpRequest, user_id: int) -> HttpResponse:
    """The example page for a user (a real site shows ``request.user``'s badge; the browser test
    has no login form, so the user is in the URL)."""
    user = get_object_or_404(get_user_model(), pk=user_id)
    return render(request, "example_badge.html", {"user": user})
