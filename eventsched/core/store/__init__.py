"""PostgreSQL, the source of truth: the pool, the SQL each role runs, migrations, leadership.

* :mod:`.pool` - the async connection pool (trio side, through trio-asyncio) and the
  error mapping every store uses;
* :mod:`.events` - the consumer's SQL: insert events idempotently, read what was kept;
* :mod:`.executions` - the executor's SQL: claim, finish, lease renewal, schema check;
* :mod:`.groupcommit` - a worker thread running many callers' requests as one statement
  per round trip (the executor's claims and outcomes go through it);
* :mod:`.recovery` - the reconciler's SQL: candidates, takeover of stale attempts, dead
  events not yet in the DLQ, status counts for the gauges;
* :mod:`.queries` - the API's and the CLI's reads: one event with its attempts and
  command history, keyset pages, counts, key lookups;
* :mod:`.deadletters` - dead-letter copies the DLQ topic refused (kept, never dropped);
* :mod:`.replay` - ``dlq replay``'s re-run of a dead event (compare-and-set);
* :mod:`.commands` - commands on events (cancel, reschedule, retry): one compare-and-set
  each, recorded in ``event_commands`` (the consumer applies them);
* :mod:`.selection` - ``events retry --status``: finished events selected by filter;
* :mod:`.migrations` - golang-migrate compatible migrations (``sql/``);
* :mod:`.leader` - one-at-a-time leadership through an advisory lock.

May import psycopg, psycopg_pool, ``eventsched.core.domain`` and the runtime foundation
(errors, settings, logs, packagedata); never ``eventsched.plugins``. Every SQL statement of
eventsched lives in this package, except the dev stack's own database set-up.
"""
