// The page: sign-in with an API key, the header, and the views by URL (#/chat/<id>, #/conversations, #/audit,
// #/audit/<id>, #/costs). A 401 from any request returns here, to sign-in, with the reason.

import { errorMessage, request, session } from './api.js';
import { auditDetailView, auditListView } from './audit.js';
import { createChatView } from './chat.js';
import { conversationsView } from './conversations.js';
import { costsView } from './costs.js';
import { alertBox, h } from './dom.js';
import { keepPending } from './pending.js';

const MESSAGE = 'agentrt.signInMessage';
// Each view, and how many segments its address has at most (`#/chat/<id>`: 2).
const VIEWS = new Map([
  ['chat', 2],
  ['conversations', 1],
  ['audit', 2],
  ['costs', 1],
]);
const main = document.getElementById('main');
const nav = document.getElementById('nav');
const account = document.getElementById('account');
let chat = null;
let rendering = 0;

function route() {
  const [path, query = ''] = window.location.hash.replace(/^#\/?/, '').split('?');
  // A key that may only read opens on its conversations, not on a new chat it could never send to (a conversation's
  // own address still opens it, to be read).
  if (session.key && !session.mayChat && /^(chat(\/new)?\/?)?$/.test(path)) {
    return { view: 'conversations', query: new URLSearchParams(query) };
  }
  let parts;
  try {
    parts = path.split('/').filter(Boolean).map((part) => decodeURIComponent(part));
  } catch {
    return { view: null }; // a broken %-escape (a link cut in half): decodeURIComponent throws URIError
  }
  const view = parts[0] || 'chat';
  // Segments past what the view takes (`#/chat/<id>/more`) make an address no view has, not the view without them.
  if (VIEWS.has(view) && parts.length > VIEWS.get(view)) return { view: parts.join('/') };
  return { view, id: parts[1], query: new URLSearchParams(query) };
}

function signInView() {
  let message = null;
  try {
    message = JSON.parse(sessionStorage.getItem(MESSAGE) || 'null');
  } catch {
    // an unreadable note: no note
  }
  sessionStorage.removeItem(MESSAGE);
  const title = h('h1', { id: 'signin-title', tabindex: '-1', text: 'Sign in' });
  const notice = h('div', { class: 'notice' }, message ? alertBox(message.text, message.kind) : null);
  const input = h('input', {
    id: 'api-key',
    name: 'api-key',
    type: 'password',
    required: true,
    autocomplete: 'off',
    spellcheck: 'false',
    'aria-describedby': 'api-key-hint',
  });
  const button = h('button', { type: 'submit', text: 'Sign in' });
  const form = h(
    'form',
    { class: 'signin-form' },
    h('label', { for: 'api-key', text: 'API key' }),
    input,
    h('p', { id: 'api-key-hint', class: 'subtle' }, 'It starts with ', h('code', { text: 'art_' }), '. Make one with ', h('code', { text: 'agentrt keys create --account <slug>' }), '.'),
    button,
  );
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    notice.replaceChildren();
    const key = input.value.trim();
    // A key is printable ASCII; anything else (a zero-width space pasted from a document) would make fetch refuse the
    // header before sending, which read as "the server cannot be reached".
    const odd = key.match(/[^\x21-\x7e]/u);
    let wrong = null;
    if (!key.startsWith('art_')) wrong = 'That is not an API key: a key starts with art_ (from agentrt keys create).';
    else if (odd) {
      const code = odd[0].codePointAt(0).toString(16).toUpperCase().padStart(4, '0');
      wrong = `That is not an API key: it has a character an API key never has (U+${code}) at position ${odd.index + 1}. Copy the key again.`;
    }
    if (wrong) {
      notice.append(alertBox(wrong));
      input.focus();
      return;
    }
    button.disabled = true;
    try {
      const me = await (await request('GET', '/me', { key })).json();
      session.signIn(key, me);
      input.value = '';
      render();
    } catch (error) {
      notice.append(alertBox(errorMessage(error)));
      input.focus();
    } finally {
      button.disabled = false;
    }
  });
  const element = h(
    'section',
    { class: 'view signin', 'aria-labelledby': 'signin-title' },
    title,
    h('p', {}, 'Chat with your agents, and see the audit and costs of your account. The key stays in this browser tab only and is forgotten when the tab closes.'),
    notice,
    form,
  );
  return { element, title: 'Sign in', focus: () => input.focus() };
}

function showHeader(signedIn, view) {
  nav.hidden = !signedIn;
  account.hidden = !signedIn;
  if (!signedIn) return;
  const me = session.me;
  document.getElementById('account-name').textContent = me ? `${me.account} · ${me.key_id}` : '';
  for (const link of nav.querySelectorAll('a')) {
    if (link.dataset.view === view) link.setAttribute('aria-current', 'page');
    else link.removeAttribute('aria-current');
    // A key without the read scope (`--scope chat`) would be refused every view but the chat, and one without the
    // chat scope (`--scope read`) the chat: what it would be refused is not offered.
    link.parentElement.hidden = link.dataset.view === 'chat' ? !session.mayChat : !session.mayRead;
  }
}

async function render() {
  const ticket = ++rendering;
  const { view, id, query } = route();
  if (!session.key) {
    showHeader(false);
    return mount(signInView(), ticket);
  }
  showHeader(true, view === 'audit' ? 'audit' : view);
  if (view === null || !VIEWS.has(view)) {
    // An unknown view is not taken for the chat: `#/conversation/abc` (a typo) opened an empty chat on a conversation
    // named `abc`, which the next message would have created.
    // The name in a <bdi> (a right-to-left override in it reversed the sentence), cut as the chat cuts an id.
    const named = view && view.length > 40 ? `${view.slice(0, 40)}…` : view;
    const text =
      view === null
        ? 'This address is not valid: it has a broken %-escape. Open a view from the menu above.'
        : ['This address names no view of this page (“', h('bdi', { text: named }), '”). Open a view from the menu above.'];
    return mount({ element: h('section', { class: 'view' }, alertBox(text)), title: 'Error', focus: () => {} }, ticket);
  }
  if (view === 'chat') {
    chat ??= createChatView();
    const shown = chat.show(id);
    mount(chat, ticket);
    await shown;
    return;
  }
  main.setAttribute('aria-busy', 'true');
  let next;
  try {
    if (view === 'conversations') next = await conversationsView();
    else if (view === 'audit') next = id ? await auditDetailView(id) : await auditListView(query);
    else next = await costsView(query);
  } catch (error) {
    next = { element: h('section', { class: 'view' }, alertBox(errorMessage(error))), title: 'Error', focus: () => {} };
  } finally {
    main.removeAttribute('aria-busy');
  }
  mount(next, ticket);
}

function mount(view, ticket) {
  if (ticket !== rendering) return; // a newer navigation won
  const focused = document.activeElement?.id; // a filter that re-rendered its view keeps the focus
  if (main.firstElementChild !== view.element) main.replaceChildren(view.element);
  document.title = `${view.title} · agentrt`;
  const same = focused ? view.element.querySelector(`#${CSS.escape(focused)}`) : null;
  // Otherwise the focus moves to the new view (its heading, or the message box), where keyboard and screen-reader
  // users then are.
  if (same) same.focus();
  else view.focus();
}

window.addEventListener('hashchange', render);
let signingOut = false;
window.addEventListener('agentrt:unauthorized', (event) => {
  // Once: requests made together (the costs make three) each answer 401, and a second sign-out forgot what the
  // first had kept for after signing in again.
  if (signingOut) return;
  signingOut = true;
  // The message being sent when the key stopped working (revoked, its account gone), or typed in the box, outlives the
  // sign-out: it was lost with the reload, to be typed again from memory. It comes back for a key of the same account
  // only.
  const unsent = chat?.leaving();
  const account = session.me?.account;
  session.signOut();
  if (unsent && account) keepPending(unsent.conversation, unsent.text, account, { signedOut: true, from: unsent.from });
  sessionStorage.setItem(MESSAGE, JSON.stringify({ text: errorMessage(event.detail), kind: 'error' }));
  window.location.reload(); // a clean page: no view of the previous key stays in memory
});
document.getElementById('sign-out').addEventListener('click', () => {
  session.signOut();
  sessionStorage.setItem(MESSAGE, JSON.stringify({ text: 'Signed out: this tab forgot the key.', kind: 'info' }));
  window.location.hash = '#/chat';
  window.location.reload();
});
document.getElementById('skip-link').addEventListener('click', (event) => {
  event.preventDefault(); // #main would be taken for a route
  main.focus();
});
render();
