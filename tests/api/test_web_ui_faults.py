"""The web UI against faults, hostile text and the basics of access, in a real browser (Chromium through playwright,
as `test_web_ui.py`): a key revoked as a message is sent, a browser gone offline (before and during an answer), the
conversation on screen deleted, an answer streaming behind another view, a conversation that cannot be loaded again,
right-to-left overrides in what the page quotes, the contrast of its controls, a 320 px screen, the keyboard. One
browser for the module, a new context (an empty tab state) for each short test; skipped without Chromium like
`test_web_ui.py`."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import httpx2
import pytest
from playwright.async_api import Browser, Dialog, Page, Route, async_playwright, expect
from pydantic_ai.messages import ModelMessage, ModelRequest, ModelResponse, TextPart, UserPromptPart
from pydantic_ai.models.function import AgentInfo, DeltaToolCalls, FunctionModel

from agentrt.api.app import create_app
from agentrt.db.session import Unscoped, get_db_session
from agentrt.services.api_keys import create_api_key, forget_cached_api_keys, revoke_api_key
from agentrt.services.background import get_supervisor
from agentrt.services.conversations import PostgresConversationStore
from tests.agents.conftest import account_id
from tests.api.conftest import Keys, auth, serve
from tests.api.test_vercel_messages import _store
from tests.api.test_web_ui import CHROMIUM, CHROMIUM_ARGS, _send

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason='no Chromium to drive: see tests/api/test_web_ui.py')


RLO = '\u202e'
"""RIGHT-TO-LEFT OVERRIDE: the text after it, to the end of its paragraph or a closing isolate, shows reversed."""


DRIP = 'drip the answer'
"""A message with these words is answered with 'ok', then ' and more' once `drip_more` is set (at most 30 s later)."""
drip_more = asyncio.Event()


def _quick_model() -> FunctionModel:
    """A model answering 'ok' at once, streamed or not; streamed, the rest of the answer to `DRIP` waits."""

    def respond(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        return ModelResponse(parts=[TextPart('ok')])

    async def stream(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str | DeltaToolCalls]:
        yield 'ok'
        if DRIP in str(messages[-1]):
            await asyncio.wait_for(drip_more.wait(), 30)
            yield ' and more'

    return FunctionModel(respond, stream_function=stream, model_name='quick')


@pytest.fixture(scope='module')
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as driver:
        launched = await driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture(scope='module')
async def site() -> AsyncIterator[str]:
    async for url in serve(create_app(manage_runtime=False, model=_quick_model(), web_ui=True)):
        yield url


CSP_WATCH = """window.__cspBreaches = [];
document.addEventListener('securitypolicyviolation', (event) => {
  window.__cspBreaches.push(`${event.violatedDirective} ${event.blockedURI} ${event.sourceFile}:${event.lineNumber}`);
});"""
"""Collects the page's breaches of its Content-Security-Policy (run before the page's own scripts, in each document)."""


@pytest.fixture
async def page(browser: Browser, site: str, keys: Keys) -> AsyncIterator[Page]:
    """A new tab state, signed in with acme's key, on a new chat; no script error and no breach of the page's CSP (what
    the page does needs no inline script or style) may happen in it."""
    context = await browser.new_context(viewport={'width': 1280, 'height': 800})
    await context.add_init_script(CSP_WATCH)
    page = await context.new_page()
    page.set_default_timeout(15_000)
    expect.set_options(timeout=15_000)
    crashes: list[str] = []
    page.on('pageerror', lambda error: crashes.append(str(error)))
    await page.goto(site)
    await _sign_in(page, keys.acme)
    try:
        yield page
        assert await page.evaluate('window.__cspBreaches') == []
    finally:
        await context.close()
    assert crashes == []


async def _sign_in(page: Page, key: str) -> None:
    await page.get_by_label('API key').fill(key)
    await page.get_by_label('API key').press('Enter')
    await expect(page.get_by_role('button', name='Sign out')).to_be_visible()


async def _revoke(key: str) -> None:
    async with get_db_session(account=Unscoped.ADMIN) as session:
        await revoke_api_key(session=session, key=key)
    forget_cached_api_keys()


async def test_a_message_sent_as_the_key_is_revoked_comes_back_after_signing_in_again(page: Page, site: str) -> None:
    # The key stops working as a message is sent (401): the page returns to sign-in, and the message was gone with it,
    # to be typed again from memory. It comes back in the box once a key of the same account signs in.
    turn = await _send(page, 'first question')
    await expect(turn).to_have_attribute('data-state', 'done')
    conversation = page.url.split('#/chat/', 1)[1]
    key = await page.evaluate("sessionStorage.getItem('agentrt.apiKey')")
    await _revoke(key)
    await _send(page, 'my second, long-considered question')
    await expect(page.get_by_role('alert')).to_contain_text('The API key was not accepted')
    async with get_db_session(account=Unscoped.ADMIN) as session:
        again = await create_api_key(session=session, account='acme-health', name='again')
    await _sign_in(page, again.token)
    box = page.get_by_role('textbox', name='Message')
    await expect(box).to_have_value('my second, long-considered question')
    await expect(page.locator('.notice')).to_contain_text('before the page returned to sign-in')
    await expect(page.locator('.message.user')).to_have_text(['Youfirst question'])  # as saved: the refused one is not

    # Typed but not sent, as another view's requests find the key revoked: kept too. The costs make three requests at
    # once, and the second 401 signed out again, forgetting what the first had kept.
    await box.fill('a draft of mine')
    await _revoke(again.token)
    await page.get_by_role('link', name='Costs', exact=True).click()
    await expect(page.get_by_role('alert')).to_contain_text('The API key was not accepted')
    async with get_db_session(account=Unscoped.ADMIN) as session:
        third = await create_api_key(session=session, account='acme-health', name='third')
        other = await create_api_key(session=session, account='green-grocer', name='other')
    await _sign_in(page, third.token)
    await page.goto(f'{site}/#/chat/{conversation}')
    await expect(box).to_have_value('a draft of mine')

    # Never for another account: a key of green-grocer signed in on this tab does not get acme's message.
    await _revoke(third.token)
    await page.get_by_role('link', name='Audit', exact=True).click()
    await expect(page.get_by_role('alert')).to_contain_text('The API key was not accepted')
    await _sign_in(page, other.token)
    await page.goto(f'{site}/#/chat/{conversation}')
    await expect(page.locator('.notice')).to_contain_text('This conversation has no saved messages yet')
    await expect(box).to_have_value('')
    assert await page.evaluate("sessionStorage.getItem('agentrt.pendingMessages')") is None


async def test_a_message_sent_offline_says_the_browser_is_offline(page: Page) -> None:
    # It said "The server cannot be reached. Is `agentrt serve` still running?", which sent people to restart a server
    # that was fine.
    await page.context.set_offline(True)
    await _send(page, 'sent without a network')
    alert = page.locator('.notice .alert')
    await expect(alert).to_contain_text('This browser is offline')
    await expect(alert).not_to_contain_text('agentrt serve')
    box = page.get_by_role('textbox', name='Message')
    await expect(box).to_have_value('sent without a network')
    await page.context.set_offline(False)
    await box.press('Enter')
    await expect(page.locator('.message.assistant')).to_have_attribute('data-state', 'done')


READS_IN_ORDER = """element => {
  // Whether the last two characters of `element`'s text show in their order (left to right), where they share a line.
  const walker = document.createTreeWalker(element, NodeFilter.SHOW_TEXT);
  let last = null;
  for (let node = walker.nextNode(); node; node = walker.nextNode()) if (node.data.trim().length > 1) last = node;
  const end = last.data.trimEnd().length;
  const box = (at) => { const range = document.createRange(); range.setStart(last, at); range.setEnd(last, at + 1);
                        return range.getBoundingClientRect(); };
  const [before, after] = [box(end - 2), box(end - 1)];
  return Math.abs(before.top - after.top) > 2 || after.left > before.left;
}"""


async def test_a_right_to_left_override_ends_with_the_text_that_holds_it(page: Page, site: str, keys: Keys) -> None:
    # A right-to-left override (U+202E) in text the page quotes in a sentence reversed the rest of the sentence:
    # "Deleted “<RLO>abc”." showed as "Deleted “.”cba". Each is isolated now.
    await page.goto(f'{site}/#/chat/{RLO}abc')
    alert = page.locator('.notice .alert')
    await expect(alert).to_contain_text('is not valid')
    assert await alert.evaluate(READS_IN_ORDER)

    # A tool's arguments, summarised on one line: the override in one value reversed the arguments after it.
    async def with_a_tool_call(route: Route) -> None:
        call = {'toolCallId': 't1', 'toolName': 'search_directory'}
        events = [
            {'type': 'start'},
            {'type': 'tool-input-available', **call, 'input': {'query': f'{RLO}evil', 'city': 'Boston'}},
            {'type': 'tool-output-available', 'toolCallId': 't1', 'output': []},
            {'type': 'finish'},
        ]
        stream = ''.join(f'data: {json.dumps(event)}\n\n' for event in events) + 'data: [DONE]\n\n'
        await route.fulfill(status=200, content_type='text/event-stream', body=stream)

    await page.goto(f'{site}/#/chat/new')
    await page.route('**/api/v1/chat', with_a_tool_call)
    turn = await _send(page, 'search')
    await expect(turn).to_have_attribute('data-state', 'done')
    assert await turn.locator('.tool-args').evaluate(READS_IN_ORDER)
    await page.unroute('**/api/v1/chat')

    # A title (written from the first message) in the notice of its deletion, and in the question before it.
    async with httpx2.AsyncClient(base_url=site, timeout=30) as client:
        made = await client.post(
            '/api/v1/conversations/rtl/turns', json={'message': f'{RLO}abc'}, headers=auth(keys.acme)
        )
        assert made.status_code == 200, made.text
    await get_supervisor().join()  # the title
    await page.goto(f'{site}/#/conversations')
    questions: list[str] = []

    async def answer(dialog: Dialog) -> None:
        questions.append(dialog.message)
        await dialog.accept()

    page.once('dialog', answer)
    await page.locator('li[data-conversation-id="rtl"]').get_by_role('button', name='Delete').click()
    deleted = page.locator('.notice .alert')
    await expect(deleted).to_contain_text('Deleted')
    assert await deleted.evaluate(READS_IN_ORDER)
    [question] = questions  # the dialog's text is a string: the title between isolates
    assert question.startswith(f'Delete the conversation “\u2068{RLO}abc') and '\u2069”? Its messages' in question


CONTRAST = """() => {
  // What falls short of WCAG's contrast on screen: a control's border against what is behind it (1.4.11: 3:1), and
  // text against its background (1.4.3: 4.5:1, 3:1 when large); disabled controls are exempt. And how many controls.
  const rgb = (color) => color.match(/[\\d.]+/g).slice(0, 3).map(Number);
  const luminance = (color) => {
    const linear = (v) => (v / 255 <= 0.03928 ? v / 255 / 12.92 : ((v / 255 + 0.055) / 1.055) ** 2.4);
    const [r, g, b] = rgb(color).map(linear);
    return 0.2126 * r + 0.7152 * g + 0.0722 * b;
  };
  const behind = (element) => {
    for (let e = element; e; e = e.parentElement) {
      const color = getComputedStyle(e).backgroundColor;
      if (!/rgba\\(.*, 0\\)$/.test(color) && color !== 'transparent') return color;
    }
    return 'rgb(255, 255, 255)';
  };
  const ratio = (one, two) => {
    const [a, b] = [luminance(one), luminance(two)].sort((x, y) => y - x);
    return Math.round(((a + 0.05) / (b + 0.05)) * 100) / 100;
  };
  const shown = [...document.querySelectorAll('body *')].filter((e) => e.offsetParent && !e.closest(':disabled'));
  const controls = shown.filter((e) => e.matches('input, select, textarea'));
  const short = controls
    .map((e) => [e.id || e.name, ratio(getComputedStyle(e).borderTopColor, behind(e.parentElement))])
    .filter(([, r]) => r < 3);
  for (const e of shown) {
    if (![...e.childNodes].some((node) => node.nodeType === Node.TEXT_NODE && node.data.trim())) continue;
    const style = getComputedStyle(e);
    const size = parseFloat(style.fontSize);
    const large = size >= 24 || (size >= 18.66 && Number(style.fontWeight) >= 700);
    const r = ratio(style.color, behind(e));
    if (r < (large ? 3 : 4.5)) short.push([`${e.tagName}.${e.className} “${e.textContent.trim().slice(0, 20)}”`, r]);
  }
  return { controls: controls.length, short };
}"""


async def test_the_controls_stand_out_and_the_chat_fits_320_pixels(page: Page, site: str) -> None:
    # The message box's border was #8c959f on the page's #f5f6f8: 2.8:1, under the 3:1 a control's edge needs.
    turn = await _send(page, 'first question')
    await expect(turn).to_have_attribute('data-state', 'done')
    for where in ('#/chat', '#/audit'):
        await page.goto(f'{site}/{where}')
        await expect(page.locator('textarea, tbody tr').first).to_be_visible()
        contrast = await page.evaluate(CONTRAST)
        assert contrast['controls'] and contrast['short'] == [], contrast
    # The narrowest phone: a long unbroken message and its answer fit without sideways scrolling.
    await page.set_viewport_size({'width': 320, 'height': 640})
    await page.goto(f'{site}/#/chat/new')
    turn = await _send(page, 'x' * 400)
    await expect(turn).to_have_attribute('data-state', 'done')
    for where in ('#/chat', '#/conversations'):
        await page.goto(f'{site}/{where}')
        await expect(page.locator('h1')).to_be_visible()
        assert await page.evaluate('document.documentElement.scrollWidth') <= 320


async def test_the_conversation_on_screen_deleted_from_the_list_leaves_the_chat(page: Page) -> None:
    # The chat went on showing it, and the next message started a new conversation of the same id below messages the
    # model no longer had (a reload showed only the new turn).
    turn = await _send(page, 'first question')
    await expect(turn).to_have_attribute('data-state', 'done')
    conversation = page.url.split('#/chat/', 1)[1]
    await page.get_by_role('link', name='Conversations', exact=True).click()
    page.once('dialog', lambda dialog: dialog.accept())
    await page.locator(f'li[data-conversation-id="{conversation}"]').get_by_role('button', name='Delete').click()
    await expect(page.locator('.notice .alert')).to_contain_text('Deleted')
    await page.get_by_role('link', name='Chat', exact=True).click()
    await expect(page.locator('.notice .alert')).to_have_text(
        'The conversation shown here was deleted: this is a new one.'
    )
    await expect(page.locator('.message')).to_have_count(0)
    await expect(page.get_by_role('heading', level=1)).to_have_text('New conversation')
    turn = await _send(page, 'second question')
    await expect(turn).to_have_attribute('data-state', 'done')
    assert page.url.split('#/chat/', 1)[1] != conversation


async def test_an_answer_streaming_behind_another_view_leaves_its_scroll_alone(page: Page, site: str) -> None:
    # Each piece of an answer that came while another view was shown scrolled that view to its bottom, when it was
    # near it: the chat followed its answer in a page that was not its own.
    drip_more.clear()
    turn = await _send(page, DRIP)
    await expect(turn.locator('.answer')).to_have_text('ok')
    await page.set_viewport_size({'width': 1280, 'height': 300})
    await page.get_by_role('link', name='Costs', exact=True).click()
    await expect(page.locator('.totals')).to_be_visible()
    reading = await page.evaluate('document.documentElement.scrollHeight - window.innerHeight - 100')
    assert reading > 0
    await page.evaluate(f'window.scrollTo(0, {reading})')
    drip_more.set()
    # A fetch's resource timing entry is written once its body has been read to the end: the answer is all in (polled
    # from here: the page's CSP refuses playwright's wait_for_function, which evaluates a string).
    answered = "performance.getEntriesByType('resource').some(e => e.name.endsWith('/api/v1/chat'))"
    for _ in range(1500):
        if await page.evaluate(answered):
            break
        await asyncio.sleep(0.01)
    assert await page.evaluate('window.scrollY') == reading
    await page.get_by_role('link', name='Chat', exact=True).click()
    await expect(turn.locator('.answer')).to_have_text('ok and more')


async def test_shift_enter_starts_a_line_and_enter_sends_both(page: Page) -> None:
    box = page.get_by_role('textbox', name='Message')
    await expect(box).to_be_focused()
    await box.type('line one')
    await box.press('Shift+Enter')
    await box.type('line two')
    await expect(box).to_have_value('line one\nline two')
    await expect(page.locator('.message')).to_have_count(0)
    await box.press('Enter')
    await expect(page.locator('.message.assistant')).to_have_attribute('data-state', 'done')
    await expect(page.locator('.message.user .text')).to_have_text('line one\nline two')
    await expect(box).to_be_focused()
    await expect(page.get_by_role('log', name='Messages')).to_contain_text('line two')


async def _answered_with(page: Page, events: list[dict[str, Any]]) -> Any:
    """Send "search", answered with the stream of `events` and its end (not the server's): the assistant turn, done."""

    async def answer(route: Route) -> None:
        stream = ''.join(f'data: {json.dumps(event)}\n\n' for event in events) + 'data: [DONE]\n\n'
        await route.fulfill(status=200, content_type='text/event-stream', body=stream)

    await page.route('**/api/v1/chat', answer)
    turn = await _send(page, 'search')
    await expect(turn).to_have_attribute('data-state', 'done')
    return turn


def _answer_cut_off_after(delta: str) -> Callable[[Route], Awaitable[None]]:
    """A route handler answering the chat with a stream cut off after its first text `delta` (no finish, no end)."""

    async def cut_off(route: Route) -> None:
        events = [
            {'type': 'start'},
            {'type': 'text-start', 'id': 't1'},
            {'type': 'text-delta', 'id': 't1', 'delta': delta},
        ]
        await route.fulfill(
            status=200, content_type='text/event-stream', body=''.join(f'data: {json.dumps(e)}\n\n' for e in events)
        )

    return cut_off


async def test_a_conversation_that_cannot_be_shown_again_stays_on_screen_until_it_can(page: Page) -> None:
    # After an answer cut off, the next message first shows the conversation as the server holds it. With the server
    # still away, that wiped the conversation off the screen, and once it was back the message went out without it:
    # the history shown was never loaded again (a reload showed it).
    turn = await _send(page, 'first question')
    await expect(turn).to_have_attribute('data-state', 'done')

    cut_off = _answer_cut_off_after('Hal')

    async def away(route: Route) -> None:
        await route.abort('connectionrefused')

    await page.route('**/api/v1/chat', cut_off)
    turn = await _send(page, 'second question')
    await expect(turn).to_contain_text('connection was lost')
    await page.unroute('**/api/v1/chat')
    await page.route('**/api/v1/**', away)
    box = page.get_by_role('textbox', name='Message')
    await box.press('Enter')
    await expect(page.locator('.notice .alert')).to_contain_text('The server cannot be reached')
    await expect(page.locator('.message.user').first).to_have_text('Youfirst question')
    await expect(box).to_have_value('second question')
    await page.unroute('**/api/v1/**')
    await box.press('Enter')
    await expect(page.locator('.message.user')).to_have_text(['Youfirst question', 'Yousecond question'])
    await expect(page.locator('.message.assistant').last).to_have_attribute('data-state', 'done')


async def test_the_browser_going_offline_while_an_answer_comes_says_so(page: Page) -> None:
    # The answer stopped coming and the page said "Working…" for as long as the connection was not closed: nothing
    # told that the browser had lost its network.
    drip_more.clear()
    turn = await _send(page, DRIP)
    await expect(turn.locator('.answer')).to_have_text('ok')
    await page.context.set_offline(True)
    offline = page.locator('.notice .alert')
    await expect(offline).to_contain_text('This browser is offline: the rest of the answer cannot arrive')
    await page.context.set_offline(False)
    await expect(offline).to_have_count(0)
    drip_more.set()
    await expect(turn).to_have_attribute('data-state', 'done')
    await expect(turn.locator('.answer')).to_have_text('ok and more')


async def test_a_reload_gives_back_a_message_that_repeats_the_one_before(page: Page) -> None:
    # The page took the message for saved when the conversation's last user message had its text: "continue" sent
    # again, reloaded while its answer came, was lost (box empty, no notice), though its turn was cancelled (qa168).
    drip_more.set()
    turn = await _send(page, DRIP)
    await expect(turn).to_have_attribute('data-state', 'done')
    drip_more.clear()
    turn = await _send(page, DRIP)
    await expect(turn.locator('.answer')).to_have_text('ok')
    await page.reload()
    await expect(page.get_by_role('textbox', name='Message')).to_have_value(DRIP)
    await expect(page.locator('.notice')).to_contain_text('was not answered before you left')
    await expect(page.locator('.message.user')).to_have_count(1)
    drip_more.set()


async def test_a_message_cut_off_by_leaving_comes_back_after_a_turn_in_another_conversation(page: Page) -> None:
    # The page kept one message for the whole tab: a message sent in the conversation opened next took its place, and
    # that turn's end forgot it. The first conversation, shown again, gave nothing back (qa168).
    turn = await _send(page, 'a first question here')
    await expect(turn).to_have_attribute('data-state', 'done')
    here = page.url
    drip_more.clear()
    turn = await _send(page, f'a second question, {DRIP}')
    await expect(turn.locator('.answer')).to_have_text('ok')
    await page.get_by_role('link', name='New chat').click()  # cancels the turn: its message waits for this chat
    await expect(page.locator('.message')).to_have_count(0)
    turn = await _send(page, 'a question elsewhere')
    await expect(turn).to_have_attribute('data-state', 'done')
    drip_more.set()
    await page.goto(here)
    await expect(page.get_by_role('textbox', name='Message')).to_have_value(f'a second question, {DRIP}')
    await expect(page.locator('.notice')).to_contain_text('was not answered before you left')
    await expect(page.locator('.message.user')).to_have_text(['Youa first question here'])


async def test_a_message_given_back_after_a_reload_comes_back_after_another_until_sent(page: Page) -> None:
    # Given back, the message was forgotten: one more reload (an accidental F5) lost it for good (qa175). It stays
    # until it is sent, or the box emptied.
    drip_more.clear()
    turn = await _send(page, f'reloaded twice, {DRIP}')
    await expect(turn.locator('.answer')).to_have_text('ok')
    box = page.get_by_role('textbox', name='Message')
    for _ in range(2):
        await page.reload()
        await expect(box).to_have_value(f'reloaded twice, {DRIP}')
        await expect(page.locator('.notice')).to_contain_text('was not answered before you left')
    drip_more.set()
    await box.fill('')
    await page.reload()
    await expect(page.locator('.notice')).to_contain_text('no saved messages yet')
    await expect(box).to_have_value('')


async def test_text_in_the_box_stays_with_the_conversation_it_was_typed_in(page: Page) -> None:
    # The box kept its text as another conversation opened: a message given back there found it taken and was lost,
    # under a notice saying it was back in the box, and Enter sent the text to the conversation opened (qa175).
    drip_more.clear()
    turn = await _send(page, f'cut off, {DRIP}')
    await expect(turn.locator('.answer')).to_have_text('ok')
    here = page.url
    await page.get_by_role('link', name='New chat').click()  # cancels the turn: its message waits for its conversation
    await expect(page.locator('.message')).to_have_count(0)
    box = page.get_by_role('textbox', name='Message')
    await box.fill('a draft of a new chat')
    drip_more.set()
    await page.goto(here)
    await expect(box).to_have_value(f'cut off, {DRIP}')
    await expect(page.locator('.notice')).to_contain_text('was not answered before you left')
    await page.get_by_role('link', name='New chat').click()
    await expect(box).to_have_value('a draft of a new chat')
    await expect(page.locator('.notice')).to_contain_text('What you were typing here when you left')
    await page.goto(here)
    await expect(box).to_have_value(f'cut off, {DRIP}')


async def test_the_chat_heading_is_cut_between_characters_and_the_servers_title_is_shown_as_it_is(
    page: Page, site: str, keys: Keys
) -> None:
    # The heading was cut at 80 UTF-16 units, an emoji split in two (its half a broken character), and so was the
    # server's title, already cut at 80 code points: it differed from the one Conversations lists (qa168).
    emoji = '\U0001f600'
    await _send(page, 'a' * 78 + emoji + ' Cardiologists in Seattle')
    await expect(page.locator('#chat-title')).to_have_text('a' * 78 + emoji + '…')
    async with httpx2.AsyncClient(base_url=site, timeout=30) as client:
        made = await client.post(
            '/api/v1/conversations/emoji-title/turns',
            json={'message': emoji * 45 + ' Cardiologists in Seattle'},
            headers=auth(keys.acme),
        )
        assert made.status_code == 200, made.text
        await get_supervisor().join()  # its title is made after the turn
        read = await client.get('/api/v1/conversations/emoji-title?format=vercel', headers=auth(keys.acme))
    title = read.json()['title']
    assert title == emoji * 45 + ' Cardiologists in Seattle'  # 70 code points: not cut
    await page.goto(f'{site}/#/chat/emoji-title')
    await expect(page.locator('.message.user')).to_have_count(1)
    await expect(page.locator('#chat-title')).to_have_text(title)


async def test_the_costs_call_requests_without_a_cost_so_not_requests_of_unpriced_models(page: Page, site: str) -> None:
    # `unpriced` counts every request without a cost, a priced model's failures before any usage and cancellations
    # too: the page called them all "requests of unpriced models", and a priced model's "(+34 unpriced)" (qa168).
    today = datetime.now(UTC).date().isoformat()
    counts = {'requests': 50, 'failed': 20, 'cancelled': 14, 'input_tokens': 210, 'output_tokens': 840}
    priced = {**counts, 'total_tokens': 1050, 'total_cost': '0.00054', 'unpriced': 34}
    none = {
        **counts,
        'requests': 3,
        'failed': 3,
        'cancelled': 0,
        'total_tokens': 1050,
        'total_cost': None,
        'unpriced': 3,
    }

    async def costs(route: Route) -> None:
        by = route.request.url.split('by=', 1)[1].split('&', 1)[0]
        items = {
            'day': [{'key': today, **priced}],
            'model': [{'key': 'gpt-4o-mini', **priced}, {'key': 'gone-model', **none}],
            'agent': [{'key': 'helper', **priced}],
        }[by]
        await route.fulfill(json={'by': by, 'source': 'rollup', 'items': items})

    await page.route('**/api/v1/costs?*', costs)
    await page.goto(f'{site}/#/costs')
    totals = page.locator('p.totals')
    # Cancellations too, as README and the API's schema say: "failures" alone, beside "(20 failed, 14 cancelled)", left
    # them out (qa175).
    await expect(totals).to_contain_text(
        '34 requests without a cost (unpriced models, failures or cancellations before any usage)'
    )
    await expect(totals).not_to_contain_text('of unpriced models')
    await expect(page.locator('tr[data-key="gpt-4o-mini"] td').last).to_have_text('$0.00054 (+34 without a cost)')
    await expect(page.locator('tr[data-key="gone-model"] td').last).to_have_text('no cost')


async def test_a_stored_answer_cut_off_by_the_output_limit_says_so_when_shown_again(page: Page, site: str) -> None:
    # Said live only (the stream's finish event): a reload showed the truncated answer as a whole one (qa168).
    await _store(
        'cut-short',
        [
            ModelRequest.user_text_prompt('Cardiologists in Seattle'),
            ModelResponse(parts=[TextPart('The cardiologists are Dr')], finish_reason='length'),
            ModelRequest.user_text_prompt('and in Boston?'),
            ModelResponse(parts=[TextPart('None found.')], finish_reason='stop'),
        ],
    )
    await page.goto(f'{site}/#/chat/cut-short')
    answers = page.locator('.message.assistant')
    await expect(answers).to_have_count(2)
    await expect(answers.first.locator('.outcome')).to_have_text(
        "The answer was cut off by the model's output limit (max_tokens); it is saved as it is."
    )
    await expect(answers.last.locator('.outcome')).to_have_text('')


async def test_the_chat_shown_again_after_another_view_is_where_the_reader_left_it(
    page: Page, site: str, keys: Keys
) -> None:
    # It kept the other view's scroll position (the top, for a short one): the chat came back at its oldest messages.
    async with httpx2.AsyncClient(base_url=site, timeout=30) as client:
        for number in range(8):
            made = await client.post(
                '/api/v1/conversations/scrolled/turns', json={'message': f'Question {number}'}, headers=auth(keys.acme)
            )
            assert made.status_code == 200, made.text
    await page.set_viewport_size({'width': 1280, 'height': 400})
    await page.goto(f'{site}/#/chat/scrolled')
    await expect(page.locator('.message.user')).to_have_count(8)
    at_end = 'window.innerHeight + window.scrollY >= document.documentElement.scrollHeight - 2'
    for reading in (None, 150):  # at its end, then further up
        if reading is not None:
            await page.evaluate(f'window.scrollTo(0, {reading})')
        await page.get_by_role('link', name='Costs', exact=True).click()
        await expect(page.locator('.totals')).to_be_visible()
        await page.get_by_role('link', name='Chat', exact=True).click()
        await expect(page.get_by_role('textbox', name='Message')).to_be_focused()
        if reading is None:
            assert await page.evaluate(at_end)
        else:
            assert await page.evaluate('window.scrollY') == reading


async def _store_long_conversation(conversation_id: str, turns: int) -> list[str]:
    """A conversation of acme's with `turns` turns of 4 messages (a question, a tool call, its result, an answer),
    written in one statement (running that many turns would take minutes); the questions, in order."""
    from pydantic_ai.conversation_store import ConversationEntry, ConversationRecord
    from pydantic_ai.messages import ModelRequest, ToolCallPart, ToolReturnPart, UserPromptPart

    from agentrt.services.conversations import PostgresConversationStore
    from tests.agents.conftest import account_id

    questions = [f'question {n}' for n in range(turns)]
    entries: list[ConversationEntry] = []
    for n, question in enumerate(questions):
        for message in (
            ModelRequest(parts=[UserPromptPart(question)]),
            ModelResponse(parts=[ToolCallPart('search_directory', {'q': n}, tool_call_id=f'call-{n}')]),
            ModelRequest(parts=[ToolReturnPart('search_directory', [n], tool_call_id=f'call-{n}')]),
            ModelResponse(parts=[TextPart(f'answer {n}')]),
        ):
            entries.append(ConversationEntry(parent_id=entries[-1].id if entries else None, message=message))
    store = PostgresConversationStore(await account_id('acme-health'))
    record = ConversationRecord(conversation_id=conversation_id, head_id=entries[-1].id)
    await store.write_record(record, new_entries=entries, expected_revision=None)
    return questions


async def test_older_messages_load_above_by_keyboard_keeping_the_place_read(page: Page, site: str) -> None:
    # The chat showed a long conversation's latest 600 messages and said older ones were left out, with no way to read
    # them. "Show older messages" loads the 600 before, above, each tool call on the page of its result.
    questions = await _store_long_conversation('long-history', 320)  # 1,280 messages: 3 pages
    await page.goto(f'{site}/#/chat/long-history')
    users = page.locator('.message.user')
    await expect(users).to_have_count(150)
    await expect(users.first).to_have_text(f'You{questions[170]}')
    button = page.get_by_role('button', name='Show older messages')
    top = 'element => element.getBoundingClientRect().top'
    for before, shown, first in ((150, 300, 20), (300, 320, 0)):
        # The reader's place: the message first on screen stays where it was as the page goes in above it.
        await button.focus()
        at = await users.first.evaluate(top)
        await page.keyboard.press('Enter')
        await expect(users).to_have_count(shown)
        await expect(users.first).to_have_text(f'You{questions[first]}')
        assert await users.nth(shown - before).evaluate(top) == pytest.approx(at, abs=2)
    await expect(button).to_be_hidden()
    await expect(page.locator('.older-status')).to_be_hidden()  # its parent went with the button
    await expect(page.locator('#chat-title')).to_be_focused()  # not the start of the page
    await expect(page.locator('#chat-title')).to_have_text(questions[0])
    # Every turn once, in order, each with its one tool call.
    await expect(users).to_have_text([f'You{question}' for question in questions])
    await expect(page.locator('.message.assistant')).to_have_count(320)


async def test_a_key_that_may_chat_but_not_read_continues_a_conversation_it_cannot_show(
    page: Page, site: str, keys: Keys
) -> None:
    # With a `--scope chat` key, a conversation opened again (a reload, a link) could not be loaded (403), which marked
    # it stale: every message then waited for a load that could not succeed, and Send did nothing at all (QA).
    await page.get_by_role('button', name='Sign out').click()
    await _sign_in(page, keys.acme_chat_only)
    turn = await _send(page, 'first question')
    await expect(turn).to_have_attribute('data-state', 'done')
    conversation = page.url.split('#/chat/', 1)[1]
    await page.reload()
    await expect(page.locator('.notice')).to_contain_text('Earlier messages cannot be shown here')
    await expect(page.locator('.notice')).to_contain_text("does not have the 'read' scope")
    # Not called new, and no way offered to what the key may not read: the audit link, the other views.
    await expect(page.locator('#chat-title')).to_have_text('Conversation')
    await expect(page.get_by_role('link', name='Its requests')).to_be_hidden()
    for view in ('Conversations', 'Audit', 'Costs'):
        await expect(page.get_by_role('navigation').get_by_role('link', name=view)).to_be_hidden()
    await expect(page.get_by_role('navigation').get_by_role('link', name='Chat')).to_be_visible()
    turn = await _send(page, 'second question')
    await expect(turn).to_have_attribute('data-state', 'done')
    await expect(page.get_by_role('textbox', name='Message')).to_have_value('')
    stored = await PostgresConversationStore(await account_id('acme-health')).load(conversation)
    assert stored is not None
    asked = [part.content for m in stored.messages for part in m.parts if isinstance(part, UserPromptPart)]
    assert asked == ['first question', 'second question'], 'both turns were saved in the one conversation'


async def test_a_key_that_may_read_but_not_chat_lands_on_its_conversations(page: Page, keys: Keys) -> None:
    # It landed on a chat whose message box took a message, refused only once sent, under a header naming a
    # conversation that did not exist (QA).
    await page.get_by_role('button', name='Sign out').click()
    await _sign_in(page, keys.acme_read_only)
    await expect(page.get_by_role('heading', level=1)).to_have_text('Conversations')
    navigation = page.get_by_role('navigation')
    await expect(navigation.get_by_role('link', name='Chat')).to_be_hidden()
    await expect(navigation.get_by_role('link', name='Audit')).to_be_visible()
    await page.goto(page.url.split('#', 1)[0] + '#/chat/some-conversation')  # a conversation's address: to read
    await expect(page.locator('.notice')).to_contain_text("may read conversations but not chat (it has no 'chat'")
    await expect(page.get_by_role('button', name='Send')).to_be_disabled()


async def test_a_refused_first_message_leaves_the_chat_a_new_one(page: Page) -> None:
    # The id made for the new conversation stayed: the address and the header named a conversation nothing was saved
    # to, with an "Its requests" link to an empty audit (QA).
    box = page.get_by_role('textbox', name='Message')
    await box.fill('x' * 40_000)  # over the message limit: refused by the server before anything ran
    await box.press('Enter')
    await expect(page.get_by_role('alert')).to_contain_text('characters')
    await expect(box).to_have_value('x' * 40_000)
    assert page.url.endswith('#/chat/new'), page.url
    await expect(page.locator('#chat-title')).to_have_text('New conversation')
    await expect(page.locator('.conversation-id')).to_have_text('Not saved until its first message is sent.')
    await expect(page.get_by_role('link', name='Its requests')).to_be_hidden()


async def test_a_turn_saved_in_another_tab_is_shown_before_this_tabs_next_message(
    page: Page, browser: Browser, site: str, keys: Keys
) -> None:
    # Tab A never showed tab B's turn: A's next answer followed a question A never showed (QA). Before sending, A
    # asks the server whether the conversation is still at the revision it shows (a 304 when it is).
    turn = await _send(page, 'first question in tab A')
    await expect(turn).to_have_attribute('data-state', 'done')
    conversation = page.url.split('#/chat/', 1)[1]
    other = await browser.new_context(viewport={'width': 1280, 'height': 800})
    try:
        tab_b = await other.new_page()
        await tab_b.goto(f'{site}/#/chat/{conversation}')
        await _sign_in(tab_b, keys.acme)
        await expect(tab_b.locator('.message.user')).to_have_text(['Youfirst question in tab A'])
        answered = await _send(tab_b, 'a question from tab B')
        await expect(answered).to_have_attribute('data-state', 'done')
    finally:
        await other.close()
    await _send(page, 'and a second one in tab A')
    await expect(page.locator('.message.user')).to_have_text(
        ['Youfirst question in tab A', 'Youa question from tab B', 'Youand a second one in tab A']
    )
    await expect(page.locator('.message.assistant').last).to_have_attribute('data-state', 'done')
    stored = await PostgresConversationStore(await account_id('acme-health')).load(conversation)
    assert stored is not None
    asked = [part.content for m in stored.messages for part in m.parts if isinstance(part, UserPromptPart)]
    assert asked == ['first question in tab A', 'a question from tab B', 'and a second one in tab A']


DELETED_NOT_SENT = (
    'The conversation shown here was deleted: this is a new one. '
    'Your message was not sent: it is in the box, to start it with.'
)


async def _delete(site: str, key: str, conversation: str) -> None:
    """Delete `conversation` as another client would (another tab, the CLI)."""
    async with httpx2.AsyncClient(base_url=site, timeout=30) as client:
        gone = await client.delete(f'/api/v1/conversations/{conversation}', headers=auth(key))
        assert gone.status_code == 204, gone.text


async def _not_sent(page: Page, conversation: str, text: str) -> None:
    """The chat is a new one, saying why, with `text` in its box; `conversation` was not started again."""
    await expect(page.locator('.notice .alert')).to_have_text(DELETED_NOT_SENT)
    await expect(page.locator('.message')).to_have_count(0)
    await expect(page.get_by_role('textbox', name='Message')).to_have_value(text)
    await expect(page.locator('#chat-title')).to_have_text('New conversation')
    assert page.url.endswith('#/chat/new'), page.url
    assert await PostgresConversationStore(await account_id('acme-health')).load(conversation) is None


async def test_a_message_to_a_conversation_deleted_elsewhere_stays_unsent(page: Page, site: str, keys: Keys) -> None:
    # Another tab deleted the conversation shown here: the check before the next message took its 404 for "not
    # changed", and the message started a new conversation of the same id below turns the model no longer had (QA).
    turn = await _send(page, 'first question')
    await expect(turn).to_have_attribute('data-state', 'done')
    conversation = page.url.split('#/chat/', 1)[1]
    await page.reload()  # its entity tag read with its history (after a turn it is read a moment later)
    await expect(page.locator('.message.user')).to_have_text(['Youfirst question'])
    await _delete(site, keys.acme, conversation)
    await _send(page, 'second question')
    await _not_sent(page, conversation, 'second question')

    # The same after an answer cut off, where the conversation is shown again before the next message: its 404 was
    # taken for a conversation with no messages yet, and the message went.
    turn = await _send(page, 'third question')
    await expect(turn).to_have_attribute('data-state', 'done')
    conversation = page.url.split('#/chat/', 1)[1]

    cut_off = _answer_cut_off_after('H')

    await page.route('**/api/v1/chat', cut_off)
    turn = await _send(page, 'fourth question')
    await expect(turn).to_contain_text('connection was lost')
    await page.unroute('**/api/v1/chat')
    await _delete(site, keys.acme, conversation)
    await page.get_by_role('textbox', name='Message').press('Enter')  # the text given back when it was cut off
    await _not_sent(page, conversation, 'fourth question')

    # Deleted while its answer came (after the server saved the turn, before the browser read its end): the entity
    # tag read after the answer got a 404, taken for "unknown", so the next message was not checked at all (qa119).
    turn = await _send(page, 'fifth question')
    await expect(turn).to_have_attribute('data-state', 'done')
    conversation = page.url.split('#/chat/', 1)[1]

    async def deleted_meanwhile(route: Route) -> None:
        answered = await route.fetch()  # the server ran the turn and saved it
        body = await answered.body()
        await _delete(site, keys.acme, conversation)
        await route.fulfill(response=answered, body=body)

    async def slow_read(route: Route) -> None:  # a slow network: the read after the answer is not back yet
        await asyncio.sleep(1.5)
        await route.continue_()

    await page.route('**/api/v1/chat', deleted_meanwhile)
    await page.route('**/api/v1/conversations/*limit=1*', slow_read)
    turn = await _send(page, 'sixth question')
    await expect(turn).to_have_attribute('data-state', 'done')
    await page.unroute('**/api/v1/chat')
    await _send(page, 'seventh question')  # at once: it waited for that read (it was sent unchecked: qa125)
    await _not_sent(page, conversation, 'seventh question')
    await page.unroute('**/api/v1/conversations/*limit=1*')

    # Not found after its answer, then the check before the next message fails for a moment (a 503): it was taken for
    # "not changed" and the message sent (qa125). It waits, in the box; sent again, the check says it is gone.
    await page.get_by_role('textbox', name='Message').fill('')
    turn = await _send(page, 'eighth question')
    await expect(turn).to_have_attribute('data-state', 'done')
    conversation = page.url.split('#/chat/', 1)[1]
    await page.route('**/api/v1/chat', deleted_meanwhile)
    turn = await _send(page, 'ninth question')
    await expect(turn).to_have_attribute('data-state', 'done')
    await page.unroute('**/api/v1/chat')

    async def unavailable(route: Route) -> None:
        await route.fulfill(status=503, content_type='application/json', body='{"detail": "busy"}')

    await page.route('**/api/v1/conversations/*limit=600*', unavailable)
    await _send(page, 'tenth question')
    await expect(page.locator('.notice .alert')).to_contain_text('whether it still exists could not be checked')
    await expect(page.get_by_role('textbox', name='Message')).to_have_value('tenth question')
    assert await PostgresConversationStore(await account_id('acme-health')).load(conversation) is None
    await page.unroute('**/api/v1/conversations/*limit=600*')
    await page.get_by_role('textbox', name='Message').press('Enter')
    await _not_sent(page, conversation, 'tenth question')


async def test_stop_ends_the_wait_for_a_stalled_read_after_the_last_answer(page: Page) -> None:
    # A send waits for the read after its last answer (see above); that read stalled (a hung proxy), the send waited
    # with it and Stop did nothing until it came back, 40 s later (qa126). Stop ends the wait.
    turn = await _send(page, 'first question')
    await expect(turn).to_have_attribute('data-state', 'done')

    async def stalled(route: Route) -> None:
        await asyncio.sleep(20)
        with contextlib.suppress(Exception):  # the page may be gone by then
            await route.continue_()

    await page.route('**/api/v1/conversations/*limit=1*', stalled)
    turn = await _send(page, 'second question')
    await expect(turn).to_have_attribute('data-state', 'done')
    turn = await _send(page, 'third question')  # its read still stalled
    await page.get_by_role('button', name='Stop').click()
    await expect(turn).to_have_attribute('data-state', 'stopped', timeout=3_000)


BIDI_CONTROLS = [chr(code) for code in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))]
"""The embeddings, overrides and isolates: each reorders the text after it."""


async def _opened_panels(page: Page, rows: str) -> list[str]:
    """Open each of the folded rows `rows` (a selector of `<details>`) and give the text of every `<pre>` shown."""
    for row in await page.locator(rows).all():
        await row.locator('summary').first.click()
        await expect(row.locator('pre').first).not_to_be_empty()
    return await page.locator(f'{rows} pre').all_text_contents()


async def test_bidirectional_controls_in_a_tools_values_are_shown_as_escapes(page: Page, site: str) -> None:
    # A right-to-left override in a tool's input, output or error reversed the rest of its line in the opened panel
    # (`"query": "<RLO>evil",` showed as `,"live"`): the value shown was not the tool's. Shown as `\u202e` now.
    controls = ''.join(BIDI_CONTROLS)

    turn = await _answered_with(
        page,
        [
            {'type': 'start'},
            {
                'type': 'tool-input-available',
                'toolCallId': 't1',
                'toolName': 'search',
                'input': {'query': f'{RLO}evil'},
            },
            {'type': 'tool-output-available', 'toolCallId': 't1', 'output': {'found': f'{controls}abc'}},
            {'type': 'tool-input-available', 'toolCallId': 't2', 'toolName': 'lookup', 'input': f'{RLO}id'},
            {'type': 'tool-output-error', 'toolCallId': 't2', 'errorText': f'no such id: {RLO}abc'},
            {'type': 'finish'},
        ],
    )
    # The closed rows too: a string input, and a value among an object's (isolated, it still read "live").
    summaries = await turn.locator('.tool-args').all_text_contents()
    assert summaries == ['query: \u2068\\u202eevil\u2069', '\\u202eid'], summaries
    shown = await _opened_panels(page, '.tool details')
    assert shown == [
        '{\n  "query": "\\u202eevil"\n}',
        '{\n  "found": "\\u202a\\u202b\\u202c\\u202d\\u202e\\u2066\\u2067\\u2068\\u2069abc"\n}',
        '\\u202eid',
        'no such id: \\u202eabc',
    ], shown

    # The audit's stored prompt: a tool call's arguments, its result, a retry; a body cut at the size limit (not JSON).
    prompt = {
        'instructions': None,
        'messages': [
            {'kind': 'request', 'parts': [{'part_kind': 'user-prompt', 'content': 'search'}]},
            {
                'kind': 'response',
                'parts': [{'part_kind': 'tool-call', 'tool_name': 'search', 'args': f'{{"query": "{RLO}evil"}}'}],
            },
            {
                'kind': 'request',
                'parts': [
                    {'part_kind': 'tool-return', 'tool_name': 'search', 'content': {'found': f'{RLO}abc'}},
                    {'part_kind': 'retry-prompt', 'tool_name': 'lookup', 'content': f'no such id: {RLO}abc'},
                ],
            },
        ],
    }
    item = {
        'id': 'req-rtl', 'status': 'complete', 'started_at': '2026-12-01T10:00:00Z', 'model': 'quick',
        'response_model': None, 'agent': None, 'conversation_id': None, 'input_tokens': 1, 'output_tokens': 1,
        'total_cost': None, 'latency_ms': 1.0, 'ttft_ms': None, 'streamed': False, 'run_id': None,
        'error_type': None, 'error_message': None,
        'contents': [
            {'kind': 'prompt', 'body': json.dumps(prompt, ensure_ascii=False), 'size_bytes': 1, 'redactions': 0},
            {'kind': 'response', 'body': f'{{"parts": [{{"args": "{RLO}evil', 'size_bytes': 1, 'truncated': True},
        ],
    }  # fmt: skip

    async def stored(route: Route) -> None:
        await route.fulfill(status=200, content_type='application/json', body=json.dumps(item))

    await page.route('**/api/v1/llm-audit/interactions/req-rtl', stored)
    await page.goto(f'{site}/#/audit/req-rtl')
    await expect(page.locator('.content-response pre').first).to_have_text('{"parts": [{"args": "\\u202eevil')
    shown = [*await _opened_panels(page, '.tool-line'), *await _opened_panels(page, '.raw')]
    shown += await page.locator('.content pre').all_text_contents()
    assert len(shown) > 6
    for text in shown:
        assert not set(text) & set(BIDI_CONTROLS), text
    assert '"query": "\\u202eevil"' in shown[0] and '"found": "\\u202eabc"' in shown[1], shown
    assert 'no such id: \\u202eabc' in await page.locator('.content-prompt').inner_text()


async def test_a_large_body_cut_at_the_size_limit_opens_in_seconds_and_shows_all_when_asked(
    page: Page, site: str
) -> None:
    # A body cut at the size limit (not JSON) went whole into one `<pre>`: one line of megabytes (its newlines are `\n`
    # escapes), which Chromium took 40-205 s to lay out with emoji or CJK in it, the tab frozen (qa140). Its start is
    # shown now, broken at its `\n` escapes, and the rest when asked, a chunk at a time.
    row = '{"content": "' + ''.join(f'row {i} é😀 東京都 {RLO}x \\u001b[2J' + 'y' * 40 + '\\n' for i in range(14_000))
    body = row[:1_000_000]
    item = {
        'id': 'req-big', 'status': 'complete', 'started_at': '2026-12-01T10:00:00Z', 'model': 'quick',
        'response_model': None, 'agent': None, 'conversation_id': None, 'input_tokens': 1, 'output_tokens': 1,
        'total_cost': None, 'latency_ms': 1.0, 'ttft_ms': None, 'streamed': False, 'run_id': None,
        'error_type': None, 'error_message': None,
        'contents': [{'kind': 'response', 'body': body, 'size_bytes': len(body.encode()), 'truncated': True}],
    }  # fmt: skip

    async def stored(route: Route) -> None:
        await route.fulfill(status=200, content_type='application/json', body=json.dumps(item))

    await page.route('**/api/v1/llm-audit/interactions/req-big', stored)
    started = asyncio.get_running_loop().time()
    await page.goto(f'{site}/#/audit/req-big')
    shown = page.locator('.content-response pre').first
    await expect(shown).to_contain_text('row 0 é😀 東京都 \\u202ex \\u001b[2J')
    await page.evaluate('() => new Promise((done) => requestAnimationFrame(() => setTimeout(done)))')
    assert asyncio.get_running_loop().time() - started < 5
    lines = (await shown.text_content() or '').split('\n')
    assert lines[0].startswith('{"content": "row 0 ') and lines[0].endswith('\\n'), lines[0][:80]
    assert 60_000 < sum(len(line) + 1 for line in lines) <= 64 * 1024, len(lines)  # UTF-16 units in the page

    button = page.locator('.content-response').get_by_role(
        'button', name=f'Show all ({len(body.encode()) / 1e6:.1f} MB)'
    )
    await button.click()
    await expect(page.locator('.content-response button')).to_have_count(0, timeout=30_000)  # all shown
    everything = (await shown.text_content() or '').replace('\n', '')
    assert everything == body.replace(RLO, '\\u202e')


async def test_a_model_name_with_a_right_to_left_override_is_isolated(page: Page, site: str) -> None:
    # A provider's response model name with U+202E mirrored the closing parenthesis of the audit's Model cell
    # (`mock (<img …>(`), and a model's name read reversed in the costs table (qa140): each is in a <bdi> now.
    response_model = f'{RLO}<img src=x>'
    item = {
        'id': 'req-model', 'status': 'complete', 'started_at': '2026-12-01T10:00:00Z', 'model': 'mock',
        'response_model': response_model, 'agent': None, 'conversation_id': None, 'input_tokens': 1,
        'output_tokens': 1, 'total_cost': None, 'latency_ms': 1.0, 'ttft_ms': None, 'streamed': False,
        'run_id': None, 'error_type': None, 'error_message': None, 'contents': [],
    }  # fmt: skip

    async def stored(route: Route) -> None:
        await route.fulfill(status=200, content_type='application/json', body=json.dumps(item))

    await page.route('**/api/v1/llm-audit/interactions/req-model', stored)
    await page.goto(f'{site}/#/audit/req-model')
    model = page.locator('dd').nth(1)
    await expect(model).to_have_text(f'mock ({response_model})')
    assert await model.locator('bdi').all_text_contents() == ['mock', response_model]

    async def by_model(route: Route) -> None:
        costs = json.loads((await (await route.fetch()).body()).decode())
        costs['items'] = [
            {'key': f'gpt{RLO}-4o', 'requests': 1, 'failed': 0, 'cancelled': 0, 'input_tokens': 1,
             'output_tokens': 1, 'total_cost': None, 'unpriced': 1},
        ]  # fmt: skip
        await route.fulfill(status=200, content_type='application/json', body=json.dumps(costs))

    await page.route('**/api/v1/costs?*by=model*', by_model)
    await page.goto(f'{site}/#/costs')
    row = page.locator('tbody tr[data-key="gpt\u202e-4o"] th')
    await expect(row).to_have_text(f'gpt{RLO}-4o')
    assert await row.locator('bdi').all_text_contents() == [f'gpt{RLO}-4o']


async def test_bidirectional_controls_in_a_tools_name_and_its_arguments_keys_are_shown_as_escapes(page: Page) -> None:
    # Values were escaped in the closed rows, keys and names not: a model names a dict's keys, and `{RLO}key: value,
    # n: 481` read "481 :n ,value :yek" (qa125).
    turn = await _answered_with(
        page,
        [
            {'type': 'start'},
            {'type': 'tool-input-available', 'toolCallId': 't1', 'toolName': 'lookup', 'input': {f'{RLO}key': 'v'}},
            {'type': 'tool-output-available', 'toolCallId': 't1', 'output': 'ok'},
            {'type': 'tool-input-available', 'toolCallId': 't2', 'toolName': f'{RLO}toolname', 'input': {}},
            {'type': 'tool-output-available', 'toolCallId': 't2', 'output': 'ok'},
            {'type': 'finish'},
        ],
    )
    assert await turn.locator('.tool-args').first.text_content() == '\\u202ekey: \u2068v\u2069'
    assert await turn.locator('.tool-name').all_text_contents() == ['lookup', '\\u202etoolname']


STATUS_FITS = """(row, texts) => {
  // Each of `texts` as the status of tool row `row`: those that do not show whole, on one line, inside the box of
  // the tool calls.
  const status = row.querySelector('.tool-status');
  const box = row.closest('.tools').getBoundingClientRect();
  const line = parseFloat(getComputedStyle(status).lineHeight);
  return texts.filter((text) => {
    status.textContent = text;
    const shown = status.getBoundingClientRect();
    return status.scrollWidth > status.clientWidth || shown.right > box.right || shown.height > line * 1.5;
  });
}"""


async def test_a_tools_status_fits_its_row(page: Page) -> None:
    # "failed after 12.30 s" (in bold) was wider than the last column of the tool rows at 1280 px: it ran over the
    # right edge of their box.
    turn = await _answered_with(
        page,
        [
            {'type': 'start'},
            {'type': 'tool-input-available', 'toolCallId': 't1', 'toolName': 'search', 'input': {'q': 'x' * 200}},
            {'type': 'tool-output-error', 'toolCallId': 't1', 'errorText': 'failed'},
            {'type': 'tool-input-available', 'toolCallId': 't2', 'toolName': 'search', 'input': {'q': 'y' * 200}},
            {'type': 'finish'},  # t2 never ends: stopped
        ],
    )
    durations = ['999 ms', '12.30 s', '999.99 s']
    for state, words in (('error', 'failed after'), ('stopped', 'stopped after')):
        row = turn.locator(f'.tool[data-state="{state}"]')
        await expect(row.locator('.tool-status')).to_contain_text(words)
        assert await row.evaluate(STATUS_FITS, [f'{words} {took}' for took in durations]) == []
    # At a tablet's width the status column gives back what the arguments had: 10.5rem there left them 73 px
    # (`entry_id: 481` cut to `entry_id:…`; qa119).
    await page.set_viewport_size({'width': 768, 'height': 900})
    args = await turn.locator('.tool-args').first.evaluate('node => node.getBoundingClientRect().width')
    assert args >= 110, args
    # There a long status takes two lines, inside the box.
    inside = """row => row.querySelector('.tool-status').getBoundingClientRect().right
                       <= row.closest('.tools').getBoundingClientRect().right"""
    assert await turn.locator('.tool[data-state="error"]').evaluate(inside)
