#!/usr/bin/env bash
# Print the settings that point eventsched commands on this host at the compose stack
# (compose.yml), from the same .env that compose reads:
#
#   eval "$(ops/compose-env.sh)"         # ./.env; or: ops/compose-env.sh path/to/.env
#   eventsched status
#   eventsched send --type user.created --in 30s
#   eventsched dlq list
#   curl -H "$AUTH" "$API/v1/stats"
#
# Like compose, a variable set in the shell wins over the file, and an unset one falls
# back to compose.yml's default. .env is read as KEY=value lines, never executed.
set -euo pipefail

env_file=${1:-.env}
if [[ ! -f $env_file ]]; then
    echo "compose-env.sh: $env_file not found (cp .env.example .env)" >&2
    exit 2
fi

declare -A file_values=()
while IFS= read -r line || [[ -n $line ]]; do
    [[ $line =~ ^[[:space:]]*(#|$) ]] && continue
    [[ $line == *=* ]] || continue
    key=${line%%=*}
    key=${key//[[:space:]]/}
    value=${line#*=}
    # Compose drops one pair of surrounding quotes.
    if [[ $value =~ ^\"(.*)\"$ || $value =~ ^\'(.*)\'$ ]]; then
        value=${BASH_REMATCH[1]}
    fi
    file_values[$key]=$value
done <"$env_file"

# setting NAME DEFAULT: the shell's value, else the file's, else compose.yml's default.
setting() {
    local from_shell=${!1:-}
    local from_file=${file_values[$1]:-}
    printf '%s' "${from_shell:-${from_file:-$2}}"
}

# The first port of a range (8084-8087 -> 8084).
first_port() {
    printf '%s' "${1%%-*}"
}

postgres_user=$(setting POSTGRES_USER eventsched)
postgres_password=$(setting POSTGRES_PASSWORD "")
postgres_db=$(setting POSTGRES_DB eventsched)
if [[ -z $postgres_password ]]; then
    echo "compose-env.sh: POSTGRES_PASSWORD is not set in $env_file" >&2
    exit 2
fi

# Kafka's host listener advertises localhost:KAFKA_PORT (compose.yml): use that name.
kafka="localhost:$(setting KAFKA_PORT 9092)"
dsn="postgresql://${postgres_user}:${postgres_password}@127.0.0.1:$(setting POSTGRES_PORT 5432)/${postgres_db}"
redis="redis://127.0.0.1:$(setting REDIS_PORT 6379)/0"
api="http://127.0.0.1:$(first_port "$(setting API_PORTS 8084-8087)")"

printf 'export EVENTSCHED_KAFKA__BOOTSTRAP_SERVERS=%q\n' "$kafka"
printf 'export EVENTSCHED_KAFKA__PARTITIONS=%q\n' "$(setting KAFKA_PARTITIONS 3)"
printf 'export EVENTSCHED_POSTGRES__DSN=%q\n' "$dsn"
printf 'export EVENTSCHED_REDIS__URL=%q\n' "$redis"
printf 'API=%q\n' "$api"
printf 'AUTH=%q\n' "Authorization: Bearer $(setting API_TOKEN "")"
