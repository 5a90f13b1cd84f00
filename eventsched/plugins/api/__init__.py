"""The ``api`` role: an HTTP API to schedule events, cancel, reschedule and retry them, and
read their state.

* :mod:`.role` - the role plugin :class:`Api` (serves the app with hypercorn on trio);
* :mod:`.app` - the Starlette app: routes, authentication, limits, errors, metrics;
* :mod:`.schemas` - request bodies (msgspec structs) and error answers;
* :mod:`.views` - how rows are shown, the list cursor;
* :mod:`.auth` - bearer tokens and the start-up checks of ``[api]``;
* :mod:`.openapi` - the OpenAPI 3.1 document;
* :mod:`.console` - the web console at ``/ui/`` (Jinja2 templates and static files in
  ``templates/`` and ``static/``), :mod:`.session` - its session cookie and CSRF tokens.

Stateless: writes become Kafka messages on the events topic (schedule messages and the
commands of :mod:`eventsched.core.domain.commands`) through the shared producer, reads come
from PostgreSQL through :mod:`eventsched.core.store.queries`. May import
``eventsched.core`` (domain, kafka, runtime, store), starlette/hypercorn and jinja2; never
confluent_kafka, saq, redis or psycopg directly, nor another role plugin.
"""

from eventsched.plugins.api.role import Api

__all__ = ["Api"]
