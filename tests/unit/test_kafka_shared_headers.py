"""The consumer thread shares the header tuples that repeat between messages.

Pure logic on ``_SharedHeaders``: the Records get equal headers either way; what changes is
whether two records hold the same objects, and that the tables stay bounded.
"""

from __future__ import annotations

from eventsched.core.kafka.consumerthread import _SharedHeaders

Headers = list[tuple[str, str | bytes | None]]

V1: Headers = [("content-type", b"application/json"), ("schema-version", b"1")]
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def _fresh(headers: Headers) -> Headers:
    """New objects with the same content, as confluent builds them for each message."""
    return [
        (name.encode().decode(), bytes(bytearray(value)) if isinstance(value, bytes) else value)
        for name, value in headers
    ]


def test_repeated_headers_are_one_tuple() -> None:
    shared = _SharedHeaders()
    first = shared.share(_fresh(V1))
    second = shared.share(_fresh(V1))
    assert first == tuple(V1)
    assert second is first


def test_long_values_stay_per_message_short_pairs_still_shared() -> None:
    shared = _SharedHeaders()
    with_trace: Headers = [*V1, ("traceparent", TRACEPARENT.encode())]
    a = shared.share(_fresh(with_trace))
    b = shared.share(_fresh(with_trace))
    assert a == b == tuple(with_trace)
    assert a is not b
    assert a[0] is b[0] and a[1] is b[1]  # content-type and schema-version pairs
    assert a[2] is not b[2]


def test_str_values_and_dicts_become_bytes() -> None:
    shared = _SharedHeaders()
    assert shared.share({"a": "x", "b": None}) == (("a", b"x"), ("b", None))


def test_tables_stop_growing_at_the_limit() -> None:
    shared = _SharedHeaders()
    for n in range(3 * _SharedHeaders.LIMIT):
        headers: Headers = [("id", str(n).encode())]
        assert shared.share(headers) == (("id", str(n).encode()),)
    assert len(shared._pairs) == _SharedHeaders.LIMIT
    assert len(shared._sets) == _SharedHeaders.LIMIT
