// A stored prompt or response (pydantic-ai messages as JSON, secrets redacted when stored) shown as a conversation:
// one entry per message (the user, the assistant, the tool results), tool calls and results as one line each with
// their arguments or result folded away.

import { h, prettyJson, summariseArgs, visibleControls } from './dom.js';

function contentText(content) {
  if (typeof content === 'string') return content;
  if (Array.isArray(content)) {
    return content.map((item) => (typeof item === 'string' ? item : `[${item?.kind || 'attachment'}]`)).join('\n');
  }
  return prettyJson(content);
}

function folded(label, value) {
  const pre = h('pre');
  const details = h('details', { class: 'folded' }, h('summary', { text: label }), pre);
  details.addEventListener('toggle', () => {
    if (details.open && !pre.textContent) pre.textContent = prettyJson(value);
  });
  return details;
}

function parseArgs(args) {
  if (typeof args !== 'string') return args;
  try {
    return JSON.parse(args);
  } catch {
    return args;
  }
}

/** A tool call or result: its name and a one-line summary, opening to the whole value. */
function toolLine(name, value, what, nestedFirst) {
  const pre = h('pre');
  const details = h(
    'details',
    { class: 'tool-line' },
    h('summary', {}, h('span', { class: 'tool-name', text: visibleControls(String(name ?? '')) }), h('span', { class: 'tool-args', text: summariseArgs(value, 160, { nestedFirst }) || what })),
    pre,
  );
  details.addEventListener('toggle', () => {
    if (details.open && !pre.textContent) pre.textContent = prettyJson(value);
  });
  return details;
}

function renderPart(part) {
  switch (part.part_kind) {
    case 'system-prompt':
      return h('div', { class: 'part' }, h('p', { class: 'part-label', text: 'System' }), h('div', { class: 'text', text: contentText(part.content) }));
    case 'user-prompt':
    case 'text':
      return h('div', { class: 'text', text: contentText(part.content ?? '') });
    case 'thinking':
      return folded('Reasoning', part.content ?? '');
    case 'tool-call':
      return toolLine(part.tool_name, parseArgs(part.args), '(no arguments)', true);
    case 'tool-return':
      return toolLine(part.tool_name, part.content, '(empty result)', false);
    case 'retry-prompt':
      return h(
        'div',
        { class: 'part' },
        h('p', { class: 'part-label', text: `Asked to retry${part.tool_name ? ` ${visibleControls(part.tool_name)}` : ''}` }),
        h('pre', { text: visibleControls(contentText(part.content)) }), // a tool's error, said to the model
      );
    default:
      return folded(part.part_kind || 'part', part);
  }
}

/** Who a message is from, by its parts. */
function speaker(message) {
  const kinds = new Set((message.parts || []).map((part) => part.part_kind));
  if (message.kind === 'response') {
    const calls = (message.parts || []).filter((part) => part.part_kind === 'tool-call').length;
    return ['assistant', calls ? `Assistant · ${calls} tool call${calls === 1 ? '' : 's'}` : 'Assistant'];
  }
  if (kinds.has('user-prompt')) return ['user', 'User'];
  if (kinds.has('tool-return') || kinds.has('retry-prompt')) {
    const results = (message.parts || []).filter((part) => part.part_kind === 'tool-return').length;
    return ['tool-return', `Tool results · ${results}`];
  }
  return ['system', 'System'];
}

/** The messages as a list of entries, in order. */
export function renderMessages(messages) {
  const list = h('ol', { class: 'entries' });
  for (const message of messages || []) {
    if (!message || !Array.isArray(message.parts)) continue;
    const [kind, who] = speaker(message);
    list.append(h('li', { class: `entry entry-${kind}` }, h('p', { class: 'who', text: who }), message.parts.map(renderPart)));
  }
  return list;
}

/** A stored prompt body `{instructions, messages}`. */
export function renderPrompt(body) {
  const parts = [];
  if (body.instructions) {
    parts.push(
      h(
        'details',
        { class: 'instructions' },
        h('summary', { text: 'Instructions (system)' }),
        h('pre', { text: contentText(body.instructions) }),
      ),
    );
  }
  parts.push(renderMessages(body.messages));
  return parts;
}

/** A stored error body `{type, message, status_code?, body?, ...}` as a definition list. */
export function renderErrorBody(body) {
  const list = h('dl', { class: 'facts' });
  for (const [name, value] of Object.entries(body || {})) {
    if (value === null || value === undefined) continue;
    const shown = typeof value === 'object' ? h('pre', { text: prettyJson(value) }) : String(value);
    list.append(h('dt', { text: name }), h('dd', {}, shown));
  }
  return list;
}
