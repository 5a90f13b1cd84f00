"""The fast tier: tests that need no server, no role process and no broker.

Pure logic, trio's autojump clock, parsing, configuration and rendering. The whole tier
runs in seconds with no PostgreSQL, Redis or Kafka reachable (`make test-unit`). Its
modules import only the package under test and the harness in ``tests.support``.
"""
