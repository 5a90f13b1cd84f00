"""Typed settings: dynaconf is read once here, validated, and turned into frozen objects.

Nothing else in the code base touches dynaconf. Sources, later ones winning:
``config/settings.toml`` (``[default]`` then the section named by ``EVENTSCHED_ENV``),
an extra file given with ``--settings PATH``, then ``EVENTSCHED_*`` environment variables
with ``__`` for nesting (``EVENTSCHED_KAFKA__TOPIC=events``).

A bad value raises :class:`ConfigError` naming the key; the CLI turns that into one line on
stderr and exit code 2.

Here: :class:`Settings` (the root), reading the sources, converting and checking them
(:func:`load_settings`, :func:`build_settings`), and what a role requires before it starts
(``require_*``, :func:`validate_for_roles`). The sections' keys and defaults are
:mod:`eventsched.core.runtime.sections`.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec

from eventsched.core.runtime import packagedata
from eventsched.core.runtime.errors import ConfigError
from eventsched.core.runtime.redaction import (
    compile_secret_paths,
    redact,
)
from eventsched.core.runtime.schedulesettings import (
    SchedulerSettings,
    ScheduleSettings,
    check_scheduler,
    convert_schedules,
)
from eventsched.core.runtime.sections import (
    DEFAULT_CONCURRENCY,
    ApiSettings,
    ConsumerSettings,
    DevSettings,
    ExecutorSettings,
    HttpSettings,
    KafkaSettings,
    LoggingSettings,
    PluginSettings,
    PostgresSettings,
    ProducerSettings,
    PyroscopeSettings,
    ReconcilerSettings,
    RedisSettings,
    RetentionSettings,
    ShutdownSettings,
    WebhookSettings,
)
from eventsched.core.runtime.typesettings import (
    TypeSettings,
    check_types,
    convert_types,
    type_key,
)
from eventsched.core.runtime.units import ByteSize, Duration, parse_duration, parse_size

#: The roles ``--role all`` and ``eventsched dev`` run.
ROLES: tuple[str, ...] = ("producer", "consumer", "executor")
#: Roles that run only when named (``--role api``): the HTTP API needs its own tokens.
NAMED_ROLES: tuple[str, ...] = ("api",)
#: Default /metrics, /healthz, /readyz port of a process, by its first role (the api role
#: serves the API itself on ``api.port``, 8084).
DEFAULT_PORTS: Mapping[str, int] = {
    "producer": 8080,
    "consumer": 8081,
    "executor": 8082,
    "api": 8085,
}
ENVIRONMENTS: tuple[str, ...] = ("development", "test", "production")
ENV_PREFIX = "EVENTSCHED"

# Top-level environment variables with our prefix that are not settings: the environment
# switcher itself and the test suite's service addresses.
_NOT_SETTINGS = re.compile(r"^(ENV|SETTINGS|TEST_.*|SQL_DIR)$")
# Options we pass to Dynaconf() come back from as_dict(); they are not settings either.
_DYNACONF_OPTIONS = frozenset(
    {
        "SETTINGS_FILES",
        "ENVIRONMENTS",
        "ENVVAR_PREFIX",
        "ENV_SWITCHER",
        "MERGE_ENABLED",
        "LOAD_DOTENV",
    }
)


def _dec_hook(tp: type, obj: Any) -> Any:
    if tp is Duration:
        return parse_duration(obj)
    if tp is ByteSize:
        return parse_size(obj)
    raise NotImplementedError(f"no converter for {tp!r}")


class Settings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Every section (:mod:`eventsched.core.runtime.sections`), as :func:`load_settings`
    returns them; immutable, and a misspelt key is an error, like each section."""

    env: str = "development"
    kafka: KafkaSettings = KafkaSettings()
    postgres: PostgresSettings = PostgresSettings()
    redis: RedisSettings = RedisSettings()
    http: HttpSettings = HttpSettings()
    logging: LoggingSettings = LoggingSettings()
    shutdown: ShutdownSettings = ShutdownSettings()
    producer: ProducerSettings = ProducerSettings()
    consumer: ConsumerSettings = ConsumerSettings()
    executor: ExecutorSettings = ExecutorSettings()
    reconciler: ReconcilerSettings = ReconcilerSettings()
    scheduler: SchedulerSettings = SchedulerSettings()
    retention: RetentionSettings = RetentionSettings()
    # Schedule name -> its definition (eventsched.core.runtime.schedulesettings).
    schedules: dict[str, ScheduleSettings] = {}
    api: ApiSettings = ApiSettings()
    plugins: PluginSettings = PluginSettings()
    # Event type -> "module:attr"; the key "default" applies to types with no entry.
    handlers: dict[str, str] = {}
    # Event type -> URL for the webhook handler; the key "default" applies to types with no entry.
    webhooks: dict[str, str] = {}
    # Event type (or "default") -> its policy; see eventsched.core.runtime.typesettings.
    types: dict[str, TypeSettings] = {}
    pyroscope: PyroscopeSettings = PyroscopeSettings()
    dev: DevSettings = DevSettings()

    @property
    def executor_concurrency(self) -> int:
        return self.executor.concurrency or DEFAULT_CONCURRENCY


def default_settings_file(environ: Mapping[str, str] | None = None) -> Path:
    """The base settings file: ``$EVENTSCHED_SETTINGS``, else the one shipped with the
    package (:func:`eventsched.core.runtime.packagedata.settings_file`)."""
    env = os.environ if environ is None else environ
    if env.get(f"{ENV_PREFIX}_SETTINGS"):
        return Path(env[f"{ENV_PREFIX}_SETTINGS"])
    return packagedata.settings_file()


def load_settings(
    extra_file: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    settings_file: str | os.PathLike[str] | None = None,
) -> Settings:
    """Read every source once and return validated, frozen settings.

    ``environ`` replaces ``os.environ`` (tests); ``settings_file`` replaces the default
    ``config/settings.toml``.
    """
    from dynaconf import Dynaconf  # local import: only the composition root reads settings

    env = dict(os.environ if environ is None else environ)
    env_name = env.get(f"{ENV_PREFIX}_ENV", "development").strip().lower()
    if env_name not in ENVIRONMENTS:
        raise ConfigError(
            "env", f"unknown environment {env_name!r} (expected one of {', '.join(ENVIRONMENTS)})"
        )
    files = [Path(settings_file) if settings_file else default_settings_file(env)]
    if extra_file is not None:
        extra = Path(extra_file)
        if not extra.is_file():
            raise ConfigError("--settings", f"file not found: {extra}")
        files.append(extra)
    for f in files:
        if not f.is_file():
            raise ConfigError("settings file", f"not found: {f}")
    raw = _read_dynaconf(Dynaconf, files, env, env_name)
    return build_settings(raw, env_name)


def _read_dynaconf(
    dynaconf_cls: Any, files: list[Path], env: dict[str, str], env_name: str
) -> dict[str, Any]:
    # Dynaconf reads os.environ itself; swap in the requested mapping for the duration.
    saved = dict(os.environ)
    try:
        os.environ.clear()
        os.environ.update(env)
        os.environ[f"{ENV_PREFIX}_ENV"] = env_name
        try:
            dyn = dynaconf_cls(
                settings_files=[str(f) for f in files],
                environments=True,
                envvar_prefix=ENV_PREFIX,
                env_switcher=f"{ENV_PREFIX}_ENV",
                merge_enabled=True,
                load_dotenv=False,
            )
            data: dict[str, Any] = dyn.as_dict()
        except Exception as err:  # dynaconf raises many kinds (toml syntax, io, ...)
            raise ConfigError("settings file", f"cannot be read: {err}") from err
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return data


def build_settings(raw: Mapping[str, Any], env_name: str = "development") -> Settings:
    """Validate a raw mapping (as dynaconf returns it) into :class:`Settings`."""
    data: dict[str, Any] = {}
    for key, value in raw.items():
        name = str(key).lower()
        if _NOT_SETTINGS.match(name.upper()) or name.upper() in _DYNACONF_OPTIONS:
            continue
        if name not in Settings.__struct_fields__:
            raise ConfigError(
                name, f"unknown setting (from EVENTSCHED_{name.upper()} or a settings file)"
            )
        if name == "types":  # typesettings.convert_types minds the case of its keys
            data[name] = value
        else:
            data[name] = _handler_keys(value) if name in _TYPE_KEYED else _lower_keys(value)
    data["env"] = env_name
    schedules = convert_schedules(data.pop("schedules", {}))
    types = convert_types(data.pop("types", {}), _dec_hook)
    try:
        settings = msgspec.convert(data, Settings, dec_hook=_dec_hook)
    except msgspec.ValidationError as err:
        raise _config_error_from(err) from None
    settings = msgspec.structs.replace(settings, schedules=schedules, types=types)
    _check(settings)
    return settings


# Sections whose keys are event types (case-sensitive), not setting names.
_TYPE_KEYED = frozenset({"handlers", "webhooks", "schedules"})


def _handler_keys(value: Any) -> Any:
    """Event types are case-sensitive in files; an env var (EVENTSCHED_HANDLERS__DEFAULT) can
    only spell upper case, so an all-upper-case key is taken to mean its lower-case type."""
    if isinstance(value, Mapping):
        return {(str(k).lower() if str(k).isupper() else str(k)): v for k, v in value.items()}
    return value


def _lower_keys(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k).lower(): _lower_keys(v) for k, v in value.items()}
    return value


_AT = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)


def _config_error_from(err: msgspec.ValidationError) -> ConfigError:
    match = _AT.match(str(err))
    assert match is not None  # the pattern accepts any text
    message, path = match.group("msg"), match.group("path") or ""
    unknown = re.match(r"Object contains unknown field `([^`]+)`", message)
    key = path.lstrip(".").replace("[", ".").replace("]", "")
    if unknown:
        key = f"{key}.{unknown.group(1)}" if key else unknown.group(1)
        return ConfigError(key, "unknown setting")
    return ConfigError(key or "settings", message[:1].lower() + message[1:])


def _check(s: Settings) -> None:
    """Cross-field and format checks msgspec types cannot express."""
    _positive("kafka.partitions", s.kafka.partitions)
    _positive("kafka.replication_factor", s.kafka.replication_factor)
    for key, topic in (("kafka.topic", s.kafka.topic), ("kafka.dlq_topic", s.kafka.dlq_topic)):
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,249}", topic):
            raise ConfigError(key, f"invalid topic name {topic!r}")
    if s.kafka.topic == s.kafka.dlq_topic:
        raise ConfigError("kafka.dlq_topic", "must differ from kafka.topic")
    _positive("postgres.pool_min", s.postgres.pool_min)
    if s.postgres.pool_max < s.postgres.pool_min:
        raise ConfigError("postgres.pool_max", "must be >= postgres.pool_min")
    if not 0 <= s.http.port <= 65535:
        raise ConfigError("http.port", f"must be between 0 and 65535, got {s.http.port}")
    if s.logging.flush_interval > 10:
        raise ConfigError("logging.flush_interval", "must be at most 10s (0: every line at once)")
    if s.producer.interval <= 0:
        raise ConfigError("producer.interval", "must be positive")
    if s.producer.rate < 0:
        raise ConfigError("producer.rate", "must not be negative")
    _positive("producer.batch_size", s.producer.batch_size)
    _positive("producer.max_in_flight", s.producer.max_in_flight)
    if not s.producer.event_types:
        raise ConfigError("producer.event_types", "must not be empty")
    if s.producer.delay_max < s.producer.delay_min:
        raise ConfigError("producer.delay_max", "must be >= producer.delay_min")
    _positive("consumer.max_batch", s.consumer.max_batch)
    _positive("consumer.max_retries", s.consumer.max_retries)
    _positive("consumer.max_message_bytes", s.consumer.max_message_bytes)
    _positive("consumer.max_payload_depth", s.consumer.max_payload_depth)
    if s.consumer.backoff_initial <= 0:
        raise ConfigError("consumer.backoff_initial", "must be positive")
    if s.consumer.backoff_max < s.consumer.backoff_initial:
        raise ConfigError("consumer.backoff_max", "must be >= consumer.backoff_initial")
    if s.consumer.lag_interval <= 0:
        raise ConfigError("consumer.lag_interval", "must be positive")
    if s.consumer.unassigned_grace <= 0:
        raise ConfigError("consumer.unassigned_grace", "must be positive")
    if s.consumer.rejoin_after < 0:
        raise ConfigError("consumer.rejoin_after", "must be 0 (never) or positive")
    if s.executor.concurrency < 0:
        raise ConfigError(
            "executor.concurrency", f"must not be negative (0 means {DEFAULT_CONCURRENCY})"
        )
    _positive("executor.max_retries", s.executor.max_retries)
    if s.executor.retry_backoff.factor < 1:
        raise ConfigError("executor.retry_backoff.factor", "must be >= 1")
    if not 0 <= s.executor.retry_backoff.jitter <= 1:
        raise ConfigError("executor.retry_backoff.jitter", "must be between 0 and 1")
    if not 0 <= s.executor.simulate.error_rate <= 1:
        raise ConfigError("executor.simulate.error_rate", "must be between 0 and 1")
    if s.executor.job_timeout <= 0:
        raise ConfigError("executor.job_timeout", "must be positive")
    if s.executor.webhook.timeout <= 0:
        raise ConfigError("executor.webhook.timeout", "must be positive")
    _check_webhook(s.executor.webhook)
    if 0 < s.executor.inflight_bytes < s.consumer.max_message_bytes:
        raise ConfigError(
            "executor.inflight_bytes",
            f"must be 0 (no bound) or at least consumer.max_message_bytes"
            f" ({s.consumer.max_message_bytes}): a job counts that much until its claim",
        )
    if s.reconciler.interval <= 0:
        raise ConfigError("reconciler.interval", "must be positive")
    if s.reconciler.gauge_interval <= 0:
        raise ConfigError("reconciler.gauge_interval", "must be positive")
    if s.reconciler.stale_after <= 0:
        raise ConfigError("reconciler.stale_after", "must be positive")
    _positive("reconciler.batch", s.reconciler.batch)
    _check_shards(s)
    check_scheduler(s.scheduler, s.consumer.horizon)
    if s.shutdown.grace <= 0:
        raise ConfigError("shutdown.grace", "must be positive")
    if not 0 <= s.api.port <= 65535:
        raise ConfigError("api.port", f"must be between 0 and 65535, got {s.api.port}")
    if s.api.produce_timeout <= 0:
        raise ConfigError("api.produce_timeout", "must be positive")
    for type_, target in s.handlers.items():
        if ":" not in target:
            raise ConfigError(f"handlers.{type_}", f"expected 'module:attr', got {target!r}")
    check_types(s.types)
    for type_, url in s.webhooks.items():
        if not url.startswith(("http://", "https://")):
            raise ConfigError(
                f"webhooks.{type_}", f"expected an http:// or https:// URL, got {url!r}"
            )


def _check_shards(s: Settings) -> None:
    """``redis.shards`` and ``executor.shards``, and type limits that every shard can share."""
    if s.redis.shards and s.redis.url:
        raise ConfigError(
            "redis.shards",
            "set either redis.url (one shard) or redis.shards, not both (redis.url is set too)",
        )
    for i, url in enumerate(s.redis.shards):
        _check_redis_url(f"redis.shards[{i}]", url)
        if url in s.redis.shards[:i]:
            raise ConfigError(f"redis.shards[{i}]", "the same URL as an earlier shard")
    count = len(s.redis.shards) or 1
    for i, index in enumerate(s.executor.shards):
        if not 0 <= index < count:
            raise ConfigError(
                "executor.shards",
                f"{index} is not a shard: positions in redis.shards run from 0 to {count - 1}",
            )
        if index in s.executor.shards[:i]:
            raise ConfigError("executor.shards", f"shard {index} is named twice")
    if count == 1:
        return
    # A limit is divided among the shards (eventsched.core.jobqueue.shards.lane_share): each
    # needs a part of at least one.
    for type_, t in s.types.items():
        if t.concurrency and t.concurrency < count:
            raise ConfigError(
                type_key(type_, "concurrency"),
                f"must be at least the number of shards ({count}): each shard gets a share",
            )
        if t.rate:
            burst = t.burst or max(1, math.floor(t.rate))
            if burst < count:
                raise ConfigError(
                    type_key(type_, "burst"),
                    f"is {burst}{'' if t.burst else ' (by default: the rate)'}; it must be at "
                    f"least the number of shards ({count}): each shard's bucket gets a share",
                )


def _check_redis_url(key: str, url: str) -> None:
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(key, "must start with redis://, rediss:// or unix://")


def _check_webhook(w: WebhookSettings) -> None:
    from eventsched.core.runtime.netguard import parse_allowed_hosts

    try:
        parse_allowed_hosts(w.allowed_hosts)
    except ValueError as err:
        raise ConfigError("executor.webhook.allowed_hosts", str(err)) from None
    if w.allow_payload_url and not w.allowed_hosts:
        raise ConfigError(
            "executor.webhook.allowed_hosts",
            "required when allow_payload_url is true (host names, *.domain, * or networks)",
        )
    try:
        compile_secret_paths(w.secret_path_patterns)
    except re.error as err:
        raise ConfigError("executor.webhook.secret_path_patterns", f"bad pattern: {err}") from None


def _positive(key: str, value: int) -> None:
    if value <= 0:
        raise ConfigError(key, f"must be positive, got {value}")


def require_postgres(s: Settings) -> str:
    """The PostgreSQL DSN, validated; raises ConfigError naming the key when unusable."""
    return _validate_dsn(s.postgres.dsn)


def _validate_dsn(dsn: str) -> str:
    if not dsn:
        raise ConfigError("postgres.dsn", "required (set EVENTSCHED_POSTGRES__DSN)")
    if not dsn.startswith(("postgresql://", "postgres://")) and "=" not in dsn:
        raise ConfigError("postgres.dsn", "not a PostgreSQL URL or key=value conninfo")
    if "://" in dsn and _ambiguous_userinfo(dsn):
        # libpq ends the user info at the first "@" (or "/"): the rest of the password would
        # become the host name, and then appear in connection errors.
        raise ConfigError(
            "postgres.dsn",
            "the user name or password contains an unencoded '@' or '/':"
            " percent-encode them (%40, %2F)",
        )
    from psycopg.conninfo import conninfo_to_dict  # only where a DSN is checked

    try:
        conninfo_to_dict(dsn)
        if "://" in dsn:
            urlsplit(dsn).port  # noqa: B018 -- raises ValueError for an out-of-range port
    except Exception as err:  # psycopg raises ProgrammingError for bad conninfo
        raise ConfigError("postgres.dsn", f"cannot be parsed: {redact(str(err))}") from None
    return dsn


def _ambiguous_userinfo(url: str) -> bool:
    """More than one "@" before the query, or a "/" before the last one."""
    rest = url.split("://", 1)[1].split("?", 1)[0]
    if "@" not in rest:
        return False
    userinfo = rest[: rest.rindex("@")]
    return "@" in userinfo or "/" in userinfo


def require_redis(s: Settings) -> tuple[str, ...]:
    """The URLs of the job queue's shards: ``redis.shards``, else ``redis.url`` alone."""
    if s.redis.shards:
        return s.redis.shards
    url = s.redis.url
    if not url:
        raise ConfigError(
            "redis.url", "required (set EVENTSCHED_REDIS__URL, or redis.shards for several)"
        )
    _check_redis_url("redis.url", url)
    return (url,)


def require_kafka(s: Settings) -> str:
    servers = s.kafka.bootstrap_servers
    if not servers:
        raise ConfigError(
            "kafka.bootstrap_servers", "required (set EVENTSCHED_KAFKA__BOOTSTRAP_SERVERS)"
        )
    for part in servers.split(","):
        if not re.fullmatch(r"[\w.\-\[\]:]+:\d{1,5}", part.strip()):
            raise ConfigError(
                "kafka.bootstrap_servers", f"expected host:port[,host:port], got {part.strip()!r}"
            )
    return servers


def validate_for_roles(s: Settings, roles: set[str]) -> None:
    """Fail fast on the settings the given roles need before anything starts."""
    require_kafka(s)
    if roles & {"consumer", "executor"}:
        require_postgres(s)
        require_redis(s)
    if "api" in roles:
        require_postgres(s)
