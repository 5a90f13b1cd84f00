"""Behaviour: the role plugins (the producer module, the consumer and executor packages)
and the built-in event handlers.

Imports ``eventsched.core`` (and ``eventsched`` for the public handler contract) only; no
role plugin imports another (the reconciler is part of the executor's package), and nothing
here imports confluent_kafka, saq, redis or psycopg directly: the adapters in ``core`` do.
"""
