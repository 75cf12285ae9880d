"""The HTTP API under schemathesis: requests generated from its OpenAPI document, sent to the app served on loopback.

Every route, with a key of an account that can chat and read, answers as its document says (status codes, content
types, headers, response bodies against their schemas) and never with a server error, whatever a client sends: values
within the document's rules, values just outside them (the coverage phase), random ones (fuzzing), and sequences that
follow the document's links (stateful). Deterministic (`--generation-deterministic`, which keeps no example
database), so a failure repeats, and small enough for the suite; a longer run by hand against `agentrt serve`:

    schemathesis run http://127.0.0.1:8000/openapi.json -H 'Authorization: Bearer art_...' \
        --checks all --exclude-checks positive_data_acceptance --max-examples 400

Left out, `positive_data_acceptance`: a request the document allows that the API refuses (422) for a rule the document
cannot state, named in the answer: an agent the account does not have, a cursor this API did not give, `since` after
`until`, a chat whose last message is not the user's text.
"""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

import pytest
from fastapi import FastAPI

from tests.api.conftest import Keys

SCHEMATHESIS = Path(sys.executable).parent / 'schemathesis'


@pytest.mark.timeout(300)
async def test_every_route_answers_generated_requests_as_its_document_says(
    keys: Keys, app: FastAPI, live_url: str, tmp_path: Path
) -> None:
    operations = sum(len(methods) for methods in app.openapi()['paths'].values())
    command = [
        str(SCHEMATHESIS),
        'run',
        f'{live_url}/openapi.json',
        '--header',
        f'Authorization: Bearer {keys.acme}',
        '--checks',
        'all',
        '--exclude-checks',
        'positive_data_acceptance',
        '--max-examples',
        '20',
        '--generation-deterministic',  # and so no example database
        '--request-timeout',
        '60',
        '--no-color',
    ]
    # Its own process (it runs its requests from threads of its own), while this event loop serves the app.
    process = await asyncio.create_subprocess_exec(
        *command, cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output = (await process.communicate())[0].decode(errors='replace')
    assert process.returncode == 0, output[-8000:]
    # It did test: every operation of the document, and some hundreds of requests.
    assert re.search(rf'Tested: {operations}\b', output), output[-3000:]
    generated = re.search(r'(\d+) generated, (\d+) passed', output)
    assert generated is not None and int(generated[1]) >= 10 * operations, output[-3000:]
    assert generated[1] == generated[2], output[-3000:]
