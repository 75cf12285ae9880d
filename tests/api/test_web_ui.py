"""The web UI (`api/static/`) in a real browser: Debian's Chromium driven by playwright, the app served by uvicorn on
loopback, the demo model answering, PostgreSQL underneath.

One browser launch, one page, the whole path a person takes: sign in (a wrong key first), chat with a streamed answer
whose tool calls overlap in time, reload and continue, the errors a person can meet (a refused turn, a busy
conversation, a provider failure, a stopped turn, a revoked key), the audit of the conversation with a failed
request opened, the costs, the conversation list; at 1280 and 390 pixels wide. It saves two screenshots (chat and
audit) in `AGENTRT_SCREENSHOT_DIR` when that is set (README's come from
`AGENTRT_SCREENSHOT_DIR=docs/screenshots python -m pytest tests/api/test_web_ui.py`), else in the test's temp dir.

Skipped, with the reason, only when no Chromium is installed (`.ci/run` installs Debian's `chromium` when missing).
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx2
import pytest
from playwright.async_api import Page, async_playwright, expect
from pydantic_ai.exceptions import ModelHTTPError
from pydantic_ai.messages import ModelMessage, ModelRequest, UserPromptPart
from pydantic_ai.models.function import AgentInfo, DeltaToolCalls, FunctionModel
from sqlalchemy import text

from agentrt.agents.demo_model import DEMO_MODEL_NAME, demo_model
from agentrt.api.app import create_app
from agentrt.db.session import Unscoped, get_db_session
from agentrt.services import directory_service
from agentrt.services.api_keys import forget_cached_api_keys, revoke_api_key
from agentrt.services.background import get_supervisor
from agentrt.services.conversations import PostgresConversationStore
from agentrt.services.ledger import get_request_tracker
from tests.agents.conftest import account_id
from tests.api.conftest import Keys, auth, chat_body, serve
from tests.factories import ledger_rows

QUESTION = 'Cardiologists in Seattle who accept Medicare'
HOSTILE = '<img src=x onerror="window.__injected = 1"> and in Boston?'
SLOW = 'slowly'
"""A message with this word is answered with one word, then held until its turn is stopped (a hang-up cancels it; at
most `HOLD_S`): the test stops it, or finds its conversation busy, however fast the machine."""
HOLD_S = 30.0
FAIL = 'please fail'
"""A message with these words meets a provider failure (HTTP 503) in the middle of the answer's stream."""
CHROMIUM_ARGS = [
    '--no-sandbox',
    '--headless',
    '--disable-gpu',
    '--disable-quic',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
]


@asynccontextmanager
async def browser_page(profile: Path, **options: Any) -> AsyncIterator[Page]:
    """A page of Chromium (`CHROMIUM`, headless) with a new, empty profile at `profile`; `options` go to playwright's
    `launch_persistent_context` (a viewport...). Closed at the end."""
    async with async_playwright() as driver:
        context = await driver.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True, **options
        )
        try:
            yield context.pages[0] if context.pages else await context.new_page()
        finally:
            await context.close()


def find_chromium() -> str | None:
    """A Chromium on this machine: `AGENTRT_TEST_CHROMIUM`, or Debian's `chromium` (or a relative) on PATH."""
    configured = os.environ.get('AGENTRT_TEST_CHROMIUM')
    if configured:
        return configured
    for name in ('chromium', 'chromium-browser', 'chromium-headless-shell', 'google-chrome'):
        found = shutil.which(name)
        if found:
            return found
    return None


CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason='no Chromium to drive: apt-get install chromium (.ci/run does it when it runs as root), '
    'or set AGENTRT_TEST_CHROMIUM; playwright cannot download its own browser here',
)


def _last_prompt(messages: list[ModelMessage]) -> str:
    for message in reversed(messages):
        if isinstance(message, ModelRequest):
            for part in message.parts:
                if isinstance(part, UserPromptPart) and isinstance(part.content, str):
                    return part.content
    return ''


def ui_model() -> FunctionModel:
    """The demo model, held after its first word for a message saying `SLOW`, failing like a provider for one saying
    `FAIL`."""
    demo = demo_model()

    async def stream(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str | DeltaToolCalls]:
        prompt = _last_prompt(messages)
        if FAIL in prompt:
            yield 'Looking'  # a first word, then the provider drops the answer
            raise ModelHTTPError(503, DEMO_MODEL_NAME, body={'error': {'message': 'overloaded, retry later'}})
        held = SLOW in prompt
        assert demo.stream_function is not None
        async for chunk in demo.stream_function(messages, info):
            yield chunk
            if held and isinstance(chunk, str):  # the answer's first word has gone out: wait to be stopped
                held = False
                await asyncio.sleep(HOLD_S)

    return FunctionModel(demo.function, stream_function=stream, model_name=DEMO_MODEL_NAME)


async def _turns_ended() -> None:
    """Wait until no turn holds a conversation (a hung-up turn ends on the server after the browser has moved on),
    then for the ledger writes and post-turn work (titles, summaries) of every turn."""
    for _ in range(500):
        async with get_db_session(account=Unscoped.ADMIN) as session:
            if not (await session.execute(text('SELECT count(*) FROM conversation_turns'))).scalar_one():
                break
        await asyncio.sleep(0.01)
    await get_request_tracker().flush()
    await get_supervisor().join()


async def _send(page: Page, message: str) -> Any:
    """Type `message` and press Enter; the assistant turn it starts."""
    box = page.get_by_role('textbox', name='Message')
    await box.fill(message)
    await box.press('Enter')
    return page.locator('.message.assistant').last


async def _no_sideways_scroll(page: Page) -> None:
    width = await page.evaluate('document.documentElement.scrollWidth')
    assert width <= page.viewport_size['width'], f'{page.url}: the page is {width} px wide'  # type: ignore[index]


async def _screenshot(page: Page, directory: Path, name: str, *, full_page: bool = False) -> None:
    await page.mouse.move(0, 0)  # no row highlighted by where the pointer happens to be
    await page.evaluate('window.scrollTo(0, 0)')
    await page.screenshot(path=str(directory / name), full_page=full_page)


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    """Where the screenshots go: `AGENTRT_SCREENSHOT_DIR` (docs/screenshots for the README), else the temp dir."""
    directory = Path(os.environ.get('AGENTRT_SCREENSHOT_DIR') or tmp_path)
    directory.mkdir(parents=True, exist_ok=True)
    return directory


SEARCH_TAKES_S = 0.05
"""How long each directory search takes in the walk-through, as a directory across a network would: the local one
answers in a millisecond or two, and a loaded machine's browser then read a search's start and another's result in
one chunk of the stream, at one time, and could not show that they overlapped."""


async def test_web_ui_chat_conversations_audit_and_costs_in_a_real_browser(
    keys: Keys, tmp_path: Path, shots: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    search = directory_service.search_directory

    async def slower_search(*args: Any, **kwargs: Any) -> Any:
        result = await search(*args, **kwargs)  # the real query, on the real database
        await asyncio.sleep(SEARCH_TAKES_S)
        return result

    monkeypatch.setattr(directory_service, 'search_directory', slower_search)
    app = create_app(manage_runtime=False, model=ui_model(), web_ui=True)
    async for url in serve(app):
        async with browser_page(tmp_path / 'profile', viewport={'width': 1280, 'height': 1000}) as page:
            await _walk_through(page, url, keys, shots)


async def _walk_through(page: Page, url: str, keys: Keys, shots: Path) -> None:
    page.set_default_timeout(15_000)
    expect.set_options(timeout=15_000)
    crashes: list[str] = []
    page.on('pageerror', lambda error: crashes.append(str(error)))
    await page.goto(url)

    # Sign in: a wrong key is refused with a message, then the right one is kept in this tab only.
    await page.get_by_label('API key').fill('art_000000000000_not-a-key')
    await page.get_by_role('button', name='Sign in').click()
    await expect(page.get_by_role('alert')).to_contain_text('The API key was not accepted')
    await page.get_by_label('API key').fill(keys.acme)
    await page.get_by_label('API key').press('Enter')
    await expect(page.get_by_role('textbox', name='Message')).to_be_focused()
    await expect(page.locator('#account-name')).to_have_text(f'acme-health · {keys.acme[:16]}')
    assert await page.evaluate("sessionStorage.getItem('agentrt.apiKey')") == keys.acme
    assert await page.evaluate('localStorage.length') == 0

    # A streamed answer, and tool calls that ran at the same time: the browser's own clock says so.
    turn = await _send(page, QUESTION)
    await expect(turn).to_have_attribute('data-state', 'done')
    answer = turn.locator('.answer')
    assert 'Cardiology' in await answer.inner_text() and 'Seattle' in await answer.inner_text()
    assert await answer.evaluate('node => node.childNodes.length') > 20  # appended piece by piece as it streamed
    calls = await turn.locator('.tool').evaluate_all(
        """items => items.map(item => ({name: item.dataset.toolName, state: item.dataset.state,
                                        start: Number(item.dataset.startMs), end: Number(item.dataset.endMs)}))"""
    )
    assert {call['state'] for call in calls} == {'done'} and len(calls) == 7
    searches = [call for call in calls if call['name'] == 'search_directory']
    assert len(searches) >= 3
    assert max(call['start'] for call in searches) < min(call['end'] for call in searches)  # all running at once
    assert int(await turn.locator('.tools').get_attribute('data-max-parallel') or 0) >= 3
    conversation = page.url.split('#/chat/', 1)[1]
    await _screenshot(page, shots, 'chat.png')

    # Reload: the conversation comes back from the server, and goes on. Markup in a message stays text.
    await page.reload()
    await expect(page.locator('.message.user')).to_have_count(1)
    await expect(page.locator('.tools[data-live="false"] .tool')).to_have_count(7)
    turn = await _send(page, HOSTILE)
    await expect(turn).to_have_attribute('data-state', 'done')
    assert 'Boston' in await turn.locator('.answer').inner_text()
    await expect(page.locator('.message.user').last).to_have_text('You' + HOSTILE)
    assert await page.evaluate('window.__injected') is None
    stored = await PostgresConversationStore(await account_id('acme-health')).load(conversation)
    assert stored is not None
    prompts = [part.content for m in stored.messages for part in m.parts if isinstance(part, UserPromptPart)]
    assert prompts == [QUESTION, HOSTILE]

    # Errors are messages, never a blank view: a refused message (422) comes back to the box with the field named.
    too_long = 'x' * 32_001
    await _send(page, too_long)
    await expect(page.locator('.notice .alert')).to_contain_text('Please check “messages”')
    await expect(page.get_by_role('textbox', name='Message')).to_have_value(too_long)

    # A busy conversation (409): another client holds a turn on it.
    async with httpx2.AsyncClient(base_url=url, timeout=30) as other:
        body = chat_body(conversation, f'Dermatologists in Boston, {SLOW}', 'other-1')
        async with other.stream('POST', '/api/v1/chat', json=body, headers=auth(keys.acme)) as held:
            assert held.status_code == 200
            lines = held.aiter_lines()  # kept: a finalised line iterator would hang up the stream
            async for line in lines:
                if '"text-delta"' in line:
                    break  # the other turn is running (the conversation is claimed until its run ends)
            await _send(page, 'and in Portland?')
            await expect(page.locator('.notice .alert')).to_contain_text('Another turn holds conversation')
            await expect(page.get_by_role('textbox', name='Message')).to_have_value('and in Portland?')
    # Leaving the block hung up: that turn is cancelled, and the conversation is free once its claim is given back.
    await _turns_ended()
    # The provider fails (502 inside the stream): the error id.
    turn = await _send(page, f'Cardiologists in Seattle, {FAIL}')
    await expect(turn).to_have_attribute('data-state', 'error')
    await expect(turn.get_by_role('alert')).to_contain_text('the model provider failed (HTTP 503)')
    await expect(turn.get_by_role('alert')).to_contain_text('error id err_')
    # Stop: the browser hangs up, the server cancels the run and saves nothing of it.
    turn = await _send(page, f'Cardiologists in Seattle, {SLOW}')
    await expect(turn.locator('.answer')).not_to_be_empty()
    await page.get_by_role('button', name='Stop').click()
    await expect(turn).to_have_attribute('data-state', 'stopped')
    await _turns_ended()
    rows = await ledger_rows(chat_session_id=conversation)
    statuses = sorted(row['status'] for row in rows)
    assert statuses.count('error') == 1 and statuses.count('cancelled') == 2
    assert statuses.count('complete') == len(rows) - 3

    # The audit of this conversation: every request, then the failed ones, then one opened as a conversation.
    await page.get_by_role('link', name='Its requests').click()
    await expect(page.locator('.count')).to_have_text(f'{len(rows)} requests · page 1 of 1')
    await expect(page.locator('tbody tr')).to_have_count(len(rows))
    await page.get_by_label('Show').select_option(label='Failed or cancelled')
    await expect(page.locator('tbody tr')).to_have_count(3)
    assert sorted(await page.locator('tbody tr').evaluate_all('rows => rows.map(r => r.dataset.status)')) == [
        'cancelled',
        'cancelled',
        'error',
    ]
    await page.locator('tbody tr[data-status="error"] a').click()
    error = page.locator('.content-error')
    await expect(error).to_contain_text('ModelHTTPError')
    await expect(error).to_contain_text('503')
    await expect(page.locator('.content-prompt .entry-user').last).to_have_text(f'UserCardiologists in Seattle, {FAIL}')
    await page.get_by_role('link', name='← All requests').click()
    await expect(page.locator('tbody tr')).to_have_count(3)  # back to the filtered list
    first_answer = sorted((row for row in rows if row['status'] == 'complete'), key=lambda row: row['started_at'])[2]
    await page.goto(f'{url}/#/audit/{first_answer["id"]}')
    prompt = page.locator('.content-prompt')
    await expect(prompt.locator('.entry-user')).to_have_text(f'User{QUESTION}')
    await expect(prompt.locator('.entry-assistant .tool-line')).to_have_count(7)  # the calls the model asked for
    await expect(prompt.locator('.entry-tool-return .tool-line')).to_have_count(7)  # and their results
    await expect(page.locator('.content-response')).to_contain_text('I found')
    await _screenshot(page, shots, 'audit.png', full_page=True)

    # Costs: today's bar and the tables hold what the ledger holds for the account.
    await page.get_by_role('link', name='Costs').click()
    async with get_db_session(account=Unscoped.ADMIN) as session:
        requests, tokens = (
            await session.execute(
                text('SELECT count(*), sum(total_tokens) FROM llm_requests WHERE account_id = :account'),
                {'account': await account_id('acme-health')},
            )
        ).one()
    await expect(page.locator('.chart .bar')).to_have_count(1)
    assert await page.locator('.chart .bar').get_attribute('data-value') == str(tokens)
    await expect(page.locator('tr[data-key="demo"] td').first).to_have_text(str(requests))
    await expect(page.locator('tr[data-key$="provider-finder"]')).to_have_count(1)
    # Every column of the tables is in sight, none behind a sideways scroll (side by side, they hid the cost column).
    hidden = await page.locator('.table-wrap').evaluate_all(
        'wraps => wraps.filter(wrap => wrap.scrollWidth > wrap.clientWidth).map(wrap => wrap.textContent.slice(0, 40))'
    )
    assert hidden == []
    # A number column's heading stands over its numbers (right-aligned as they are), the name column's over names.
    aligned = (
        await page.locator('.panel table.numbers')
        .first.locator('thead th')
        .evaluate_all('cells => cells.map(cell => getComputedStyle(cell).textAlign)')
    )
    assert aligned == ['left'] + ['right'] * 5

    # A phone, 390 px wide: every view fits without sideways scrolling. The conversation list has the title written
    # after the turn, and the conversation opened from it goes on.
    await page.set_viewport_size({'width': 390, 'height': 844})
    await _no_sideways_scroll(page)
    for view, ready in (('audit', 'tbody tr'), ('costs', '.chart .bar'), ('conversations', '.card')):
        await page.get_by_role('link', name=view.capitalize(), exact=True).click()
        await expect(page.locator(ready).first).to_be_visible()
        await _no_sideways_scroll(page)
    card = page.locator(f'li[data-conversation-id="{conversation}"]')
    await expect(card.get_by_role('heading')).to_have_text(QUESTION)
    await card.get_by_role('link').click()
    await expect(page.locator('.message.user')).to_have_count(2)  # as saved: no failed or stopped turn
    turn = await _send(page, 'Dermatologists in Boston')
    await expect(turn).to_have_attribute('data-state', 'done')
    await expect(turn.locator('.tool-track').first).to_be_visible()
    await _no_sideways_scroll(page)

    # A revoked key: the next request returns to sign-in with the reason.
    async with get_db_session(account=Unscoped.ADMIN) as session:
        await revoke_api_key(session=session, key=keys.acme)
    forget_cached_api_keys()
    await page.get_by_role('link', name='Audit').click()
    await expect(page.get_by_role('alert')).to_contain_text('The API key was not accepted')
    await expect(page.get_by_label('API key')).to_be_visible()
    assert await page.evaluate("sessionStorage.getItem('agentrt.apiKey')") is None
    assert crashes == []


async def test_an_answer_cut_off_by_the_server_says_the_connection_was_lost(keys: Keys, tmp_path: Path) -> None:
    """The server goes away in the middle of an answer (a restart): the chat says the connection was lost and nothing
    was saved, not that the page failed (it said "This page failed: network error")."""
    import uvicorn

    app = create_app(manage_runtime=False, model=ui_model(), web_ui=True)
    config = uvicorn.Config(app, host='127.0.0.1', port=0, lifespan='off', log_level='warning', access_log=False)
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    for _ in range(1000):
        if server.started:
            break
        await asyncio.sleep(0.01)
    url = f'http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}'
    try:
        async with browser_page(tmp_path / 'profile') as page:
            page.set_default_timeout(15_000)
            await page.goto(url)
            await page.get_by_label('API key').fill(keys.acme)
            await page.get_by_label('API key').press('Enter')
            turn = await _send(page, f'{QUESTION}, {SLOW}')
            await expect(turn.locator('.answer')).not_to_be_empty()
            for connection in list(server.server_state.connections):  # the server's end of the stream, cut
                connection.transport.abort()  # type: ignore[attr-defined]
            await expect(turn).to_have_attribute('data-state', 'error')
            shown = await turn.inner_text()
            assert 'connection was lost' in shown and 'shown again, as the server holds it' in shown, shown
            assert 'This page failed' not in shown
            # The next message first shows the conversation as the server holds it: the cut turn was not saved,
            # so its answer (and the error) are gone, and the new turn is the only one.
            turn = await _send(page, QUESTION)
            await expect(turn).to_have_attribute('data-state', 'done')
            await expect(page.locator('.message.assistant')).to_have_count(1)
            await expect(page.locator('.message.user')).to_have_count(1)
    finally:
        server.should_exit = True
        await serving
    await _turns_ended()
