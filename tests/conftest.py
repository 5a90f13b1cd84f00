"""What every tier needs: the asyncio patch for trio-asyncio.

The server fixtures live in ``tests.support.servers`` and reach the integration and deploy
tiers through their own conftest; the unit tier has none.
"""

from __future__ import annotations

from eventsched.core.runtime import bootstrap

# The suite runs roles in-process: patch asyncio for trio-asyncio as the CLI does.
bootstrap.install()
