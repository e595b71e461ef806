"""pytest fixtures for projects that use countersink (loaded by pytest through an entry point).

- ``countersink_wait``: a function ``wait(timeout=10.0)`` that returns once this process sent
  its events and the sidecar finished every queued recount, and fails the test otherwise.
  Use it before asserting counts after ``update()``, ``mark_all_as_read()`` and other paths that
  recount.
- ``countersink_test_mode``: turns ``TEST_MODE`` on for one test (no sidecar; reads count the
  table). For a whole suite, set ``COUNTERSINK["TEST_MODE"] = True`` in the test settings instead,
  so ``migrate`` also creates the count table.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest


@pytest.fixture
def countersink_wait() -> Callable[..., None]:
    import countersink

    def wait(timeout: float = 10.0) -> None:
        if not countersink.wait_for_recounts(timeout):
            pytest.fail(f"countersink: events or recounts still outstanding after {timeout}s: {countersink.stats()}")

    return wait


@pytest.fixture
def countersink_test_mode() -> Iterator[None]:
    from django.test import override_settings

    from countersink import conf

    with override_settings(COUNTERSINK={**conf.user_settings(), "TEST_MODE": True}):
        yield
