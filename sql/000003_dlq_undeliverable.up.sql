-- eventsched schema, version 3: dead-letter copies the broker would not take.
--
-- The consumer sends every message it cannot turn into an event to the DLQ topic,
-- cut to a size budget if need be (see the README, "Dead letters"). A copy can still
-- be refused for what it is (a producer or broker size limit below the smallest copy,
-- a record the broker calls invalid): sending it again cannot help, and waiting for it
-- would stop the partition. The consumer then keeps the copy here, in the same step
-- in which it would have waited for the DLQ's acknowledgement, so the message's offset
-- is committed only once the copy is in the DLQ topic or in this table.
-- Same rules as 000001: one implicit transaction, no CONCURRENTLY.
--
-- Rows are few (one per such message) and bounded in size (the smallest copy: key at
-- most 1 KiB, original headers at most 16 KiB, value at most the rest of 64 KiB).
-- Nothing deletes them: an operator reads, re-publishes or deletes them by hand.

CREATE TABLE dlq_undeliverable (
    id               bigint      GENERATED ALWAYS AS IDENTITY,
    source_topic     text        NOT NULL,
    source_partition integer     NOT NULL,
    source_offset    bigint      NOT NULL,
    reason           text        NOT NULL,
    error            text        NOT NULL,
    delivery_error   text        NOT NULL,
    key              bytea,
    value            bytea,
    header_names     text[]      NOT NULL,
    header_values    bytea[]     NOT NULL,
    consumer_id      text        NOT NULL,
    recorded_at      timestamptz NOT NULL DEFAULT now(),

    CONSTRAINT dlq_undeliverable_pkey PRIMARY KEY (id),
    -- A message redelivered after a crash is kept once: ON CONFLICT DO NOTHING.
    CONSTRAINT dlq_undeliverable_source_key
        UNIQUE (source_topic, source_partition, source_offset),
    CONSTRAINT dlq_undeliverable_headers_check
        CHECK (cardinality(header_names) = cardinality(header_values))
);

COMMENT ON TABLE dlq_undeliverable IS
    'Dead-letter copies of bad messages that the DLQ topic refused for a message-specific reason (kept here instead, so the partition moves on).';
COMMENT ON COLUMN dlq_undeliverable.source_topic IS 'Topic of the bad message (the source-topic header).';
COMMENT ON COLUMN dlq_undeliverable.source_partition IS 'Partition of the bad message.';
COMMENT ON COLUMN dlq_undeliverable.source_offset IS 'Offset of the bad message within its partition.';
COMMENT ON COLUMN dlq_undeliverable.reason IS 'Why the message is not an event (the dlq-reason header).';
COMMENT ON COLUMN dlq_undeliverable.error IS 'What exactly is wrong with it (the dlq-error header, at most 1 KiB).';
COMMENT ON COLUMN dlq_undeliverable.delivery_error IS 'Why the DLQ topic refused the copy (librdkafka: CODE: text).';
COMMENT ON COLUMN dlq_undeliverable.key IS 'Key of the copy (cut to 1 KiB if longer: see the dlq-truncated-key header).';
COMMENT ON COLUMN dlq_undeliverable.value IS 'Value of the copy (cut if longer: see the dlq-truncated-value header).';
COMMENT ON COLUMN dlq_undeliverable.header_names IS 'Header names of the copy, in order: the kept original ones, then the dlq-* and source-* ones.';
COMMENT ON COLUMN dlq_undeliverable.header_values IS 'Header values, same order as header_names (NULL for a null header).';
COMMENT ON COLUMN dlq_undeliverable.consumer_id IS 'The consumer that rejected the message (host:pid).';
COMMENT ON COLUMN dlq_undeliverable.recorded_at IS 'When the copy was kept here.';

-- No other index: the table is written once per refused copy and read by hand.
