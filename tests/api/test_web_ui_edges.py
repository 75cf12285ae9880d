"""The web UI at its edges, in a real browser (Chromium through playwright, as `test_web_ui.py`): addresses a person
may paste or mistype (a broken escape, a view the page does not have, an audit page past the last), the list of many
conversations by keyboard, a reload after moving between views, a response that is not a chat stream, a failed turn's
text given back, a tool call still being written, the longest refusal on a short screen. One browser launch; skipped
without Chromium like `test_web_ui.py`."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx2
import pytest
from playwright.async_api import Page, Route, expect
from pydantic_ai.exceptions import ModelHTTPError
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart
from pydantic_ai.models.function import AgentInfo, DeltaToolCall, DeltaToolCalls, FunctionModel
from sqlalchemy import text

from agentrt.api.app import create_app
from agentrt.db.session import Unscoped, get_db_session
from agentrt.services.conversations import ConcurrentTurnError
from tests.api.conftest import Keys, auth, serve
from tests.api.test_web_ui import CHROMIUM, _send, browser_page

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason='no Chromium to drive: see tests/api/test_web_ui.py')


CONVERSATIONS = 21
# The newest conversation, renamed as an agentrt before 2026-12-01 could have saved it (any text was an id).
LEGACY_ID = 'team/\u00e5lice'
"""One more than the conversation list shows at first (`PAGE` of conversations.js)."""


LONG_TURNS = 12
"""Turns of a conversation longer than the screen."""


FAIL = 'please fail'
HOLD_ARGS = 'hold the arguments'
"""A message with these words starts a tool call and holds it (its arguments unfinished) until `args_looked_at`."""
args_looked_at = asyncio.Event()
"""A message with these words meets a provider failure (HTTP 503) after the answer's first word."""
HOLD = 'hold the answer'
"""A message with these words is answered with a word, then held until its turn is stopped (at most 30 s)."""
OTHER_TAB = 'from the other tab'
"""A message with these words is answered with a word, then its answer ends once `other_tab_may_end` is set."""
other_tab_may_end = asyncio.Event()


async def _tokens_today() -> int:
    """The tokens of every model request in the ledger (the test's are all of today)."""
    async with get_db_session(account=Unscoped.ADMIN) as session:
        return int((await session.execute(text('SELECT sum(total_tokens) FROM llm_requests'))).scalar_one())


def _quick_model() -> FunctionModel:
    """A model answering 'ok' at once, streamed or not; streamed, it fails after a word when asked to `FAIL`."""

    def respond(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        return ModelResponse(parts=[TextPart('ok')])

    async def stream(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str | DeltaToolCalls]:
        if HOLD_ARGS in str(messages[-1]):
            # A tool call whose arguments are still being written, until the test has looked; then a failure.
            yield {0: DeltaToolCall('search_directory', None, tool_call_id='held-1')}
            await asyncio.wait_for(args_looked_at.wait(), 30)
            raise ModelHTTPError(503, 'quick', {'error': 'overloaded'})
        yield 'ok'
        if FAIL in str(messages[-1]):
            raise ModelHTTPError(503, 'quick', {'error': 'overloaded'})
        if HOLD in str(messages[-1]):
            await asyncio.sleep(30)  # until the browser hangs up, which cancels the run
        if OTHER_TAB in str(messages[-1]):
            await asyncio.wait_for(other_tab_may_end.wait(), 30)

    return FunctionModel(respond, stream_function=stream, model_name='quick')


def test_the_web_uis_conversation_id_rule_is_the_servers() -> None:
    # The chat view checks an id from the address itself, to say the address is at fault: with the server's rule.
    from agentrt.agents.turn_input import SESSION_ID, SESSION_ID_MAX_CHARS

    script = (Path(__file__).resolve().parents[2] / 'api' / 'static' / 'js' / 'chat.js').read_text()
    assert f'const CONVERSATION_ID = /^{SESSION_ID.pattern}$/;' in script
    assert f'const CONVERSATION_ID_MAX_CHARS = {SESSION_ID_MAX_CHARS};' in script


async def test_web_ui_edges_in_a_real_browser(keys: Keys, tmp_path: Path) -> None:
    app = create_app(manage_runtime=False, model=_quick_model(), web_ui=True)
    async for url in serve(app):
        async with httpx2.AsyncClient(base_url=url, timeout=30) as client:
            for number in range(CONVERSATIONS):  # one more than a page of the list
                body = {'message': f'Question {number}'}
                turn = await client.post(
                    f'/api/v1/conversations/c-{number:02d}/turns', json=body, headers=auth(keys.acme)
                )
                assert turn.status_code == 200, turn.text
        async with get_db_session(account=Unscoped.ADMIN) as session:
            renamed = await session.execute(
                text('UPDATE conversations SET conversation_id = :legacy WHERE conversation_id = :newest'),
                {'legacy': LEGACY_ID, 'newest': f'c-{CONVERSATIONS - 1:02d}'},
            )
            assert renamed.rowcount == 1
        async with browser_page(tmp_path / 'profile') as page:
            await _edges(page, url, keys)


async def _edges(page: Page, url: str, keys: Keys) -> None:
    page.set_default_timeout(15_000)
    crashes: list[str] = []
    page.on('pageerror', lambda error: crashes.append(str(error)))
    await page.goto(url)
    # A key pasted with an invisible character (a zero-width space from a document): the key is refused as such, not
    # as "The server cannot be reached" (fetch refuses a header that is not Latin-1 before it sends anything).
    await page.get_by_label('API key').fill(keys.acme + '\u200b')
    await page.get_by_label('API key').press('Enter')
    await expect(page.get_by_role('alert')).to_contain_text('a character an API key never has (U+200B)')
    await page.get_by_label('API key').fill(keys.acme)
    await page.get_by_label('API key').press('Enter')
    await expect(page.get_by_role('textbox', name='Message')).to_be_focused()

    # An address with a broken escape (a link cut in half): a page saying so, not the previous view and a TypeError.
    await page.get_by_role('link', name='Costs', exact=True).click()
    await expect(page.locator('.chart')).to_be_visible()
    for broken in ('#/chat/%ZZ', '#/audit/%E0%A4%A'):
        await page.goto(f'{url}/{broken}')
        await expect(page.get_by_role('alert')).to_contain_text('This address is not valid')
    # A view the page does not have (a typo for `#/conversations/...`): a page saying so, not an empty chat on a
    # conversation named by the address's tail, which the next message would have created.
    views = (
        ('#/conversation/c-01', 'conversation'),
        ('#/Chat', 'Chat'),
        ('#/x%20y/z', 'x y'),
        (f'#/{"v" * 50}', 'v' * 40 + '…'),
        # Segments past what a view takes: an address no view has, not the view without them.
        ('#/chat/c-01/more', 'chat/c-01/more'),
        ('#/costs/x', 'costs/x'),
        ('#/conversations/c-01', 'conversations/c-01'),
        ('#/audit/1/2', 'audit/1/2'),
    )
    for unknown, name in views:
        await page.goto(f'{url}/{unknown}')
        await expect(page.get_by_role('alert')).to_have_text(
            f'This address names no view of this page (“{name}”). Open a view from the menu above.'
        )
        await expect(page.get_by_role('alert').locator('bdi')).to_have_text(name)  # a U+202E in it ends with it
        await expect(page.get_by_role('textbox', name='Message')).to_have_count(0)
    # An audit page past the last (an address kept from when there were more requests): it says so, and its link back
    # goes to the last page, not to the page before it (it read "page 7 of 2", and "← Newer" led to page 6).
    await page.goto(f'{url}/#/audit?page=7')
    await expect(page.locator('p.count')).to_have_text(f'{CONVERSATIONS} requests: page 7 is past the last page, 2.')
    await page.get_by_role('link', name='← The last page').click()
    await expect(page.locator('p.count')).to_have_text(f'{CONVERSATIONS} requests · page 2 of 2')
    await expect(page.locator('tbody tr')).to_have_count(CONVERSATIONS - 20)
    await expect(page.get_by_role('link', name='← Newer')).to_have_attribute('href', '#/audit?page=1')
    # "Older" walks by the API's cursor, not by an offset (page=45000 read every row before it), and "Newer" goes
    # back to the page it came from.
    asked: list[str] = []
    page.on('request', lambda request: asked.append(request.url) if '/llm-audit/interactions?' in request.url else None)
    await page.goto(f'{url}/#/audit')
    await expect(page.locator('tbody tr')).to_have_count(20)
    await page.get_by_role('link', name='Older →').click()
    await expect(page.locator('p.count')).to_have_text(f'{CONVERSATIONS} requests · page 2 of 2')
    await expect(page.locator('tbody tr')).to_have_count(CONVERSATIONS - 20)
    assert 'cursor=' in asked[-1] and 'page=' not in asked[-1], asked
    await expect(page.get_by_role('link', name='Older →')).to_have_count(0)
    await page.get_by_role('link', name='← Newer').click()
    await expect(page.locator('p.count')).to_have_text(f'{CONVERSATIONS} requests · page 1 of 2')
    await expect(page.locator('tbody tr')).to_have_count(20)
    assert crashes == []

    # The costs are read from the daily rollup (the ledger's scan took 0.2-0.4 s a request at a million rows), with
    # the same numbers; from the ledger when the server refuses the rollup (422).
    costs: list[str] = []
    page.on('request', lambda request: costs.append(request.url) if '/api/v1/costs?' in request.url else None)
    await page.goto(f'{url}/#/costs')
    await expect(page.locator('.chart .bar')).to_have_count(1)
    assert len(costs) == 3 and all('source=rollup' in asked for asked in costs), costs
    from_rollup = await page.locator('.chart .bar').get_attribute('data-value')
    assert from_rollup == str(await _tokens_today())

    async def refuse_the_rollup(route: Route) -> None:
        if 'source=rollup' in route.request.url:
            body = {'detail': 'the rollup cannot answer', 'type': 'invalid_input', 'error_id': None, 'field': 'source'}
            await route.fulfill(status=422, json=body)
        else:
            await route.continue_()

    await page.route('**/api/v1/costs?*', refuse_the_rollup)
    costs.clear()
    await page.goto(f'{url}/#/costs?days=7')
    await expect(page.locator('p.totals')).to_contain_text('Last 7 days')
    await expect(page.locator('.chart .bar')).to_have_count(1)
    assert await page.locator('.chart .bar').get_attribute('data-value') == from_rollup
    assert sorted(asked.split('source=')[1][:6] for asked in costs) == ['ledger'] * 3 + ['rollup'] * 3, costs
    await page.unroute('**/api/v1/costs?*', refuse_the_rollup)
    assert crashes == []

    # A conversation id the server refuses, in the address: one message saying so and what an id is, on loading and on
    # sending (they were "Please check “conversation_id”" and "Please check “id”"); the message stays in the box.
    await page.goto(f'{url}/#/chat/a b')
    invalid = 'The conversation id in the address, “a b”, is not valid: a conversation id is 1 to 200 letters, digits'
    await expect(page.locator('.notice .alert')).to_contain_text(invalid)
    box = page.get_by_role('textbox', name='Message')
    await box.fill('and in Boston?')
    await box.press('Enter')
    await expect(page.locator('.notice .alert')).to_have_count(1)
    await expect(page.locator('.notice .alert')).to_contain_text(invalid)
    await expect(box).to_have_value('and in Boston?')
    await expect(page.locator('.message')).to_have_count(0)
    # One an earlier version saved under such an id opens (it was refused as above, though listed), says it can be
    # read, not continued, and a message sent there gets the refusal above, kept in the box.
    await page.goto(f'{url}/#/chat/team%2F%C3%A5lice')
    await expect(page.locator('.message.user')).to_have_text(re.compile(f'Question {CONVERSATIONS - 1}'))
    await expect(page.get_by_role('status')).to_contain_text('saved by an earlier version')
    await box.fill('and in Boston?')
    await box.press('Enter')
    await expect(page.locator('.notice .alert')).to_contain_text('The conversation id in the address, “team/ålice”')
    await expect(box).to_have_value('and in Boston?')
    await expect(page.locator('.message')).to_have_count(2)
    # Enter on a blank message did nothing at all: a hint, read out (a status) and describing the box.
    await page.get_by_role('link', name='New chat').click()
    await expect(page.locator('#chat-title')).to_have_text('New conversation')  # opened: the box is the new chat's
    refusal = page.locator('#message-refusal')
    await box.fill('  \n ')
    await box.press('Enter')
    await expect(refusal).to_have_text('Nothing to send: the message is only spaces or blank lines.')
    await expect(refusal).to_have_attribute('role', 'status')
    await expect(box).to_have_accessible_description(re.compile('Nothing to send'))
    await box.press('x')  # typing takes it away
    await expect(refusal).to_be_hidden()
    await expect(page.locator('.message')).to_have_count(0)
    await box.fill('')

    # Many conversations, by keyboard: "Show more" loads the next page and the focus goes to its first conversation
    # (it fell to the page's body when the button was disabled while loading, and a keyboard user started over).
    await page.get_by_role('link', name='Conversations', exact=True).click()
    await expect(page.locator('.card')).to_have_count(20)
    await page.get_by_role('button', name='Show more').focus()
    await page.keyboard.press('Enter')
    await expect(page.locator('.card')).to_have_count(CONVERSATIONS)
    await expect(page.get_by_role('button', name='Show more')).to_be_hidden()
    await expect(page.locator('.card').nth(20).get_by_role('link')).to_be_focused()
    # Deleting one by keyboard: the focus goes on to the next conversation (the button, disabled and then removed with
    # its card, dropped it to the start of the page).
    page.once('dialog', lambda dialog: asyncio.ensure_future(dialog.accept()))
    await page.locator('li[data-conversation-id="c-10"]').get_by_role('button', name='Delete').focus()
    await page.keyboard.press('Enter')
    await expect(page.locator('li[data-conversation-id="c-10"]')).to_have_count(0)
    await expect(page.locator('li[data-conversation-id="c-09"]').get_by_role('link')).to_be_focused()

    # Back to the chat through the menu, then a reload: the conversation that was on screen comes back (the address
    # said #/chat, and the reload opened a new, empty conversation).
    await page.locator('li[data-conversation-id="c-05"]').get_by_role('link').click()
    await expect(page.locator('.message.user')).to_have_text(['YouQuestion 5'])
    await page.get_by_role('link', name='Costs', exact=True).click()
    await page.get_by_role('link', name='Chat', exact=True).click()
    await expect(page.locator('.message.user')).to_have_text(['YouQuestion 5'])
    # The address names the conversation on screen before the reload: the chat view was still on screen while the
    # costs view loaded, so the check above could pass before the browser ran the click's hashchange, and a reload
    # then came first (CI, under load: the page reloaded at #/chat and opened a new conversation).
    await expect(page).to_have_url(re.compile(r'#/chat/c-05$'))
    await page.reload()
    await expect(page.locator('.message.user')).to_have_text(['YouQuestion 5'])

    # A long conversation opens at its latest turn, and a message sent there shows with its answer. It opened at its
    # first turn, and what was sent next streamed in below the screen, out of sight: nothing seemed to happen.
    async with httpx2.AsyncClient(base_url=url, timeout=30) as client:
        for number in range(LONG_TURNS):
            body = {'message': f'Long question {number}'}
            turn = await client.post('/api/v1/conversations/long/turns', json=body, headers=auth(keys.acme))
            assert turn.status_code == 200, turn.text
    await page.goto(f'{url}/#/chat/long')
    await expect(page.locator('.message.user')).to_have_count(LONG_TURNS)
    await expect(page.locator('.message.assistant').last).to_be_in_viewport()
    await expect(page.locator('.message.user').first).not_to_be_in_viewport()
    turn = await _send(page, 'and one more?')
    await expect(turn).to_have_attribute('data-state', 'done')
    await expect(page.locator('.message.user').last).to_be_in_viewport()
    await expect(turn).to_be_in_viewport()

    # A message sent while the conversation is still loading: it waits in the box until the history is shown. It was
    # sent at once, shown above the history that arrived next, and shown twice once that history held it too.
    history_held = asyncio.Event()

    async def held_history(route: Route) -> None:
        await history_held.wait()
        await route.continue_()

    def history_of_long(address: str) -> bool:
        return '/api/v1/conversations/long?' in address

    await page.route(history_of_long, held_history)
    await page.reload()
    box = page.get_by_role('textbox', name='Message')
    await box.fill('typed while it loads')
    await box.press('Enter')
    await expect(page.get_by_role('button', name='Send')).to_be_disabled()
    await expect(box).to_have_value('typed while it loads')
    await expect(page.locator('.message.user')).to_have_count(0)
    history_held.set()
    await expect(page.locator('.message.user')).to_have_count(LONG_TURNS + 1)
    await expect(page.get_by_role('button', name='Send')).to_be_enabled()
    await box.press('Enter')
    await expect(page.locator('.message.assistant').last).to_have_attribute('data-state', 'done')
    await expect(page.locator('.message.user')).to_have_count(LONG_TURNS + 2)
    await expect(page.locator('.message.user').first).to_have_text('YouLong question 0')
    await expect(page.locator('.message.user').last).to_have_text('Youtyped while it loads')
    await page.unroute(history_of_long)

    # A proxy's page instead of the chat stream (a sign-in page with 200): said so, not "the connection was lost".
    async def proxy_page(route: Route) -> None:
        await route.fulfill(status=200, content_type='text/html', body='<html><body>Sign in to the proxy</body></html>')

    await page.route('**/api/v1/chat', proxy_page)
    turn = await _send(page, 'and in Boston?')
    await expect(turn).to_have_attribute('data-state', 'error')
    await expect(turn.get_by_role('alert')).to_contain_text('The answer was not a chat stream (text/html)')
    await page.unroute('**/api/v1/chat')

    # A failed turn saved nothing: its text is back in the box to send again (it was lost, and had to be retyped).
    box = page.get_by_role('textbox', name='Message')
    await expect(box).to_have_value('and in Boston?')

    # An answer the model's output limit (or the provider's content filter) cut off: saved as it is, and said so; the
    # page showed it as a complete answer, though the stream's finish event said why it ended.
    finish_reason = ['']

    async def cut_off(route: Route) -> None:
        events = [
            {'type': 'start'},
            {'type': 'text-start', 'id': 't1'},
            {'type': 'text-delta', 'id': 't1', 'delta': 'The cardiologists are Dr'},
            {'type': 'text-end', 'id': 't1'},
            {'type': 'finish', 'finishReason': finish_reason[0]},
        ]
        stream = ''.join(f'data: {json.dumps(event)}\n\n' for event in events) + 'data: [DONE]\n\n'
        await route.fulfill(status=200, content_type='text/event-stream', body=stream)

    await page.route('**/api/v1/chat', cut_off)
    for reason, words in (('length', "the model's output limit"), ('content-filter', "the provider's content filter")):
        finish_reason[0] = reason
        turn = await _send(page, 'and in Denver?')
        await expect(turn).to_have_attribute('data-state', 'done')
        await expect(turn.locator('.outcome')).to_contain_text(f'The answer was cut off by {words}')
    await page.unroute('**/api/v1/chat')

    turn = await _send(page, f'and in Boston, {FAIL}')
    await expect(turn).to_have_attribute('data-state', 'error')
    await expect(turn.get_by_role('alert')).to_contain_text('the model provider failed (HTTP 503)')
    await expect(box).to_have_value(f'and in Boston, {FAIL}')

    # A tool call the model is still writing: listed as preparing, with no time axis yet (it read "0 … -Infinity ms").
    turn = await _send(page, HOLD_ARGS)
    await expect(turn.locator('.tool[data-state="pending"]')).to_have_count(1)
    await expect(turn.locator('.tools-summary')).to_have_text('1 tool call')
    await expect(turn.locator('.tool-axis')).to_be_hidden()
    args_looked_at.set()
    await expect(turn).to_have_attribute('data-state', 'error')
    await expect(turn.locator('.tool[data-state="stopped"]')).to_have_count(1)
    await expect(turn.locator('.tool-axis')).to_contain_text('ms')

    # A busy server (503, as api/errors.py writes it): not "The server failed", and the message is back in the box.
    async def busy(route: Route) -> None:
        body = {'detail': 'the server is busy; try again shortly', 'type': 'busy', 'error_id': 'err_0123456789abcdef'}
        await route.fulfill(status=503, content_type='application/json', body=json.dumps(body))

    await page.route('**/api/v1/chat', busy)
    await _send(page, 'and in Boston?')
    alert = page.locator('.notice .alert')
    await expect(alert).to_contain_text('The server cannot take this now (HTTP 503): the server is busy; try again')
    await expect(alert).not_to_contain_text('failed')
    await expect(page.get_by_role('textbox', name='Message')).to_have_value('and in Boston?')
    await page.unroute('**/api/v1/chat')

    # The longest refusal, a conversation held by a turn whose lease runs (409), on a phone with its keyboard open:
    # the message box stays in view beside it (the notice grew the composer, which stays at the bottom of the screen,
    # past the screen's height: the start of the message and the box were off screen).
    held = str(ConcurrentTurnError('c-05', stage='start', expires_in_s=297))

    async def conversation_busy(route: Route) -> None:
        body = {'detail': held, 'type': 'concurrent_turn', 'error_id': None}
        await route.fulfill(status=409, content_type='application/json', body=json.dumps(body))

    await page.set_viewport_size({'width': 390, 'height': 320})
    await page.route('**/api/v1/chat', conversation_busy)
    await _send(page, 'and in Boston?')
    await expect(alert).to_contain_text('lease lapses AGENTRT_TURN_LEASE_SECONDS')
    composer = await page.locator('form.composer').bounding_box()
    assert composer is not None and composer['height'] < 320, composer
    await expect(page.get_by_role('textbox', name='Message')).to_be_in_viewport()
    await page.unroute('**/api/v1/chat')
    await page.set_viewport_size({'width': 1280, 'height': 720})
    await page.get_by_role('textbox', name='Message').fill('')
    turn = await _send(page, 'and in Boston?')
    await expect(turn).to_have_attribute('data-state', 'done')

    # Two tabs on one conversation: this one is refused (409) while the other's turn runs, and sends again once it
    # ended. The other tab's turn shows above this one's, as the conversation holds it: the view stayed as it was
    # loaded, without it, and this tab's answer followed a turn it did not show.
    conversation = page.url.split('#/chat/', 1)[1]
    async with httpx2.AsyncClient(base_url=url, timeout=30) as other:
        body = {
            'trigger': 'submit-message',
            'id': conversation,
            'messages': [{'id': 'o1', 'role': 'user', 'parts': [{'type': 'text', 'text': f'Dentists, {OTHER_TAB}'}]}],
        }
        async with other.stream('POST', '/api/v1/chat', json=body, headers=auth(keys.acme)) as running:
            assert running.status_code == 200
            lines = running.aiter_lines()  # kept: a finalised line iterator would hang up the stream
            async for line in lines:
                if '"text-delta"' in line:
                    break
            await _send(page, 'and in Miami?')
            await expect(page.locator('.notice .alert')).to_contain_text('Another turn holds conversation')
            other_tab_may_end.set()
            assert [line async for line in lines if line.startswith('data:')][-1] == 'data: [DONE]'
    shown = await page.locator('.message.user').count()
    await page.get_by_role('textbox', name='Message').press('Enter')
    # What is on screen stays while the conversation loads again: its last answer is done already, so the new turn is
    # waited for by its count first.
    await expect(page.locator('.message.user')).to_have_count(shown + 2)
    await expect(page.locator('.message.assistant').last).to_have_attribute('data-state', 'done')
    await expect(page.locator('.message.user').nth(-2)).to_have_text(f'YouDentists, {OTHER_TAB}')
    await expect(page.locator('.message.user').last).to_have_text('Youand in Miami?')

    # Half an emoji in the box (a lone surrogate, from a paste cut in the middle of one): sent as U+FFFD, as the server
    # stores it. The body's escape was refused (422, "send the character itself, or both halves of its pair"), which
    # the person could neither see in the box nor fix.
    box = page.get_by_role('textbox', name='Message')
    await box.evaluate("box => { box.value = 'cut \\ud83d here \\ud83d\\ude00'; }")
    await box.press('Enter')
    turn = page.locator('.message.assistant').last
    await expect(turn).to_have_attribute('data-state', 'done')
    await expect(page.locator('.message.user').last).to_have_text('Youcut \ufffd here \U0001f600')
    await expect(page.locator('.notice .alert')).to_have_count(0)

    # A reload while the answer streams: the turn is cancelled (nothing saved), and the message comes back in the box
    # of the reloaded page, to be sent again. It was gone, to be typed again from memory.
    turn = await _send(page, f'and in Austin, {HOLD}')
    await expect(turn.locator('.answer')).to_have_text('ok')
    await page.reload()
    await expect(page.get_by_role('textbox', name='Message')).to_have_value(f'and in Austin, {HOLD}')
    await expect(page.locator('.notice')).to_contain_text('was not answered before you left')
    await expect(page.locator('.message.user').last).not_to_have_text(f'Youand in Austin, {HOLD}')
    await page.get_by_role('textbox', name='Message').fill('')
    # So does opening another conversation while the answer streams, once this one is opened again (the message was
    # gone; the box is the other conversation's meanwhile, so it waits for this one).
    here = page.url
    turn = await _send(page, f'and in Dallas, {HOLD}')
    await expect(turn.locator('.answer')).to_have_text('ok')
    await page.get_by_role('link', name='New chat').click()
    await expect(page.locator('.message')).to_have_count(0)
    await expect(page.get_by_role('textbox', name='Message')).to_have_value('')
    await page.goto(here)
    await expect(page.get_by_role('textbox', name='Message')).to_have_value(f'and in Dallas, {HOLD}')
    await expect(page.locator('.notice')).to_contain_text('was not answered before you left')
    await page.get_by_role('textbox', name='Message').fill('')

    # By keyboard alone: Send, then Stop, each pressed where Tab takes the focus. Each is disabled as it is pressed,
    # which dropped the focus to the start of the page (the next Tab went to "Skip to content"): it goes to the message
    # box, where the next thing to do is.
    box = page.get_by_role('textbox', name='Message')
    await box.fill(f'and in Denver, {HOLD}')
    await box.press('Tab')
    await expect(page.get_by_role('button', name='Send')).to_be_focused()
    await page.keyboard.press('Enter')
    turn = page.locator('.message.assistant').last
    await expect(turn.locator('.answer')).to_have_text('ok')
    await expect(box).to_be_focused()
    # Enter while the answer comes did nothing at all: a hint says why and what to do; the message waits in the box.
    await box.fill('and in Reno?')
    await box.press('Enter')
    refusal = page.locator('#message-refusal')
    await expect(refusal).to_have_text('An answer is still coming: wait for it, or press Stop, then send this message.')
    await expect(box).to_have_value('and in Reno?')
    await page.keyboard.press('Tab')  # Send is disabled while the answer comes: Stop is next
    await expect(page.get_by_role('button', name='Stop')).to_be_focused()
    await page.keyboard.press('Enter')
    await expect(turn).to_have_attribute('data-state', 'stopped')
    await expect(box).to_be_focused()
    await expect(refusal).to_be_hidden()  # said while the answer came; it has ended
    assert crashes == []


async def test_the_web_ui_mounted_under_a_prefix_calls_the_api_beside_it(keys: Keys, tmp_path: Path) -> None:
    # README mounts `create_app()` in an app of one's own (`app.mount('/agent', ...)`): with `web_ui=True` the page
    # loaded at /agent/ and called /api/v1/... at the site's root: every call a 404, or a route of the host app's, sent
    # the agentrt key (QA).
    from fastapi import FastAPI

    host = FastAPI()
    misrouted: list[str] = []
    crashes: list[str] = []

    @host.get('/api/v1/me')
    async def hosts_own_route() -> dict[str, str]:
        misrouted.append('/api/v1/me')
        return {'host': 'not agentrt'}

    host.mount('/agent', create_app(manage_runtime=False, model=_quick_model(), web_ui=True))
    async for url in serve(host):  # type: ignore[arg-type]  # a FastAPI app of one's own
        async with browser_page(tmp_path / 'profile') as page:
            page.set_default_timeout(15_000)
            page.on('pageerror', lambda error: crashes.append(str(error)))
            await page.goto(f'{url}/agent/')
            await page.get_by_label('API key').fill(keys.acme)
            await page.get_by_label('API key').press('Enter')
            turn = await _send(page, 'Cardiologists in Seattle')
            await expect(turn).to_have_attribute('data-state', 'done')
            await page.get_by_role('link', name='Conversations').click()
            await expect(page.locator('main')).to_contain_text('Cardiologists in Seattle')
            assert crashes == []
    assert misrouted == []
