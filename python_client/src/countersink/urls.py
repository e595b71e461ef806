"""``path("countersink/", include("countersink.urls"))`` enables token refresh for ``live.js``."""

from __future__ import annotations

from django.urls import path

from countersink import views

urlpatterns = [
    path("stream-url/", views.stream_url, name="countersink-stream-url"),
]
