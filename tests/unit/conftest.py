"""The unit tier's fixtures: loopback receivers on threads in the test process (no servers)."""

from tests.support.webhook import closed_port, not_http, receiver  # noqa: F401
