"""``stream-url``: a fresh stream URL for the logged-in user, for ``live.js`` to reconnect with
after its token expired. Optional: include ``countersink.urls`` to enable it."""

from __future__ import annotations

from django.http import HttpRequest, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from countersink import live


@never_cache
@require_GET
def stream_url(request: HttpRequest) -> JsonResponse:
    """``{"url": ...}`` for ``request.user``; 403 for an anonymous user."""
    url = live.stream_url(request.user)
    if url is None:
        return JsonResponse({"error": "log in to watch a count"}, status=403)
    return JsonResponse({"url": url})
