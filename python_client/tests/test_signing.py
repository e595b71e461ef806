"""Standard Webhooks signing: the published test vector, and the sidecar's verdict."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from django.conf import settings
from sidecar import Sidecar

from countersink import signing

SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
#: Far beyond any id the test database hands out, so these events touch no test's state.
FAR_ID = 9_000_000_000_000_000_000


def test_signature_matches_the_standard_webhooks_test_vector() -> None:
    key = signing.decode_secret(SPEC_SECRET)
    signature = signing.sign(key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}')
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_headers_carry_the_id_the_timestamp_and_the_signature() -> None:
    key = signing.decode_secret(SPEC_SECRET)
    headers = signing.headers(key, "msg_1", b"[]", now=1700000000.7)
    assert headers == {
        "webhook-id": "msg_1",
        "webhook-timestamp": "1700000000",
        "webhook-signature": signing.sign(key, "msg_1", 1700000000, b"[]"),
    }


def test_message_ids_are_unique() -> None:
    assert len({signing.new_message_id() for _ in range(1000)}) == 1000


@pytest.mark.parametrize("secret", ["MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_", "whsec_not base64!"])
def test_malformed_secrets_are_refused(secret: str) -> None:
    with pytest.raises(signing.InvalidSecret):
        signing.decode_secret(secret)


def post(url: str, body: bytes, headers: dict[str, str]) -> int:
    request = urllib.request.Request(
        f"{url}/v1/events", data=body, method="POST", headers={"Content-Type": "application/json", **headers}
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.django_db(transaction=True)
def test_the_sidecar_accepts_our_signature(live_sidecar: Sidecar) -> None:
    body = json.dumps({"kind": "post_delete", "notification_id": FAR_ID, "user_id": FAR_ID}).encode()
    key = signing.decode_secret(settings.TEST_WEBHOOK_SECRET)
    assert post(live_sidecar.url, body, signing.headers(key, signing.new_message_id(), body)) == 200


@pytest.mark.django_db(transaction=True)
def test_the_sidecar_rejects_unsigned_forged_and_stale_requests(live_sidecar: Sidecar) -> None:
    url = live_sidecar.url
    body = json.dumps({"kind": "post_delete", "notification_id": FAR_ID, "user_id": FAR_ID}).encode()
    key = signing.decode_secret(settings.TEST_WEBHOOK_SECRET)
    forged_key = signing.decode_secret(SPEC_SECRET)
    assert post(url, body, {}) == 401
    assert post(url, body, signing.headers(forged_key, "msg_forged", body)) == 401
    import time

    assert post(url, body, signing.headers(key, "msg_stale", body, now=time.time() - 600)) == 401
    tampered = signing.headers(key, "msg_tampered", body)
    assert post(url, body.replace(b'"post_delete"', b'"post_save"'), tampered) == 401
