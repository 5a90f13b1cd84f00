"""What the consumer watches about its partitions: the lag gauge
(``eventsched_consumer_lag_messages{partition}``), the no-partitions stall (``unassigned``)
and, with ``consumer.rejoin_after``, the way out of a stall the broker caused (rejoin).

Both are trio tasks of the role; their broker queries run on worker threads of their own
admin clients (one capacity limiter each).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Final

import trio

from eventsched.core.kafka import (
    Admin,
    ClientKind,
    EmptyPartitions,
    KafkaConsumer,
    TopicPartitionKey,
    config_from_settings,
)
from eventsched.core.runtime import metrics
from eventsched.core.runtime.contracts import RoleContext
from eventsched.core.runtime.errors import DependencyError

#: Each further rejoin of one stall waits twice as long as the one before, up to this many
#: times ``consumer.rejoin_after``.
REJOIN_BACKOFF_CAP: Final = 8


@dataclass
class _Spell:
    """A stall without partitions, carried from one Kafka consumer to the next when the role
    rejoins: the judge keeps counting from when it began, and /readyz keeps saying so."""

    since: float  # monotonic: no partitions since then
    unmoved: dict[int, tuple[int, float]]


class PartitionWatch:
    """:meth:`refresh_lag` and :meth:`watch_assignment`, run until cancelled, one pair per
    Kafka consumer of the role; :meth:`reset_group` between two consumers."""

    def __init__(
        self,
        ctx: RoleContext,
        *,
        committed: dict[TopicPartitionKey, int],
        fetched_end: dict[TopicPartitionKey, int],
        log: Any,
    ) -> None:
        self.ctx = ctx
        self.settings = ctx.settings
        # Per partition: the next offset this consumer commits, and the end of what it
        # fetched (both kept up to date by the role).
        self._committed = committed
        self._fetched_end = fetched_end
        self._log = log
        # The rejoin state, kept across the role's consumers: when the current stall began
        # to count for a rejoin, how many rejoins it has had, the spell to carry over.
        self._stalled_at: float | None = None
        self._rejoins = 0
        self._carried: _Spell | None = None

    async def refresh_lag(self, consumer: KafkaConsumer) -> None:
        """Keep ``eventsched_consumer_lag_messages{partition}`` current: end of the partition minus
        the next offset this consumer will commit.

        Deliberately not ``KafkaConsumer.lag()``: that asks the broker from the consumer
        thread, one partition at a time, each request queued behind the long-polling fetch
        (~0.5 s each, measured), and the thread neither fetches nor commits meanwhile. Here
        a separate admin client asks for all partitions in one request, on a worker thread.
        The end is the larger of that answer and the end of what we fetched (Tansu answers
        ListOffsets(latest) with the start of the last record batch).
        """
        limiter = trio.CapacityLimiter(1)
        admin = Admin(
            config_from_settings(
                self.settings,
                ClientKind.ADMIN,
                # The runtime's own probe reports the broker.
                own={"error_cb": lambda err: None},
            )
        )
        shown: set[str] = set()
        while True:
            await trio.sleep(self.settings.consumer.lag_interval)
            assigned = sorted(consumer.assignment())
            try:
                ends = await trio.to_thread.run_sync(
                    admin.latest_offsets, assigned, limiter=limiter, abandon_on_cancel=True
                )
            except DependencyError as err:
                self._log.debug("lag_unavailable", error=str(err))
                continue
            current: dict[str, int] = {}
            for key in assigned:
                position = self._committed.get(key)
                if position is not None:
                    end = max(ends.get(key, 0), self._fetched_end.get(key, 0))
                    current[str(key[1])] = max(0, end - position)
            for partition, value in current.items():
                metrics.CONSUMER_LAG_MESSAGES.labels(partition).set(value)
            for gone in shown - current.keys():
                metrics.CONSUMER_LAG_MESSAGES.remove(gone)
            shown = set(current)

    # -- no partitions -----------------------------------------------------------------

    async def watch_assignment(
        self, consumer: KafkaConsumer, rejoin: trio.Event | None = None
    ) -> None:
        """Report the role stalled (``unassigned``) while it has had no partitions for
        ``consumer.unassigned_grace`` and records wait that no member of the group commits;
        clear it as soon as partitions arrive.

        Having no partitions is normal for a spare member (more members than partitions),
        so it is not a stall by itself. Records wait on a partition when the group's
        committed offset there is below the end (see
        :func:`~eventsched.core.kafka.admin.waiting_work`); nobody works on them when they
        have waited behind the same committed offset for the grace too.
        So a spare beside a member that keeps committing stays ready even while records
        come in (some brokers, Tansu among them, list no member assignments in
        DescribeGroups: the committed offsets are the sign of a working member that every
        broker gives).

        With ``consumer.rejoin_after`` (and a ``rejoin`` event), a stall that lasts that
        long more sets ``rejoin`` and returns, the stall still reported: the role then closes
        this consumer, resets the group (:meth:`reset_group`) and opens a new one, whose
        watch goes on counting the same spell (see :data:`REJOIN_BACKOFF_CAP`).

        Runs in trio; the broker queries run on a worker thread of their own limiter.
        """
        s, k = self.settings.consumer, self.settings.kafka
        role = self.ctx.role
        limiter = trio.CapacityLimiter(1)
        client = config_from_settings(
            self.settings,
            ClientKind.ADMIN,
            # The runtime's own probe reports the broker.
            own={"error_cb": lambda err: None},
        )
        # One admin client for every check, made at the first (the worker thread holds it
        # while it asks); a consumer that always has partitions never connects one.
        admin: Admin | None = None
        spell: float | None = None
        # When the spell began for the judge: ``spell``, or the start of a spell carried
        # over from the role's previous consumer.
        began = 0.0
        # Per partition where records wait, during this spell without partitions: the
        # group's committed offset and the monotonic instant records were first seen
        # waiting behind that same offset.
        unmoved: dict[int, tuple[int, float]] = {}
        empty = EmptyPartitions()
        carried, self._carried = self._carried, None
        rejoining = False
        try:
            while True:
                # Taken before looking, so that a change while we look ends the wait.
                changed = consumer.assignment_changed()
                since = consumer.unassigned_since()
                if since is None:
                    self.ctx.health.unstall(role, "unassigned")
                    spell, carried = None, None
                    self._stalled_at, self._rejoins = None, 0
                elif since != spell:
                    # A new spell: look after one interval (most rebalances end by then).
                    spell, began, unmoved = since, since, {}
                    if carried is not None:
                        began, unmoved, carried = carried.since, carried.unmoved, None
                elif self._rejoin_due(rejoin):
                    assert rejoin is not None
                    self._rejoins += 1
                    self._stalled_at = time.monotonic()
                    self._carried = _Spell(began, unmoved)
                    rejoining = True
                    self._log.warning(
                        "consumer_rejoining",
                        unassigned_s=round(time.monotonic() - began, 1),
                        rejoin=self._rejoins,
                    )
                    rejoin.set()
                    return
                else:
                    if admin is None:
                        admin = Admin(client)
                    try:
                        waiting = await trio.to_thread.run_sync(
                            admin.waiting_work,
                            k.consumer_group,
                            k.topic,
                            {p: end for (t, p), end in self._fetched_end.items() if t == k.topic},
                            empty,
                            5.0,
                            limiter=limiter,
                            abandon_on_cancel=True,
                        )
                    except DependencyError as err:
                        # Keep the last verdict; the runtime's broker check reports the broker.
                        self._log.debug("unassigned_check_failed", error=str(err))
                    else:
                        self._judge_unassigned(consumer, since, began, waiting, unmoved)
                with trio.move_on_after(s.lag_interval):
                    await changed.wait()
        finally:
            if not rejoining:
                # The stall goes with this consumer, except across a rejoin: the role has
                # no partitions still, and the next consumer's watch takes it over.
                self.ctx.health.unstall(role, "unassigned")

    def _rejoin_due(self, rejoin: trio.Event | None) -> bool:
        """Whether the current stall has lasted long enough for (another) rejoin."""
        after = float(self.settings.consumer.rejoin_after)
        if rejoin is None or after <= 0 or self._stalled_at is None:
            return False
        wait = after * float(min(2**self._rejoins, REJOIN_BACKOFF_CAP))
        return time.monotonic() - self._stalled_at >= wait

    async def reset_group(self) -> None:
        """Between two consumers of a rejoin: have the broker forget the group, its committed
        offsets committed back (:func:`~eventsched.core.kafka.admin.reset_group`). A failure
        is logged: the new consumer joins anyway."""
        k = self.settings.kafka
        admin = Admin(
            config_from_settings(self.settings, ClientKind.ADMIN, own={"error_cb": lambda e: None})
        )
        try:
            restored = await trio.to_thread.run_sync(
                admin.reset_group,
                k.consumer_group,
                10.0,
                limiter=trio.CapacityLimiter(1),
                abandon_on_cancel=True,
            )
        except DependencyError as err:
            self._log.warning("consumer_group_reset_failed", error=str(err))
            return
        if restored is None:
            self._log.info("consumer_group_kept", group=k.consumer_group)
        else:
            self._log.warning(
                "consumer_group_reset",
                group=k.consumer_group,
                offsets={f"{t}/{p}": o for (t, p), o in sorted(restored.items())},
            )

    def _judge_unassigned(
        self,
        consumer: KafkaConsumer,
        since: float,
        began: float,
        waiting: dict[int, tuple[int, bool]],
        unmoved: dict[int, tuple[int, float]],
    ) -> None:
        """Stall or clear the role from one look at the group (see watch_assignment):
        ``since`` is this consumer's, ``began`` the spell's (earlier across a rejoin)."""
        role, grace = self.ctx.role, self.settings.consumer.unassigned_grace
        if consumer.unassigned_since() != since:
            return  # partitions came (or came and went) while we looked
        now = time.monotonic()
        stuck: list[int] = []
        for partition, (committed, has_work) in waiting.items():
            seen = unmoved.get(partition)
            if not has_work:
                unmoved.pop(partition, None)
            elif seen is None or seen[0] != committed:
                unmoved[partition] = (committed, now)
            elif now - seen[1] >= grace:
                stuck.append(partition)
        if stuck and now - began >= grace:
            if (role, "unassigned") not in self.ctx.health.stalls:
                self._log.warning(
                    "no_partitions_while_records_wait",
                    waiting_partitions=sorted(stuck),
                    unassigned_s=round(now - began, 1),
                )
            self.ctx.health.stall(role, "unassigned", "no partitions assigned", began)
            if self._stalled_at is None:
                self._stalled_at = now
        else:
            self.ctx.health.unstall(role, "unassigned")
            self._stalled_at, self._rejoins = None, 0
