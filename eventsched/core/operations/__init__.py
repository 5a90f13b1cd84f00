"""The operator tools behind the CLI: one-shot commands and the Docker-free dev stack.

One-shot commands (blocking; each opens the clients it needs and closes them):

* :mod:`.send` - ``send``: build an event, check it as the consumer would, publish it;
* :mod:`.status` - ``status``: events by status, queue sizes, consumer lag, DLQ size;
* :mod:`.dlq` - ``dlq list`` and ``dlq replay`` (re-runs through ``core.store.replay``);
* :mod:`.events` - ``events show``, ``list``, ``cancel``, ``reschedule``, ``retry`` (reads
  through ``core.store.queries`` and ``.selection``, commands through ``eventsched.client``);
  :mod:`.eventviews` prints them;
* :mod:`.oneshot` - what they share: the time limit per request, blocking Kafka clients.

The dev stack:

* :mod:`.devstack` - :class:`~.devstack.DevStack`: embedded PostgreSQL, Redis and the Tansu
  broker as child processes under one data dir;
* :mod:`.devservers` - ``ManagedServer``, one child server, and its process/port helpers;
* :mod:`.devpostgres` - the PostgreSQL server; :mod:`.devbrokers` - Redis and Tansu;
* :mod:`.devrun` - ``eventsched dev``: the dev stack plus every role in one runtime;
* :mod:`.summary` - the dev run's live summary line.

May import every part of ``eventsched.core`` and ``eventsched.client`` (the commands of
``events`` are sent with its ``Client``); never ``eventsched.plugins`` (the roles are
loaded by name through the runtime, like in production). The events' SQL, the replay's
re-runs included, is in ``eventsched.core.store``; the only statements here are the dev
PostgreSQL server's own set-up (creating its database).
"""
