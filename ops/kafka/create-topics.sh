#!/usr/bin/env bash
# Creates the eventsched topics on a running broker, then describes them.
#
# Run by the `kafka-init` compose service (apache/kafka image). Idempotent:
# `--if-not-exists` makes a re-run a no-op, so `docker compose up` can run it
# every time. The broker may still be electing its controller when the
# healthcheck first passes, hence the retry loop before creating anything.
#
# Environment:
#   BOOTSTRAP_SERVERS  broker address            (default kafka:19092)
#   PARTITIONS         partitions per topic      (default 3)
#   TOPIC              main topic                (default events)
#   DLQ_TOPIC          dead-letter topic         (default events-dlq)
#   ATTEMPTS           broker probes before giving up (default 30)
#   RETRY_DELAY        seconds between probes    (default 2)
#   KAFKA_TOPICS_BIN   kafka-topics.sh to call   (default: the image's own)
set -euo pipefail

bootstrap="${BOOTSTRAP_SERVERS:-kafka:19092}"
partitions="${PARTITIONS:-3}"
topic="${TOPIC:-events}"
dlq_topic="${DLQ_TOPIC:-events-dlq}"
attempts="${ATTEMPTS:-30}"
retry_delay="${RETRY_DELAY:-2}"
kafka_topics="${KAFKA_TOPICS_BIN:-/opt/kafka/bin/kafka-topics.sh}"

if ! [[ "$partitions" =~ ^[1-9][0-9]*$ ]]; then
  echo "PARTITIONS must be a positive integer, got '${partitions}'" >&2
  exit 2
fi

for ((i = 1; i <= attempts; i++)); do
  if "$kafka_topics" --bootstrap-server "$bootstrap" --list >/dev/null 2>&1; then
    break
  fi
  if ((i == attempts)); then
    echo "broker at ${bootstrap} did not answer after ${attempts} attempts" >&2
    exit 1
  fi
  echo "waiting for broker at ${bootstrap} (${i}/${attempts})"
  sleep "$retry_delay"
done

# The DLQ keeps messages longer than the main topic: it is read by humans.
declare -A retention_ms=(
  ["$topic"]=604800000      # 7 days
  ["$dlq_topic"]=2592000000 # 30 days
)

for name in "$topic" "$dlq_topic"; do
  "$kafka_topics" --bootstrap-server "$bootstrap" --create --if-not-exists \
    --topic "$name" --partitions "$partitions" --replication-factor 1 \
    --config "retention.ms=${retention_ms[$name]}"
done

for name in "$topic" "$dlq_topic"; do
  description="$("$kafka_topics" --bootstrap-server "$bootstrap" --describe --topic "$name")"
  echo "$description"
  # --if-not-exists never grows an existing topic: say so instead of hiding it.
  current="$(sed -n 's/.*PartitionCount:[[:space:]]*\([0-9][0-9]*\).*/\1/p' <<<"$description" | head -n1)"
  if [[ -n "$current" ]] && ((current < partitions)); then
    echo "WARNING: ${name} has ${current} partitions, PARTITIONS=${partitions};" \
      "grow it with: kafka-topics.sh --bootstrap-server ${bootstrap} --alter" \
      "--topic ${name} --partitions ${partitions}" >&2
  fi
done
