"""The one error type and the close-code table that docs/reference.md shows."""

from __future__ import annotations

from support import ROOT
from websocketserver.core.errors import (
    CLOSE_CODES,
    Close,
    Refused,
    StoreUnavailable,
    close_code_table,
)


def test_the_reference_shows_the_close_code_table_of_the_code() -> None:
    assert close_code_table() in (ROOT / "docs" / "reference.md").read_text()
    assert [row.code for row in CLOSE_CODES] == list(Close)


def test_a_refusal_carries_a_status_a_reason_and_a_close_code() -> None:
    refused = Refused(409, "token is already in use")
    assert (refused.status, refused.reason, str(refused), refused.close) == \
           (409, "token is already in use", "token is already in use", Close.INTERNAL_ERROR)
    outage = StoreUnavailable("Redis did not answer within 1.25 s")
    assert isinstance(outage, Refused) and outage.status == 503
    assert outage.reason == "reservation store unavailable: Redis did not answer within 1.25 s"
    assert outage.detail == "Redis did not answer within 1.25 s"
