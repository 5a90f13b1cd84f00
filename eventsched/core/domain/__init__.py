"""Domain rules as pure functions and plain data: no I/O, no servers, no event loop.

Modules, lowest first:

- :mod:`~eventsched.core.domain.event`: the event model (:class:`Event`), RFC 3339 times in
  UTC milliseconds, UUIDv7 ids, and the field rules both directions of the wire share;
- :mod:`~eventsched.core.domain.wire`: outgoing events: :func:`new_event`, their Kafka value
  (:func:`encode_event`), key and headers (public through :mod:`eventsched`);
- :mod:`~eventsched.core.domain.jsonparse`: JSON parsing and the payload walk of the decoder;
- :mod:`~eventsched.core.domain.decode`: incoming events: :func:`decode_event` validates a
  Kafka message value, rejections carry one of ``DECODE_REASONS``;
- :mod:`~eventsched.core.domain.commands`: commands on events (cancel, reschedule, retry):
  the schema-version 2 wire format, tombstones;
- :mod:`~eventsched.core.domain.message`: an incoming message, an event or a command
  (:func:`decode_message`, what the consumer calls);
- :mod:`~eventsched.core.domain.deadletter`: the headers and the size budget of dead-letter
  copies;
- :mod:`~eventsched.core.domain.handler`: the handler contract that user code implements
  (public through :mod:`eventsched`);
- :mod:`~eventsched.core.domain.jobcontract`: the job contract between the roles that enqueue
  an event's job (consumer, reconciler, ``dlq replay``) and the executor that runs it;
- :mod:`~eventsched.core.domain.schedules`: recurring schedules (:class:`ScheduleSpec`), their
  occurrences by the DST rules, the misfire policies and the occurrence keys;
  :mod:`~eventsched.core.domain.schedulefields`: schedules as the keys users write
  (settings, API, CLI) and the schedule leader's plan.

May import the standard library, msgspec, cronsim (cron expressions, for schedules), ``eventsched.core.runtime.errors``,
``eventsched.core.runtime.settings`` (settings types, ``redact``), ``eventsched.core.runtime.units``
(durations) and
``eventsched.core.jobqueue``'s job type; nothing that talks to a server.
"""
