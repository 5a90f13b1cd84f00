"""Schema migrations without Docker, interchangeable with golang-migrate.

The compose stack applies ``sql/NNNNNN_name.{up,down}.sql`` with the
``migrate/migrate`` image; ``eventsched migrate`` applies the same files through
this module. Both keep the same bookkeeping, so either tool can pick up where the
other stopped:

* table ``schema_migrations(version bigint NOT NULL PRIMARY KEY, dirty boolean
  NOT NULL)`` in ``current_schema()``, holding at most one row: the current
  version. No row means no version; a version of -1 with ``dirty`` means a failed
  ``down`` of the first migration (golang-migrate issue #330).
* a migration of version V is run as: set (target, dirty=true), execute the whole
  file as one multi-statement query, set (target, dirty=false); the target is V
  going up and the previous version going down. A failure leaves dirty=true and
  every later ``up``/``down`` refuses until ``force`` says what the schema is.
* runs are serialised by a session-level ``pg_advisory_lock`` whose key is
  computed exactly like golang-migrate's postgres driver computes its own, so our
  tool and theirs also exclude each other.

The functions are synchronous (psycopg 3, autocommit): this is a CLI command, not
part of the trio runtime. Library errors come out as :class:`MigrationError` or
``DependencyError("postgres", ...)``; messages never contain the DSN's password.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote

import psycopg
import structlog
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from eventsched.core.runtime import packagedata
from eventsched.core.runtime.errors import DependencyError, MigrationError

__all__ = [
    "MIGRATIONS_TABLE",
    "Migration",
    "advisory_lock_id",
    "default_sql_dir",
    "down",
    "force",
    "list_migrations",
    "up",
    "version",
]

log = structlog.get_logger(__name__)

MIGRATIONS_TABLE = "schema_migrations"
"""golang-migrate's default table name (``x-migrations-table`` not used)."""

SQL_DIR_ENV = "EVENTSCHED_SQL_DIR"

_NIL_VERSION = -1  # golang-migrate's database.NilVersion
_LOCK_SALT = 1486364155  # golang-migrate database.advisoryLockIdSalt
_MAX_VERSION = 2**63 - 1  # schema_migrations.version is a bigint
_DEFAULT_LOCK_TIMEOUT_S = 60.0
_CONNECT_TIMEOUT_S = 10

# golang-migrate accepts any `<digits>_<anything>.<up|down>.<ext>`; we are stricter so
# that a typo (`.up.sq`, a space in the name) is reported instead of silently skipped.
_FILE_RE = re.compile(
    r"^(?P<version>[0-9]+)_(?P<name>[A-Za-z0-9][A-Za-z0-9_-]*)\.(?P<direction>up|down)\.sql$"
)

Direction = Literal["up", "down"]


@dataclass(frozen=True, slots=True)
class Migration:
    """One version of the schema: a pair of up/down files."""

    version: int
    name: str
    up_path: Path
    down_path: Path


# --------------------------------------------------------------------------- files


def default_sql_dir() -> Path:
    """Where the migration files live: ``$EVENTSCHED_SQL_DIR``, else the ones shipped with
    the package (:func:`eventsched.core.runtime.packagedata.sql_dir`)."""
    configured = os.environ.get(SQL_DIR_ENV)
    if configured:
        return Path(configured)
    return packagedata.sql_dir()


def list_migrations(sql_dir: Path | str) -> list[Migration]:
    """Validate ``sql_dir`` and return its migrations sorted by version.

    Raises :class:`MigrationError` if the directory is missing or empty, a ``.sql``
    file does not match ``NNNNNN_name.up.sql`` / ``NNNNNN_name.down.sql``, a version
    appears twice, or an up file has no down file (or the reverse). Files that do
    not end in ``.sql`` (a README) are ignored.
    """
    directory = Path(sql_dir)
    if not directory.is_dir():
        raise MigrationError(
            f"migrations directory {directory} does not exist or is not a directory "
            f"(set {SQL_DIR_ENV} to the folder holding NNNNNN_name.up.sql files)"
        )
    found: dict[int, dict[str, Path]] = {}
    names: dict[int, str] = {}
    for path in sorted(directory.iterdir()):
        if not path.is_file() or not path.name.endswith(".sql"):
            continue
        match = _FILE_RE.match(path.name)
        if match is None:
            raise MigrationError(
                f"bad migration file name {path.name!r} in {directory}: expected "
                "NNNNNN_name.up.sql or NNNNNN_name.down.sql (name: letters, digits, _ or -)"
            )
        number = int(match["version"])
        if number > _MAX_VERSION:
            raise MigrationError(f"migration {path.name}: version {number} does not fit a bigint")
        direction = match["direction"]
        pair = found.setdefault(number, {})
        if direction in pair:
            raise MigrationError(
                f"duplicate migration version {number} in {directory}: "
                f"{pair[direction].name} and {path.name}"
            )
        if number in names and names[number] != match["name"]:
            other = next(iter(pair.values()))
            raise MigrationError(
                f"duplicate migration version {number} in {directory}: "
                f"{other.name} and {path.name} have different names"
            )
        pair[direction] = path
        names[number] = match["name"]
    if not found:
        raise MigrationError(f"no migration files (NNNNNN_name.up.sql) in {directory}")
    migrations = []
    for number in sorted(found):
        pair = found[number]
        for have, missing in (("up", "down"), ("down", "up")):
            if missing not in pair:
                raise MigrationError(
                    f"{pair[have].name} has no matching "
                    f"{pair[have].name.removesuffix(f'.{have}.sql')}.{missing}.sql in {directory}"
                )
        migrations.append(Migration(number, names[number], pair["up"], pair["down"]))
    return migrations


# ------------------------------------------------------------------- public API


def advisory_lock_id(
    database_name: str, schema_name: str, table_name: str = MIGRATIONS_TABLE
) -> int:
    """golang-migrate's ``database.GenerateAdvisoryLockId(db, schema, table)``.

    CRC-32 (IEEE) of the NUL-joined names, multiplied by a fixed salt in uint32
    arithmetic. Note that golang-migrate's postgres driver passes the *URL path* as
    the database name, i.e. ``"/eventsched"`` with its leading slash; callers that
    want to exclude golang-migrate must pass it the same way (see ``_lock_key``).
    """
    data = b"\x00".join(name.encode() for name in (database_name, schema_name, table_name))
    return (zlib.crc32(data) * _LOCK_SALT) & 0xFFFFFFFF


def version(dsn: str) -> tuple[int | None, bool]:
    """Current ``(version, dirty)``; ``(None, False)`` for a database never migrated.

    Read-only: it does not create ``schema_migrations`` and takes no lock.
    """
    with _connect(dsn) as conn:
        return _read_version(conn, _migrations_table(conn))


def up(
    dsn: str,
    sql_dir: Path | str | None = None,
    steps: int | None = None,
    *,
    lock_timeout: float = _DEFAULT_LOCK_TIMEOUT_S,
) -> list[int]:
    """Apply pending migrations in order (all of them, or the next ``steps``).

    Returns the versions applied, in order (empty if the schema is up to date).
    Refuses to run on a dirty database. Waits at most ``lock_timeout`` seconds for
    another migrating process.
    """
    _check_steps(steps)
    migrations = list_migrations(sql_dir if sql_dir is not None else default_sql_dir())
    applied: list[int] = []
    with _connect(dsn) as conn, _migration_lock(conn, lock_timeout) as table:
        current = _read_clean_version(conn, table, migrations)
        _require_known(current, migrations)
        pending = [m for m in migrations if current is None or m.version > current]
        for migration in pending[:steps]:
            _run(
                conn,
                table,
                migration,
                "up",
                target=migration.version,
                schema_at=current,
                done=applied,
            )
            applied.append(migration.version)
            current = migration.version
    return applied


def down(
    dsn: str,
    sql_dir: Path | str | None = None,
    steps: int | None = 1,
    *,
    lock_timeout: float = _DEFAULT_LOCK_TIMEOUT_S,
) -> list[int]:
    """Revert the last ``steps`` applied migrations (``None``: all of them).

    Returns the versions reverted, newest first (empty if nothing is applied).
    Refuses to run on a dirty database.
    """
    _check_steps(steps)
    migrations = list_migrations(sql_dir if sql_dir is not None else default_sql_dir())
    reverted: list[int] = []
    with _connect(dsn) as conn, _migration_lock(conn, lock_timeout) as table:
        current = _read_clean_version(conn, table, migrations)
        if current is None:
            return reverted
        _require_known(current, migrations)
        applied = [m for m in migrations if m.version <= current]
        for index in range(len(applied) - 1, -1, -1)[:steps]:
            migration = applied[index]
            target = applied[index - 1].version if index > 0 else None
            _run(
                conn,
                table,
                migration,
                "down",
                target=target,
                schema_at=migration.version,
                done=reverted,
            )
            reverted.append(migration.version)
    return reverted


def force(dsn: str, version: int, *, lock_timeout: float = _DEFAULT_LOCK_TIMEOUT_S) -> None:
    """Record ``version`` as current and clean (dirty=false), running no SQL.

    golang-migrate's ``force``: the way out of a dirty state once a human has made
    the schema match ``version``. ``-1`` means "no version" (empty table).
    """
    if version < _NIL_VERSION or version > _MAX_VERSION:
        raise MigrationError(
            f"cannot force version {version}: use -1 (no version) or a version >= 0"
        )
    with _connect(dsn) as conn, _migration_lock(conn, lock_timeout) as table:
        _set_version(conn, table, None if version == _NIL_VERSION else version, dirty=False)
    log.info("migration_forced", version=version)


# ------------------------------------------------------------------ connection


@contextlib.contextmanager
def _connect(dsn: str) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit connection; connection problems become DependencyError."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.Error as err:
        raise DependencyError("postgres", f"invalid DSN: {_redact(str(err), dsn)}") from err
    options: dict[str, Any] = {"autocommit": True, "application_name": "eventsched-migrate"}
    if "connect_timeout" not in params:
        options["connect_timeout"] = _CONNECT_TIMEOUT_S
    try:
        conn = psycopg.connect(dsn, **options)
    except psycopg.Error as err:
        raise DependencyError(
            "postgres", f"cannot connect to {_describe(dsn)}: {_redact(str(err), dsn).strip()}"
        ) from err
    # Closing the session also releases the advisory lock, whatever happened.
    with conn:
        try:
            yield conn
        except psycopg.Error as err:
            # Bookkeeping queries failing (migration files are translated in _run).
            raise DependencyError(
                "postgres", f"{_describe(dsn)}: {_redact(str(err), dsn).strip()}"
            ) from err


def _describe(dsn: str) -> str:
    """``database "x" on host:port`` for messages; never includes the password."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.Error:
        return "the configured database"
    host = params.get("host") or "localhost"
    port = params.get("port") or "5432"
    dbname = params.get("dbname") or params.get("user") or "?"
    return f'database "{dbname}" on {host}:{port}'


def _redact(text: str, dsn: str) -> str:
    """Remove the DSN's password from ``text`` (libpq echoes bits of a bad DSN)."""
    secrets: set[str] = set()
    with contextlib.suppress(psycopg.Error):
        password = conninfo_to_dict(dsn).get("password")
        if password:
            secrets.add(str(password))
    # Also when the DSN does not parse: URL userinfo and key=value forms.
    url = re.search(r"://[^/@]*?:(?P<pw>[^@/]*)@", dsn)
    if url and url["pw"]:
        secrets.update({url["pw"], unquote(url["pw"])})
    kv = re.search(r"password\s*=\s*(?P<pw>'(?:[^'\\]|\\.)*'|\S+)", dsn)
    if kv:
        secrets.update({kv["pw"], kv["pw"].strip("'")})
    for secret in sorted(secrets, key=len, reverse=True):
        if secret:
            text = text.replace(secret, "***")
    return text


# ---------------------------------------------------------------- bookkeeping


def _migrations_table(conn: psycopg.Connection[Any]) -> tuple[str, str] | None:
    """``(schema, table)`` of schema_migrations: golang-migrate uses current_schema()."""
    row = conn.execute("SELECT current_schema()").fetchone()
    if row is None or row[0] is None:
        return None
    return (str(row[0]), MIGRATIONS_TABLE)


def _table_ident(table: tuple[str, str]) -> sql.Composed:
    return sql.SQL(".").join([sql.Identifier(table[0]), sql.Identifier(table[1])])


def _read_version(
    conn: psycopg.Connection[Any], table: tuple[str, str] | None
) -> tuple[int | None, bool]:
    if table is None:
        return (None, False)
    query = sql.SQL("SELECT version, dirty FROM {} LIMIT 1").format(_table_ident(table))
    try:
        row = conn.execute(query).fetchone()
    except psycopg.errors.UndefinedTable:
        return (None, False)
    if row is None:
        return (None, False)
    number, dirty = int(row[0]), bool(row[1])
    return (None if number == _NIL_VERSION else number, dirty)


def _read_clean_version(
    conn: psycopg.Connection[Any], table: tuple[str, str], migrations: list[Migration]
) -> int | None:
    """The current version; refuses (with the way out) if it is dirty."""
    current, dirty = _read_version(conn, table)
    if not dirty:
        return current
    # Files run as one transaction, so a failed file changed nothing: after a failed
    # `up` of V (recorded: V) the schema is at the version before V; after a failed
    # `down` of V (recorded: the version before V) it is still at V.
    versions = [_NIL_VERSION, *(m.version for m in migrations)]
    recorded = current if current is not None else _NIL_VERSION
    before = max((v for v in versions if v < recorded), default=None)
    after = min((v for v in versions if v > recorded), default=None)
    ways_out = []
    if before is not None and current is not None:
        ways_out.append(f"`eventsched migrate force {before}` if `up` of {current} failed")
    if after is not None:
        ways_out.append(f"`eventsched migrate force {after}` if `down` of {after} failed")
    at = f"version {current}" if current is not None else "no version (-1)"
    raise MigrationError(
        f"database is dirty at {at}: a migration failed or was interrupted, so the schema "
        "may not match any version. Check the schema, then record the version it really "
        "is at with `eventsched migrate force VERSION` and retry"
        + (": usually " + ", or ".join(ways_out) if ways_out else "")
        + "."
    )


def _set_version(
    conn: psycopg.Connection[Any], table: tuple[str, str], number: int | None, *, dirty: bool
) -> None:
    """golang-migrate's SetVersion: replace the single row in one transaction."""
    ident = _table_ident(table)
    with conn.transaction():
        conn.execute(sql.SQL("TRUNCATE {}").format(ident))
        # A dirty "no version" is written as -1 so that a failed down of the first
        # migration is still visible (golang-migrate issue #330).
        if number is not None or dirty:
            conn.execute(
                sql.SQL("INSERT INTO {} (version, dirty) VALUES (%s, %s)").format(ident),
                (number if number is not None else _NIL_VERSION, dirty),
            )


def _ensure_table(conn: psycopg.Connection[Any], table: tuple[str, str]) -> None:
    """Create schema_migrations like golang-migrate (checked first: read-only users)."""
    exists = conn.execute(
        "SELECT count(1) FROM information_schema.tables WHERE table_schema = %s AND table_name = %s",
        table,
    ).fetchone()
    if exists is not None and exists[0] == 1:
        return
    conn.execute(
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} (version bigint not null primary key, dirty boolean not null)"
        ).format(_table_ident(table))
    )


@contextlib.contextmanager
def _migration_lock(conn: psycopg.Connection[Any], timeout: float) -> Iterator[tuple[str, str]]:
    """Hold golang-migrate's advisory lock; yields the schema_migrations table.

    The table is created under the lock, as golang-migrate does, because two
    concurrent ``CREATE TABLE IF NOT EXISTS`` can still collide in pg_type.
    """
    table = _migrations_table(conn)
    if table is None:
        raise MigrationError(
            "no current schema: the search_path names no existing schema, "
            "so there is nowhere to keep schema_migrations"
        )
    key = _lock_key(conn, table)
    started = time.monotonic()
    # lock_timeout bounds the wait (PostgreSQL applies it to advisory locks too);
    # it is reset at once so that it does not limit the migration's own DDL.
    conn.execute(
        "SELECT set_config('lock_timeout', %s, false)", (f"{max(1, int(timeout * 1000))}ms",)
    )
    try:
        conn.execute("SELECT pg_advisory_lock(%s)", (key,))
    except psycopg.errors.LockNotAvailable as err:
        raise MigrationError(
            f"gave up after {timeout:g}s waiting for the migration lock "
            f"(pg_advisory_lock({key})): another eventsched or golang-migrate process is "
            "migrating this database; see pg_locks WHERE locktype = 'advisory'"
        ) from err
    finally:
        if not conn.broken:
            conn.execute("RESET lock_timeout")
    log.debug("migration_lock_acquired", key=key, waited_s=round(time.monotonic() - started, 3))
    try:
        _ensure_table(conn, table)
        yield table
    finally:
        # Closing the session releases the lock anyway; unlocking explicitly keeps
        # the session reusable. A failure here must not hide the real error.
        if not conn.closed and not conn.broken:
            with contextlib.suppress(psycopg.Error):
                conn.execute("SELECT pg_advisory_unlock(%s)", (key,))


def _lock_key(conn: psycopg.Connection[Any], table: tuple[str, str]) -> int:
    row = conn.execute("SELECT current_database()").fetchone()
    assert row is not None  # current_database() always returns a row
    # golang-migrate's postgres driver takes the database name from the URL path,
    # leading slash included ("/eventsched"), and only falls back to
    # current_database() when the URL has no path. Compose passes a URL with the
    # database name, so this is the key the migrate/migrate container takes.
    return advisory_lock_id("/" + str(row[0]), table[0], table[1])


# ------------------------------------------------------------------- running


def _run(
    conn: psycopg.Connection[Any],
    table: tuple[str, str],
    migration: Migration,
    direction: Direction,
    *,
    target: int | None,
    schema_at: int | None,
    done: list[int],
) -> None:
    """Run one migration file with golang-migrate's dirty-flag protocol.

    ``target`` is the version recorded (V going up, the previous version going
    down); ``schema_at`` is the version the schema is at before the file runs,
    which is where it still is if the file fails (the file is one transaction).
    ``done`` lists the versions this run already migrated, for the error message.
    """
    path = migration.up_path if direction == "up" else migration.down_path
    try:
        body = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise MigrationError(f"cannot read migration {path}: {err}") from err
    started = time.monotonic()
    _set_version(conn, table, target, dirty=True)
    # Like golang-migrate, an empty file only moves the version.
    if body.strip():
        try:
            # No parameters: psycopg sends it with the simple query protocol, so
            # PostgreSQL runs all statements of the file as one implicit transaction.
            conn.execute(body)
        except psycopg.Error as err:
            raise MigrationError(
                _failure_message(path, body, err, direction, target, schema_at, done)
            ) from err
    _set_version(conn, table, target, dirty=False)
    log.info(
        "migration_applied",
        version=migration.version,
        name=migration.name,
        direction=direction,
        duration_s=round(time.monotonic() - started, 3),
    )


def _failure_message(
    path: Path,
    body: str,
    err: psycopg.Error,
    direction: Direction,
    target: int | None,
    schema_at: int | None,
    done: list[int],
) -> str:
    diag = err.diag
    text = diag.message_primary or str(err).strip()
    where = _line_col(body, diag.statement_position)
    parts = [f"migration {path.name} failed: {text}"]
    if err.sqlstate:
        parts[0] += f" [SQLSTATE {err.sqlstate}]"
    if where:
        parts[0] += f" at {where}"
    if diag.message_detail:
        parts.append(f"DETAIL: {diag.message_detail}")
    if diag.message_hint:
        parts.append(f"HINT: {diag.message_hint}")
    if done:
        verb = "applied" if direction == "up" else "reverted"
        parts.append(f"Before it, this run {verb}: {', '.join(map(str, done))}.")
    recorded = target if target is not None else _NIL_VERSION
    at = schema_at if schema_at is not None else _NIL_VERSION
    parts.append(
        f"schema_migrations now says version {recorded}, dirty. The file runs as one "
        f"transaction, so its changes were rolled back and the schema is still at version {at}: "
        f"fix {path.name}, run `eventsched migrate force {at}`, then `eventsched migrate "
        f"{direction}` again."
    )
    return "\n".join(parts)


def _line_col(body: str, position: str | None) -> str | None:
    """PostgreSQL's 1-based character position in the file as ``line L, column C``."""
    if not position or not position.isdigit():
        return None
    pos = int(position)
    if not 0 < pos <= len(body):
        return None
    before = body[: pos - 1]
    line = before.count("\n") + 1
    column = pos - (before.rfind("\n") + 1)
    return f"line {line}, column {column}"


def _check_steps(steps: int | None) -> None:
    if steps is not None and steps < 1:
        raise MigrationError(f"steps must be a positive number of migrations, got {steps}")


def _require_known(current: int | None, migrations: list[Migration]) -> None:
    if current is not None and all(m.version != current for m in migrations):
        newest = migrations[-1].version
        raise MigrationError(
            f"database is at version {current}, which has no migration files in this "
            f"directory (newest here: {newest}); is this an older eventsched than the one "
            "that migrated the database?"
        )
