"""`freeze_startup_heap`: start-up objects frozen out of the cyclic GC's way, by `agentrt serve`'s app only.

The freezing runs in a child process (what `agentrt serve` builds: `create_served_app()`, its lifespan run against the
test database): this test process's heap is the suite's to freeze (tests/conftest.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

_LIFESPAN = textwrap.dedent("""
    import asyncio, gc
    from agentrt.api.app import create_app, create_served_app

    async def main() -> None:
        for app in (create_app(), create_served_app()):  # a library user's app first: it must freeze nothing
            async with app.router.lifespan_context(app):
                print(gc.get_freeze_count())

    asyncio.run(main())
""")


def test_the_served_app_freezes_its_start_up_heap_and_a_library_users_app_does_not(database_url: str) -> None:
    env = {
        **os.environ,
        'DATABASE_URL': database_url.replace('postgresql+asyncpg://', 'postgresql://'),
        'AGENTRT_AUTO_MIGRATE': 'false',
    }
    done = subprocess.run(
        [sys.executable, '-c', _LIFESPAN], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    library, served = (int(line) for line in done.stdout.split())
    assert library == 0
    assert served > 10_000  # the runtime's modules, classes and schemas at least
