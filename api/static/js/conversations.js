// The conversations of the account (GET /conversations), newest first, with their titles and summaries; open one to
// continue it in the chat, or delete it. The API's default order, by when each began: "Show more" lists each once,
// where by the last update a conversation continued in another tab meanwhile would move ahead and be left out.

import { errorMessage, getJson, remove } from './api.js';
import { alertBox, formatInt, h, isolate, timeEl } from './dom.js';

const PAGE = 20;

export async function conversationsView() {
  const title = h('h1', { id: 'conversations-title', tabindex: '-1', text: 'Conversations' });
  const notice = h('div', { class: 'notice' });
  const list = h('ul', { class: 'cards conversation-list', 'aria-labelledby': 'conversations-title' });
  const more = h('button', { type: 'button', class: 'secondary', text: 'Show more', hidden: true });
  const element = h(
    'section',
    { class: 'view', 'aria-labelledby': 'conversations-title' },
    h(
      'div',
      { class: 'view-head' },
      h('div', {}, title, h('p', { class: 'subtle', text: 'Newest first. Open one to continue it.' })),
      h('div', { class: 'head-actions' }, h('a', { class: 'button', href: '#/chat/new', text: 'New chat' })),
    ),
    notice,
    list,
    more,
  );
  let cursor = null;

  function card(item) {
    const usage = item.usage;
    const remover = h('button', { type: 'button', class: 'secondary danger', text: 'Delete' });
    const name = item.title || item.conversation_id;
    remover.setAttribute('aria-label', `Delete “${isolate(name)}”`);
    const li = h(
      'li',
      { class: 'card', dataset: { conversationId: item.conversation_id } },
      h('h2', {}, h('a', { href: `#/chat/${encodeURIComponent(item.conversation_id)}`, text: name })),
      h('p', { class: 'summary', text: item.summary || 'No summary yet: it is written after each turn.' }),
      h(
        'p',
        { class: 'subtle meta' },
        'Updated ',
        timeEl(item.updated_at),
        ` · ${formatInt(usage.requests)} model requests · ${formatInt(usage.tool_calls)} tool calls · `,
        // Requests whose usage was never measured: the count is a floor, not the total (it read as a measured 0).
        usage.unmeasured_requests
          ? `at least ${formatInt(usage.input_tokens + usage.output_tokens)} tokens (${formatInt(usage.unmeasured_requests)} ${usage.unmeasured_requests === 1 ? 'request' : 'requests'} unmeasured)`
          : `${formatInt(usage.input_tokens + usage.output_tokens)} tokens`,
      ),
      h('div', { class: 'card-actions' }, remover),
    );
    remover.addEventListener('click', async () => {
      if (!window.confirm(`Delete the conversation “${isolate(name)}”? Its messages are removed; its audit rows stay.`)) return;
      notice.replaceChildren();
      const hadFocus = document.activeElement === remover; // before it is disabled, which drops the focus
      remover.disabled = true;
      try {
        await remove(`/conversations/${encodeURIComponent(item.conversation_id)}`);
        // The focus was on the button, disabled and gone with its card (it fell to the start of the page): the next
        // conversation, else the one before, else the heading, where a keyboard user goes on.
        const next = (li.nextElementSibling || li.previousElementSibling)?.querySelector('a') || title;
        li.remove();
        if (hadFocus) next.focus();
        // The chat view may still show it: it empties itself (chat.js), rather than go on as if it were still there.
        window.dispatchEvent(new CustomEvent('agentrt:conversation-deleted', { detail: item.conversation_id }));
        notice.append(alertBox(['Deleted “', h('bdi', { text: name }), '”.'], 'info'));
        if (!list.childElementCount) list.replaceWith(emptyState());
      } catch (error) {
        remover.disabled = false;
        if (hadFocus) remover.focus();
        notice.append(alertBox(errorMessage(error)));
      }
    });
    return li;
  }

  function emptyState() {
    return h(
      'div',
      { class: 'empty' },
      h('p', {}, 'No conversations yet. ', h('a', { href: '#/chat/new', text: 'Start one in the chat' }), '.'),
    );
  }

  async function load() {
    // A keyboard user who pressed "Show more" goes on from the first new conversation (the button, disabled while
    // loading and then perhaps hidden, would drop the focus to the page's start).
    const fromButton = document.activeElement === more;
    more.disabled = true;
    try {
      const page = await getJson('/conversations', { limit: PAGE, cursor });
      const cards = page.items.map(card);
      list.append(...cards);
      if (fromButton && cards.length) cards[0].querySelector('a').focus();
      cursor = page.next_cursor;
      more.hidden = !cursor;
      if (!list.childElementCount) list.replaceWith(emptyState());
    } catch (error) {
      notice.append(alertBox(`The conversations could not be loaded. ${errorMessage(error)}`));
    } finally {
      more.disabled = false;
    }
  }

  more.addEventListener('click', load);
  await load();
  return { element, title: 'Conversations', focus: () => title.focus() };
}
