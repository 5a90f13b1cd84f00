"""The runtime: what every process is built from, and the composition root that builds it.

Two layers live here, and the modules keep them apart:

* the foundation every other part of ``eventsched.core`` may import: :mod:`.errors` (the
  exception types and their exit codes), :mod:`.settings` (dynaconf read once into frozen
  settings, validation), :mod:`.units` (durations and sizes), :mod:`.redaction` (secrets
  out of text), :mod:`.logs` (structlog set-up), :mod:`.metrics`
  (Prometheus collectors), :mod:`.netguard` (the outbound-address guard),
  :mod:`.packagedata` (where the shipped SQL and default settings are). These import
  nothing of eventsched outside this list;
* the composition root, which imports the adapters (``core.kafka``, ``core.jobqueue``,
  ``core.store``) and nothing of ``eventsched.plugins``: :mod:`.contracts` (the role-plugin
  and handler contracts and their loading), :mod:`.health` (``/metrics``, ``/healthz``,
  ``/readyz``, stalls), :mod:`.root` (:class:`~.root.Runtime`: settings -> adapters ->
  role plugins under one trio nursery, signals, shutdown), :mod:`.bootstrap` and
  :mod:`.aioloop` (trio-asyncio, installed by the process entry points, never on import),
  :mod:`.profiling` (Pyroscope).

No module here is imported by ``import eventsched``; importing one has no side effects.
"""
