"""Behaviour: producer, consumer, executor and event-handler plugins."""
