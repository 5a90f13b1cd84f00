"""PostgreSQL, the source of truth: the pool, the SQL each role runs, migrations, leadership.

* :mod:`.pool` - the async connection pool (trio side, through trio-asyncio) and the
  error mapping every store uses;
* :mod:`.events` - the consumer's SQL: insert events idempotently, read what was kept;
* :mod:`.executions` - the executor's and reconciler's SQL: claim, finish, lease renewal,
  takeover, dead events, status counts;
* :mod:`.deadletters` - dead-letter copies the DLQ topic refused (kept, never dropped);
* :mod:`.replay` - ``dlq replay``'s re-run of a dead event (compare-and-set);
* :mod:`.migrations` - golang-migrate compatible migrations (``sql/``);
* :mod:`.leader` - one-at-a-time leadership through an advisory lock.

May import psycopg, psycopg_pool, ``eventsched.core.domain`` and the runtime foundation
(errors, settings, logs, packagedata); never ``eventsched.plugins``. Every SQL statement of
eventsched lives in this package, except the dev stack's own database set-up.
"""
