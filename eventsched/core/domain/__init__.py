"""Domain rules as pure functions and plain data: no I/O, no servers, no event loop.

Owns the handler contract that user code implements (:mod:`~eventsched.core.domain.handler`,
public through :mod:`eventsched`) and the job contract between the roles that enqueue an
event's job (consumer, reconciler, ``dlq replay``) and the executor that runs it
(:mod:`~eventsched.core.domain.jobcontract`). May import the standard library,
``eventsched.core.runtime.errors``, ``eventsched.core.runtime.settings`` (settings types) and
``eventsched.core.jobqueue``'s job type; nothing that talks to a server.
"""
