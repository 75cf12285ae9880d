// The LLM audit: every model request of the account, newest first (GET /llm-audit/interactions), failed and
// cancelled ones included; open one (GET /llm-audit/interactions/{id}) to read its redacted prompt and response.

import { errorMessage, getJson } from './api.js';
import { alertBox, formatCost, formatInt, formatMs, h, prettyJson, timeEl, visibleControls } from './dom.js';
import { renderErrorBody, renderMessages, renderPrompt } from './messages.js';

const PAGE_SIZE = 20;
let lastListHash = '#/audit';
// Older pages are walked by the API's next_cursor (a keyset position), not by page=N: an offset deep in a large
// ledger read and sorted every row before it (seconds at page 45,000). Each cursor's page remembers the address of
// the page before it, for "Newer"; after a reload that memory is gone and "Newer" goes to the newest page.
const newerPage = new Map();

function statusBadge(item) {
  const label = { complete: 'succeeded', error: 'failed', cancelled: 'cancelled' }[item.status] || item.status;
  return h('span', { class: `badge status-${item.status}`, text: label });
}

function auditHash(query) {
  const text = query.toString();
  return text ? `#/audit?${text}` : '#/audit';
}

export async function auditListView(query) {
  lastListHash = auditHash(query);
  const page = Math.max(1, Number.parseInt(query.get('page') || '1', 10) || 1);
  const cursor = query.get('cursor') || '';
  const success = query.get('success') || '';
  const conversation = query.get('conversation') || '';

  const title = h('h1', { id: 'audit-title', tabindex: '-1', text: 'Audit' });
  const status = h('select', { id: 'audit-success', name: 'success' });
  for (const [value, label] of [['', 'All requests'], ['false', 'Failed or cancelled'], ['true', 'Succeeded']]) {
    status.append(h('option', { value, text: label, selected: value === success }));
  }
  const conversationInput = h('input', { id: 'audit-conversation', name: 'conversation', value: conversation, autocomplete: 'off' });
  const filters = h(
    'form',
    { class: 'filters', role: 'search', 'aria-label': 'Filter the requests' },
    h('div', { class: 'field' }, h('label', { for: 'audit-success', text: 'Show' }), status),
    h('div', { class: 'field' }, h('label', { for: 'audit-conversation', text: 'Conversation id' }), conversationInput),
    h('button', { type: 'submit', class: 'secondary', text: 'Filter' }),
  );
  const apply = (event) => {
    event?.preventDefault();
    const next = new URLSearchParams();
    if (status.value) next.set('success', status.value);
    if (conversationInput.value.trim()) next.set('conversation', conversationInput.value.trim());
    window.location.hash = auditHash(next);
  };
  filters.addEventListener('submit', apply);
  status.addEventListener('change', apply);

  const notice = h('div', { class: 'notice' });
  const element = h(
    'section',
    { class: 'view', 'aria-labelledby': 'audit-title' },
    h(
      'div',
      { class: 'view-head' },
      h(
        'div',
        {},
        title,
        h('p', {
          class: 'subtle',
          text: 'Every model request of this account, newest first: failed and cancelled ones too. Prompts and responses were stored with secrets redacted.',
        }),
      ),
    ),
    filters,
    notice,
  );

  let data;
  try {
    data = await getJson('/llm-audit/interactions', {
      // With a cursor, page is only the number shown: the API takes the position from the cursor.
      page: cursor ? null : page,
      cursor: cursor || null,
      page_size: PAGE_SIZE,
      success: success || null,
      conversation_id: conversation || null,
    });
  } catch (error) {
    notice.append(alertBox(`The audit could not be loaded. ${errorMessage(error)}`));
    return { element, title: 'Audit', focus: () => title.focus() };
  }

  const summary = h('p', {
    class: 'count',
    role: 'status',
    text: !data.total
      ? 'No requests match.'
      : page > data.total_pages && !cursor // an address kept from when there were more (or typed): not "page 9 of 2"
        ? `${formatInt(data.total)} request${data.total === 1 ? '' : 's'}: page ${formatInt(page)} is past the last page, ${data.total_pages}.`
        : `${formatInt(data.total)} request${data.total === 1 ? '' : 's'} · page ${formatInt(page)} of ${data.total_pages}`,
  });
  element.append(summary);
  if (data.items.length) element.append(requestTable(data.items));

  const pager = h('nav', { class: 'pager', 'aria-label': 'Pages of the audit' });
  const goTo = (target, at = null) => {
    const next = new URLSearchParams(query);
    next.delete('cursor');
    if (at) next.set('cursor', at);
    next.set('page', String(target));
    return auditHash(next);
  };
  if (cursor && data.total) {
    const newer = newerPage.get(cursor);
    pager.append(h('a', { class: 'button secondary', href: newer ?? goTo(1), rel: 'prev', text: newer ? '← Newer' : '← The newest' }));
  } else if (page > 1 && data.total) {
    const newer = Math.min(page - 1, data.total_pages);
    pager.append(h('a', { class: 'button secondary', href: goTo(newer), rel: 'prev', text: newer < page - 1 ? '← The last page' : '← Newer' }));
  }
  if (data.next_cursor && page < data.total_pages) {
    newerPage.set(data.next_cursor, lastListHash);
    pager.append(h('a', { class: 'button secondary', href: goTo(page + 1, data.next_cursor), rel: 'next', text: 'Older →' }));
  }
  if (pager.childElementCount) element.append(pager);
  return { element, title: 'Audit', focus: () => title.focus() };
}

function requestTable(items) {
  const head = ['Started', 'Status', 'Model', 'Agent', 'Conversation', 'Tokens in / out', 'Latency', 'Cost'];
  const body = h('tbody');
  for (const item of items) {
    const cells = [
      h('a', { href: `#/audit/${item.id}`, 'aria-label': `Open the request of ${new Date(item.started_at).toLocaleString()}` }, timeEl(item.started_at)),
      statusBadge(item),
      h('bdi', { text: item.model }),
      item.agent ?? '—',
      item.conversation_id ?? '—',
      `${formatInt(item.input_tokens)} / ${formatInt(item.output_tokens)}`,
      formatMs(item.latency_ms),
      formatCost(item.total_cost),
    ];
    body.append(
      h(
        'tr',
        { dataset: { requestId: item.id, status: item.status, conversationId: item.conversation_id ?? '' } },
        cells.map((cell, index) => h('td', { 'data-label': head[index] }, cell)),
      ),
    );
  }
  return h(
    'div',
    { class: 'table-wrap' },
    h(
      'table',
      { class: 'data responsive' },
      h('caption', { class: 'sr-only', text: 'Model requests' }),
      h('thead', {}, h('tr', {}, head.map((name) => h('th', { scope: 'col', text: name })))),
      body,
    ),
  );
}

export async function auditDetailView(id) {
  const title = h('h1', { id: 'request-title', tabindex: '-1', text: 'Model request' });
  const back = h('a', { href: lastListHash, class: 'back', text: '← All requests' });
  const notice = h('div', { class: 'notice' });
  const element = h('section', { class: 'view request-view', 'aria-labelledby': 'request-title' }, back, title, notice);
  const done = { element, title: 'Model request', focus: () => title.focus() };
  let item;
  try {
    item = await getJson(`/llm-audit/interactions/${encodeURIComponent(id)}`);
  } catch (error) {
    notice.append(alertBox(`The request could not be loaded. ${errorMessage(error)}`));
    return done;
  }
  title.append(' ', statusBadge(item));
  element.dataset.status = item.status;
  const facts = [
    ['Started', timeEl(item.started_at)],
    // Each name in a <bdi>, as titles are: a right-to-left override in a provider's model name mirrored the rest.
    [
      'Model',
      item.response_model && item.response_model !== item.model
        ? [h('bdi', { text: item.model }), ' (', h('bdi', { text: item.response_model }), ')']
        : h('bdi', { text: item.model }),
    ],
    ['Agent', item.agent ?? '—'],
    [
      'Conversation',
      item.conversation_id
        ? h('a', { href: `#/chat/${encodeURIComponent(item.conversation_id)}`, text: item.conversation_id })
        : '—',
    ],
    ['Tokens', `${formatInt(item.input_tokens)} in, ${formatInt(item.output_tokens)} out`],
    ['Cost', formatCost(item.total_cost)],
    ['Latency', `${formatMs(item.latency_ms)}${item.ttft_ms !== null ? ` (first token after ${formatMs(item.ttft_ms)})` : ''}`],
    ['Streamed', item.streamed ? 'yes' : 'no'],
    ['Run', item.run_id ?? '—'],
    ['Request id', item.id],
  ];
  if (item.error_type || item.error_message) facts.push(['Error', `${item.error_type ?? ''}: ${item.error_message ?? ''}`]);
  const list = h('dl', { class: 'facts' });
  for (const [name, value] of facts) list.append(h('dt', { text: name }), h('dd', {}, value));
  element.append(list);

  const order = { prompt: 0, response: 1, error: 2 };
  const contents = [...item.contents].sort((a, b) => order[a.kind] - order[b.kind]);
  if (!contents.length) element.append(alertBox('No prompt, response or error is stored for this request.', 'info'));
  for (const content of contents) element.append(contentSection(content));
  return done;
}

function contentSection(content) {
  const heading = { prompt: 'Prompt', response: 'Response', error: 'Error' }[content.kind] || content.kind;
  const headingId = `content-${content.kind}`;
  const notes = [`${formatInt(content.size_bytes)} bytes stored`];
  if (content.redactions) notes.push(`${content.redactions} secret${content.redactions === 1 ? '' : 's'} redacted`);
  if (content.truncated) notes.push('cut at the size limit');
  const section = h(
    'section',
    { class: `content content-${content.kind}`, 'aria-labelledby': headingId },
    h('h2', { id: headingId, text: heading }),
    h('p', { class: 'subtle', text: notes.join(' · ') }),
  );
  let body = null;
  try {
    body = JSON.parse(content.body);
  } catch {
    // A body cut at the size limit is no longer JSON: shown as stored.
  }
  if (body === null) section.append(...storedText(content.body));
  else if (content.kind === 'prompt') section.append(...renderPrompt(body));
  else if (content.kind === 'response') section.append(renderMessages([body]));
  else section.append(renderErrorBody(body));
  const details = h('details', { class: 'raw' }, h('summary', { text: 'As stored (JSON)' }));
  details.addEventListener('toggle', () => {
    if (details.open && details.childElementCount === 1) {
      if (body === null) details.append(...storedText(content.body));
      else details.append(h('pre', { text: prettyJson(body, 200000) }));
    }
  });
  section.append(details);
  return section;
}

// A body cut at the size limit is no longer JSON and is shown as stored: JSON text whose newlines are `\n` escapes,
// one line of up to 4 MiB. Chromium took minutes to lay such a line out (emoji, CJK: font fallback and shaping), so
// the text is broken after each `\n` escape and only its first PREVIEW_CHARS are laid out until the reader asks.
const PREVIEW_CHARS = 64 * 1024;
const CHUNK_CHARS = 256 * 1024;
// A `\n` escape: a backslash that is not itself escaped (an even number of backslashes before it), then `n`.
const NEWLINE_ESCAPE = /(?<!\\)((?:\\\\)*\\n)/g;

/** Where the piece of `text` from `start` ends: at most `limit` characters on, after a line break if there is one. */
function pieceEnd(text, start, limit) {
  let end = Math.min(text.length, start + limit);
  if (end === text.length) return end;
  const lineEnd = text.lastIndexOf('\n', end - 1);
  if (lineEnd > start) return lineEnd + 1;
  // Not between the two halves of a surrogate pair (an emoji).
  const code = text.charCodeAt(end - 1);
  if (code >= 0xd800 && code <= 0xdbff) end -= 1;
  return end;
}

/**
 * A stored body that is not JSON, for people: its bidirectional controls written out (`visibleControls`), a line
 * after each `\n` escape, its first PREVIEW_CHARS shown, the rest behind a "Show all" button that adds it a chunk
 * per frame (the page answers between them). Gives the `<pre>` and, for a long body, the button.
 */
function storedText(stored) {
  const text = visibleControls(stored).replace(NEWLINE_ESCAPE, '$1\n');
  const shown = pieceEnd(text, 0, PREVIEW_CHARS);
  const pre = h('pre', { class: 'stored-body', text: text.slice(0, shown) });
  if (shown === text.length) return [pre];
  const megabytes = (new TextEncoder().encode(stored).length / 1e6).toFixed(1);
  const button = h('button', { type: 'button', class: 'secondary', text: `Show all (${megabytes} MB)` });
  button.addEventListener('click', () => {
    button.disabled = true;
    button.textContent = 'Showing all…';
    let start = shown;
    const more = () => {
      const end = pieceEnd(text, start, CHUNK_CHARS);
      pre.append(text.slice(start, end));
      start = end;
      if (start < text.length) requestAnimationFrame(more);
      else button.remove();
    };
    requestAnimationFrame(more);
  });
  return [pre, button];
}
