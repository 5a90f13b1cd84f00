"""The operator tools behind the CLI: one-shot commands and the Docker-free dev stack.

* :mod:`.commands` - ``status``, ``send``, ``dlq list`` and ``dlq replay`` (blocking; each
  opens the clients it needs and closes them);
* :mod:`.devstack` - embedded PostgreSQL, Redis and the Tansu broker as child processes;
* :mod:`.devrun` - ``eventsched dev``: the dev stack plus every role in one runtime;
* :mod:`.summary` - the dev run's live summary line.

May import every part of ``eventsched.core``; never ``eventsched.plugins`` (the roles are
loaded by name through the runtime, like in production).
"""
