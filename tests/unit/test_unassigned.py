"""The consumer's unassigned-grace setting (the group behaviour is in
tests/integration/test_unassigned.py).
"""

from __future__ import annotations

import pytest

from eventsched.core.runtime.errors import ConfigError
from eventsched.core.runtime.settings import build_settings


def test_unassigned_grace_must_be_positive() -> None:
    with pytest.raises(ConfigError, match=r"consumer\.unassigned_grace: must be positive"):
        build_settings({"consumer": {"unassigned_grace": "0s"}}, "test")
    assert build_settings({}, "test").consumer.unassigned_grace == 30.0
