"""Where the files that ship with eventsched live: the migrations and the default settings.

A wheel install carries them as package data under ``eventsched/_data`` (the build copies
the repository's ``sql/`` and ``config/settings.toml`` there: see ``pyproject.toml``); a
source checkout or an editable install reads the repository's files in place. The
environment variables ``EVENTSCHED_SQL_DIR`` and ``EVENTSCHED_SETTINGS`` override both
(their readers, :mod:`eventsched.core.store.migrations` and :mod:`eventsched.core.runtime.settings`, check
them first).
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parents[2]
_PACKAGED = _PACKAGE / "_data"
_CHECKOUT = _PACKAGE.parent


def sql_dir() -> Path:
    """The migration files: packaged with a wheel install, else ``<checkout>/sql``."""
    packaged = _PACKAGED / "sql"
    return packaged if packaged.is_dir() else _CHECKOUT / "sql"


def settings_file() -> Path:
    """The default settings: packaged with a wheel install, else the checkout's
    ``config/settings.toml``."""
    packaged = _PACKAGED / "settings.toml"
    return packaged if packaged.is_file() else _CHECKOUT / "config" / "settings.toml"
