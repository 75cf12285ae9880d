// The chat view: a conversation's history (GET /conversations/{id}?format=vercel), and new turns streamed from
// POST /chat as they are written, each tool call on a timeline. The server holds the history: a turn sends only the
// new message. One chat view lives for the whole page, so a turn keeps streaming while another view is shown.

import { ApiError, errorMessage, getJson, postChat, request, session } from './api.js';
import { alertBox, formatMs, h, randomId } from './dom.js';
import { forgetPending, keepPending, keepTyped, retypePending, takePending } from './pending.js';
import { readEventStream } from './stream.js';
import { ToolTimeline } from './tools.js';

const TITLE_CHARS = 80; // in code points, as the server's titles (TITLE_MAX_CHARS of services/conversations/_titles.py)
// The latest messages a conversation opens with (a demo turn is 6): reading a long one whole costs the server seconds.
// "Show older messages" loads as many again, each time, above them.
const HISTORY_MESSAGES = 600;
// A conversation id as the server takes it (agents/turn_input.py); it refused any other as "conversation_id" when the
// history loaded and as "id" when a message was sent, which did not say the address was at fault.
const CONVERSATION_ID = /^[A-Za-z0-9][A-Za-z0-9._:@-]*$/;
const CONVERSATION_ID_MAX_CHARS = 200;
const DELETED = 'The conversation shown here was deleted: this is a new one.';
const NOT_SENT = 'Your message was not sent: it is in the box, to start it with.';
const UNCHECKED =
  'This conversation was not found a moment ago, and whether it still exists could not be checked: your message was not sent; it is in the box, to send again.';
// How long a message waits for the read after its last answer (`learnTag`) before it goes without it.
const TAG_WAIT_MS = 5000;
const STORED_BEFORE_THE_RULES =
  'This conversation was saved by an earlier version under an id that new messages can no longer use: you can read and delete it; start a new chat to go on.';
// Why an answer ended before the model was done (the finish event's `finishReason`, from the provider's; a stored
// answer's, its message's `metadata.finishReason`, in the same words: api/vercel_messages.py).
const CUT_OFF_BY = {
  length: "the model's output limit (max_tokens)",
  'content-filter': "the provider's content filter",
};

/** What an answer that ended for `finishReason` says of it, or null when the model ended it itself. */
function cutOffNote(finishReason) {
  const cutBy = CUT_OFF_BY[finishReason];
  // Saved as it is: the text stops where the limit or the filter stopped it, which read as a whole answer.
  return cutBy ? `The answer was cut off by ${cutBy}; it is saved as it is.` : null;
}

/**
 * `text` with each lone surrogate (half of an emoji's UTF-16 pair, from a paste cut in the middle of one) as U+FFFD,
 * as the server stores a message. The chat route refuses one in a body, which the person could neither see nor fix.
 */
function wellFormed(text) {
  return text.replace(/[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]/g, '\ufffd');
}

/** Why conversation id `id` (from the address) is not one (text and elements for `alertBox`), or null when it is. */
function badConversationId(id) {
  if (id.length <= CONVERSATION_ID_MAX_CHARS && CONVERSATION_ID.test(id)) return null;
  const shown = id.length > 40 ? `${id.slice(0, 40)}…` : id;
  // The id in a <bdi>: a right-to-left override in it (U+202E) reversed the rest of the sentence.
  return [
    'The conversation id in the address, “',
    h('bdi', { text: shown }),
    `”, is not valid: a conversation id is 1 to ${CONVERSATION_ID_MAX_CHARS} letters, digits and . _ : @ - (starting with a letter or digit). Start a new chat, or open one from Conversations.`,
  ];
}

/** A user's message. */
function userMessage(text) {
  return h(
    'article',
    { class: 'message user', 'aria-label': 'You' },
    h('p', { class: 'who', text: 'You' }),
    h('div', { class: 'text', text }),
  );
}

/** The assistant's answer to one user message: its tool calls, its text, its outcome. */
class AssistantTurn {
  constructor({ live }) {
    this.started = performance.now();
    this.tools = new ToolTimeline({ live, clock: () => performance.now() - this.started });
    this.answer = h('div', { class: 'text answer' });
    this.outcome = h('div', { class: 'outcome' });
    this.finished = false;
    this.failed = false;
    this.element = h(
      'article',
      { class: 'message assistant', 'aria-label': 'Assistant', dataset: { state: live ? 'streaming' : 'stored' } },
      h('p', { class: 'who', text: 'Assistant' }),
      this.tools.element,
      this.answer,
      this.outcome,
    );
    if (live) {
      this.element.setAttribute('aria-busy', 'true');
      this.outcome.append(h('p', { class: 'turn-status', text: 'Working…' }));
    }
  }

  appendText(text, newSegment) {
    if (newSegment && this.answer.textContent) this.answer.append('\n\n');
    this.answer.append(text);
  }

  /** One event of the Vercel AI data stream. */
  handle(event) {
    switch (event.type) {
      case 'text-start':
        this.appendText('', true);
        break;
      case 'text-delta':
        this.appendText(event.delta ?? '', false);
        break;
      case 'tool-input-start':
        this.tools.announce(event.toolCallId, event.toolName);
        break;
      case 'tool-input-available':
        this.tools.start(event.toolCallId, event.toolName, event.input);
        break;
      case 'tool-output-available':
        this.tools.finish(event.toolCallId, { output: event.output });
        break;
      case 'tool-output-error':
      case 'tool-input-error':
        this.tools.finish(event.toolCallId, { error: event.errorText || 'the tool failed' });
        break;
      case 'error':
        this.fail(event.errorText || 'The turn failed on the server.');
        break;
      case 'finish':
        this.finished = true;
        this.finishReason = event.finishReason;
        break;
      default:
        break; // start, steps, metadata, deltas of tool arguments: nothing to show
    }
  }

  /** The stream ended: done, or cut off before its end. */
  end() {
    if (this.failed) return;
    if (!this.finished) {
      // The server saves a turn just before its finish event: a cut in between lost only the event. So the view is
      // reloaded before the next message (`stale`) rather than claiming nothing was saved.
      this.fail(
        'The answer stopped before it was complete (the connection was lost). A turn cut off is not saved, unless the server had just saved it: the conversation is shown again, as the server holds it, before your next message.',
      );
      return;
    }
    const answered = `Answered in ${formatMs(performance.now() - this.started)}.`;
    const note = cutOffNote(this.finishReason);
    this.close('done', note ? `${answered} ${note}` : answered);
  }

  fail(message) {
    this.failed = true;
    this.close('error', null);
    this.outcome.append(alertBox(message));
  }

  stopped() {
    this.failed = true;
    this.close('stopped', 'Stopped. This turn was cancelled and not saved.');
  }

  close(state, text) {
    this.tools.abandon();
    this.element.dataset.state = state;
    this.element.removeAttribute('aria-busy');
    this.outcome.replaceChildren(text ? h('p', { class: 'turn-status', text }) : '');
  }

  /**
   * A stored assistant message (AI SDK UI message): its parts, and its end when it was cut off. The last message of
   * the answer says how it ended: the note was shown live only, and a reload showed a truncated answer as whole.
   */
  addStored({ parts, metadata }) {
    const note = cutOffNote(metadata?.finishReason);
    this.outcome.replaceChildren(note ? h('p', { class: 'turn-status', text: note }) : '');
    for (const part of parts || []) {
      if (part.type === 'text') this.appendText(part.text ?? '', true);
      else if (part.type === 'dynamic-tool' || part.type?.startsWith('tool-')) {
        const name = part.type === 'dynamic-tool' ? part.toolName : part.type.slice('tool-'.length);
        this.tools.addStored(part.toolCallId, name, { input: part.input, output: part.output, error: part.errorText });
      }
    }
  }
}

/**
 * A heading made of a conversation's first message, until the server's title comes: at most `TITLE_CHARS` code points,
 * as the server cuts a title (services/conversations/_titles.py). Cut in UTF-16 units, an emoji was split, its half
 * shown as a broken character.
 */
function headingOf(firstMessage) {
  const chars = Array.from(firstMessage);
  return chars.length > TITLE_CHARS ? `${chars.slice(0, TITLE_CHARS - 1).join('')}…` : firstMessage;
}

/** The revision an entity tag names (the server's `ETag`: the revision, `.t` and a digest of the title, quoted). */
function revisionOf(tag) {
  return tag.replace(/^W\//, '').replace(/^"|"$/g, '').replace(/\.t[0-9a-f]{8}$/, '');
}

/** A promise that rejects with an `AbortError` when `signal` aborts (as `fetch` does). */
function abortedBy(signal) {
  return new Promise((_, reject) => {
    const abort = () => reject(new DOMException('stopped', 'AbortError'));
    if (signal.aborted) abort();
    else signal.addEventListener('abort', abort, { once: true });
  });
}

/** A promise of null after `ms` milliseconds. */
function wait(ms) {
  return new Promise((resolve) => setTimeout(() => resolve(null), ms));
}

export function createChatView() {
  let conversationId = null; // null: a new conversation, named when its first message is sent
  let shownId; // undefined until a conversation (or a new one) is first shown
  let controller = null;
  let loading = null; // the notice of a conversation whose history is loading, else null
  let stale = false; // a turn here was refused as another one ran, or cut off: the history shown may lack what was saved
  let inFlight = null; // {conversation, text, from} of the message being sent and answered, else null
  let offlineNote = null; // the notice that the browser is offline while an answer is coming, else null
  // Where the reader was in the chat (window.scrollY), or null at its end: the chat shown again after another view
  // goes back there. It kept the other view's position, and came back at its oldest messages.
  let readingAt = null;
  let earlierCursor = null; // where the messages shown begin (the server's `earlier_cursor`), or null from the first
  let history = 0; // counts the histories shown: a page of older messages that arrives after another is not shown
  // The conversation's entity tag (its revision and title) as last shown or saved here, and the one checked just
  // before a send: a turn another tab or client saved meanwhile is shown before this tab's next message (it went
  // unseen, and the answer followed a question this tab never showed).
  let knownTag = null;
  let storedTitle = null; // the conversation's title as the server holds it, when it has one
  // Whether the server held the conversation shown when last heard of (its history read, or a turn of it saved here):
  // then a 404 says it was deleted since, not that it has no messages yet (a first turn cut off saved nothing).
  let saved = false;
  // The conversation whose entity tag, read after its answer, was not found (404): deleted while the answer came, or
  // never saved (an answer that did not come from the server): the next message checks first, though no tag is known.
  let unfound = null;
  // The read of the entity tag after this tab's last answer (`learnTag`): `{id, done}`, `done` its promise.
  let tagRead = null;
  // The conversation ('' a new chat) whose kept text (pending.js) the box shows, given back and not sent since, else
  // null: edited, it is kept as the box shows it.
  let givenBack = null;

  const title = h('h1', { id: 'chat-title', tabindex: '-1', text: 'New conversation' });
  const idLine = h('p', { class: 'subtle conversation-id' });
  const auditLink = h('a', { class: 'button secondary', href: '#/audit', hidden: true, text: 'Its requests' });
  const newChat = h('a', { class: 'button secondary', href: '#/chat/new', text: 'New chat' });
  const notice = h('div', { class: 'notice' });
  const empty = h(
    'div',
    { class: 'empty' },
    h('p', { text: 'Ask something to start, for example “Cardiologists in Seattle who accept Medicare”.' }),
    h('p', {
      class: 'subtle',
      text: 'The answer streams in as it is written; each tool call shows as a bar on a timeline, so calls that run at the same time overlap.',
    }),
  );
  const transcript = h('div', { class: 'transcript', role: 'log', 'aria-label': 'Messages' });
  // Older messages than those shown, a page at a time, above them. Not disabled while loading (a focused button that
  // is disabled drops the focus to the start of the page): `aria-disabled` says it, and a press then does nothing.
  const olderButton = h('button', { type: 'button', class: 'secondary', text: 'Show older messages' });
  const olderStatus = h('div', { class: 'older-status', role: 'status' });
  const older = h(
    'div',
    { class: 'older', hidden: true },
    h('p', { class: 'subtle', text: 'Older messages of this conversation are not shown yet.' }),
    olderButton,
    olderStatus,
  );
  const input = h('textarea', {
    id: 'message',
    name: 'message',
    rows: '2',
    required: true,
    autocomplete: 'off',
    'aria-describedby': 'message-hint message-refusal',
  });
  // Why Enter sent nothing (a blank message, an answer still coming): it did nothing, silently.
  const refusal = h('p', { id: 'message-refusal', class: 'composer-refusal', role: 'status' });
  const send = h('button', { type: 'submit', text: 'Send' });
  const stop = h('button', { type: 'button', class: 'secondary', text: 'Stop', disabled: true });
  const form = h(
    'form',
    { class: 'composer', 'aria-label': 'Send a message' },
    notice, // on the message box (which stays in view), where the eyes are when a message is refused
    h('label', { for: 'message', text: 'Message' }),
    input,
    refusal,
    h(
      'div',
      { class: 'composer-actions' },
      h('p', { id: 'message-hint', class: 'subtle', text: 'Enter sends; Shift+Enter starts a new line.' }),
      stop,
      send,
    ),
  );
  const element = h(
    'section',
    { class: 'view chat-view', 'aria-labelledby': 'chat-title', dataset: { busy: 'false' } },
    h('div', { class: 'view-head' }, h('div', {}, title, idLine), h('div', { class: 'head-actions' }, auditLink, newChat)),
    empty,
    older,
    transcript,
    form,
  );

  /**
   * The view's head: `heading` (the server's title as it is, as Conversations lists it, or `headingOf` a first
   * message), else what the conversation shown is.
   */
  function setHead(heading) {
    if (heading) title.textContent = heading;
    else if (!conversationId) title.textContent = 'New conversation';
    // An existing conversation whose messages a key without the read scope cannot load is not a new one.
    else if (!transcript.childElementCount) title.textContent = session.mayRead ? 'New conversation' : 'Conversation';
    idLine.textContent = conversationId ? `Conversation ${conversationId}` : 'Not saved until its first message is sent.';
    auditLink.hidden = !conversationId || !session.mayRead; // the audit needs the read scope
    if (conversationId) auditLink.href = `#/audit?conversation=${encodeURIComponent(conversationId)}`;
    empty.hidden = transcript.childElementCount > 0;
  }

  /**
   * The revision of the conversation shown, as this tab last heard of it: '' when the server holds nothing of it, null
   * when not known (a turn of this tab saved it, and the read of its tag is not back).
   */
  function knownRevision() {
    if (knownTag) return revisionOf(knownTag);
    return saved ? null : '';
  }

  function setBusy(busy) {
    element.dataset.busy = String(busy);
    // A focused button that is disabled drops the focus to the start of the page, where a keyboard user would have to
    // Tab back from: pressing Send or Stop leaves the focus in the message box instead, the next thing to use.
    if (document.activeElement === (busy ? send : stop)) input.focus();
    send.disabled = busy || loading !== null || !session.mayChat;
    stop.disabled = !busy;
    if (!busy) refusal.textContent = '';
    sayIfOffline();
  }

  /**
   * While an answer is coming and the browser has no network, a notice says so (and goes when the network is back or
   * the turn ends). The page said "Working…" for as long as the connection was not closed, which can be minutes.
   */
  function sayIfOffline() {
    const away = !navigator.onLine && element.dataset.busy === 'true';
    if (away && !offlineNote?.isConnected) {
      offlineNote = alertBox(
        'This browser is offline: the rest of the answer cannot arrive until the network is back. Stop gives it up (a stopped turn is not saved).',
      );
      notice.append(offlineNote);
    } else if (!away && offlineNote) {
      offlineNote.remove();
      offlineNote = null;
    }
  }

  /**
   * While a conversation's history loads (`note`: the notice saying so; null once shown), a message waits in the box:
   * sent at once, it was shown above the history that came next, and twice once that history held it too.
   */
  function setLoading(note) {
    if (loading && loading !== note) loading.remove();
    loading = note;
    element.dataset.loading = String(note !== null);
    transcript.setAttribute('aria-busy', String(note !== null));
    send.disabled = note !== null || element.dataset.busy === 'true' || !session.mayChat;
  }

  /** Show the end of the conversation: its newest message, just above the message box. */
  function toEnd() {
    window.scrollTo(0, document.documentElement.scrollHeight);
  }

  /** Keep the newest content in view when the reader is at the bottom already. */
  function follow(change) {
    // Not while another view is shown (the answer goes on behind it): its scroll is not this view's to move. It was
    // moved to that view's bottom with each piece of the answer, when the reader was near it.
    if (!element.isConnected) return change();
    const atBottom = window.innerHeight + window.scrollY >= document.documentElement.scrollHeight - 160;
    change();
    if (atBottom) window.scrollTo(0, document.documentElement.scrollHeight);
  }

  /**
   * Stored messages (AI SDK UI messages) into `into`; the first user message's text, if any. A page of older messages
   * starts at a turn, or (a turn longer than a page) at one of the model's responses: each tool call is on the page of
   * its result, so every row of a timeline has its output.
   */
  function renderHistory(messages, into = transcript) {
    let turn = null;
    let first = null;
    for (const message of messages) {
      if (message.role === 'user') {
        const text = (message.parts || []).filter((part) => part.type === 'text').map((part) => part.text).join('');
        first ??= text;
        turn = null;
        into.append(userMessage(text));
      } else if (message.role === 'assistant') {
        if (!turn) {
          turn = new AssistantTurn({ live: false });
          into.append(turn.element);
        }
        turn.addStored(message);
      }
    }
    return first;
  }

  /** Whether older messages can be loaded (`cursor`: the server's `earlier_cursor`, or null). */
  function setEarlier(cursor) {
    earlierCursor = cursor;
    older.hidden = cursor === null;
    olderButton.removeAttribute('aria-disabled');
    olderButton.textContent = 'Show older messages';
  }

  /** The page of messages before those shown, above them; the reader's place stays where it was on screen. */
  async function showOlder() {
    if (earlierCursor === null || olderButton.getAttribute('aria-disabled') === 'true') return;
    const id = conversationId;
    const shown = history;
    olderButton.setAttribute('aria-disabled', 'true');
    olderButton.textContent = 'Loading older messages…';
    olderStatus.replaceChildren();
    let data;
    try {
      data = await getJson(`/conversations/${encodeURIComponent(id)}`, {
        format: 'vercel',
        limit: String(HISTORY_MESSAGES),
        before: earlierCursor,
      });
    } catch (error) {
      if (history !== shown) return;
      setEarlier(earlierCursor);
      olderStatus.append(alertBox(`The older messages could not be loaded. ${errorMessage(error)}`));
      return;
    }
    if (history !== shown) return; // another conversation, or this one shown again, meanwhile
    const page = document.createDocumentFragment();
    const first = renderHistory(data.messages, page);
    // What the reader sees stays put: the message that was first on screen is where it was after the page goes in.
    const anchor = transcript.firstElementChild;
    const top = anchor?.getBoundingClientRect().top;
    // Not read out message by message from the live log (up to a hundred turns at once): the status line says it.
    transcript.setAttribute('aria-busy', 'true');
    transcript.prepend(page);
    requestAnimationFrame(() => transcript.setAttribute('aria-busy', String(loading !== null)));
    if (anchor) window.scrollBy(0, anchor.getBoundingClientRect().top - top);
    setHead(storedTitle || (first && headingOf(first)));
    const focused = document.activeElement === olderButton;
    setEarlier(data.earlier_cursor ?? null);
    // Counted as shown: a question and its answer are one turn (the stored messages, several a turn, said nothing).
    const turns = data.messages.filter((message) => message.role === 'user').length;
    const shownAbove = `${turns} older ${turns === 1 ? 'turn' : 'turns'} shown above`;
    olderStatus.textContent = data.earlier ? `${shownAbove}.` : `${shownAbove}: the conversation starts there.`;
    // The button goes once the start is shown: the focus goes to the title, not to the start of the page.
    if (older.hidden && focused) title.focus({ preventScroll: true });
  }

  /**
   * Show conversation `id` as the server holds it ('new' for a new one; undefined: whichever was shown last, as it
   * is on screen). The conversation a turn is streaming into stays as it is.
   */
  async function show(id) {
    if (id === undefined) {
      if (shownId !== undefined) {
        // #/chat (the menu): the address names the conversation on screen, so that a reload reopens it.
        if (conversationId) window.history.replaceState(null, '', `#/chat/${encodeURIComponent(conversationId)}`);
        return;
      }
      id = 'new';
    }
    const wanted = id === 'new' ? null : id;
    if (shownId !== undefined && wanted === conversationId && (wanted === null || controller)) return;
    if (controller) {
      // Opening another conversation stops the turn that is running; its message waits for this one (pending.js).
      controller.left = true;
      controller.abort();
    }
    // The same conversation again (shown as the server holds it before the next message, or its link followed): what
    // is on screen stays until its history arrives, and stays if that fails. It was wiped first, and a server still
    // away left an empty chat.
    const again = shownId !== undefined && wanted !== null && wanted === conversationId;
    if (!again && shownId !== undefined) setAside();
    conversationId = wanted;
    shownId = wanted;
    if (!again) {
      knownTag = null; // another conversation's: until its history says
      storedTitle = null;
      saved = false;
      unfound = null;
      tagRead = null;
    }
    history += 1; // a page of older messages on its way is not shown
    setEarlier(again ? earlierCursor : null);
    olderStatus.replaceChildren();
    if (!again) {
      transcript.replaceChildren();
      readingAt = null; // another conversation opens at its end
    }
    notice.replaceChildren();
    if (!session.mayChat) {
      // A `--scope read` key: the conversation can be read here, not continued (its send was refused only after it).
      notice.append(alertBox("This API key may read conversations but not chat (it has no 'chat' scope): sign in with a key that may chat to send a message.", 'info'));
    }
    setHead(null);
    if (wanted === null) {
      setLoading(null);
      restorePending('', { revision: null, messages: [] }); // what was typed in a new chat before another was opened
      return;
    }
    // An id outside the rules may still be stored (an agentrt before 2026-12-01 took any text): it is looked up, and
    // refused in words only when there is no such conversation; one found can be read and deleted, not continued.
    const bad = badConversationId(wanted);
    if (bad && wanted.length > CONVERSATION_ID_MAX_CHARS) {
      setLoading(null);
      notice.append(alertBox(bad));
      return;
    }
    stale = false;
    const loadingNote = alertBox('Loading the conversation…', 'info');
    notice.append(loadingNote);
    setLoading(loadingNote);
    try {
      const path = `/conversations/${encodeURIComponent(wanted)}`;
      const response = await request('GET', path, { params: { format: 'vercel', limit: String(HISTORY_MESSAGES) } });
      const data = await response.json();
      if (conversationId !== wanted) return;
      // The conversation's title, whichever page is loaded (it was the first question of the latest page loaded,
      // and changed as older pages were).
      const first = putHistory(data, response.headers.get('ETag'));
      setHead(storedTitle || (first && headingOf(first)));
      restorePending(wanted, data);
      if (bad) notice.append(alertBox(STORED_BEFORE_THE_RULES, 'info'));
      // It opens where it goes on, as a chat does: at its first turn, a message sent next streamed in out of sight.
      if (element.isConnected) toEnd();
    } catch (error) {
      if (conversationId !== wanted) return;
      if (error instanceof ApiError && error.status === 404 && again && saved) {
        // Shown here, and deleted since (shown again before the next message, after a 409 or an answer cut off): that
        // message would start a new conversation of the same id below turns the model no longer has. It waits.
        forgetDeleted(input.value.trim() ? `${DELETED} ${NOT_SENT}` : DELETED);
        window.history.replaceState(null, '', '#/chat/new');
      } else if (error instanceof ApiError && error.status === 404) {
        transcript.replaceChildren();
        setEarlier(null);
        setHead(null);
        if (bad) {
          notice.append(alertBox(bad)); // not stored, and no message can start it
          return;
        }
        notice.append(alertBox('This conversation has no saved messages yet: send the first one.', 'info'));
        restorePending(wanted, { revision: null, messages: [] });
      } else if (error instanceof ApiError && error.status === 403) {
        // A key that may chat but not read (`--scope chat`): it never will load the conversation, and need not to
        // continue it, since the server holds what was said. Marked stale, every message sent waited for a load that
        // could not succeed, and Send did nothing at all (QA).
        transcript.replaceChildren();
        setEarlier(null);
        setHead(null);
        notice.append(
          alertBox(`Earlier messages cannot be shown here: ${errorMessage(error)} A message you send continues this conversation.`, 'info'),
        );
      } else {
        // What is shown (if anything) may lack what the server holds: loaded again before the next message is sent.
        stale = true;
        notice.append(alertBox(`The conversation could not be loaded. ${errorMessage(error)}`));
      }
    } finally {
      if (loading === loadingNote) setLoading(null); // else a newer show() is loading another one
    }
  }

  /**
   * Another conversation opens: the text in the box stays with the one it was typed (or given back) in, kept for when
   * that one is shown again (pending.js), and the box is cleared. It stayed in the box, and Enter sent it to the
   * conversation opened; a message given back there found the box taken, and was lost (qa175).
   */
  function setAside() {
    const left = conversationId ?? '';
    if (input.value.trim() && givenBack !== left) keepTyped(left, input.value, session.me?.account, knownRevision());
    input.value = '';
    givenBack = null;
    refusal.textContent = '';
  }

  /** The conversation shown here no longer exists: the view becomes a new chat, `message` in its notice. */
  function forgetDeleted(message) {
    if (givenBack !== null) forgetPending(givenBack); // the text in the box stays, now a new chat's
    givenBack = null;
    conversationId = null;
    shownId = null;
    knownTag = null;
    storedTitle = null;
    saved = false;
    unfound = null;
    tagRead = null;
    stale = false;
    history += 1; // a page of older messages on its way is not shown
    setEarlier(null);
    olderStatus.replaceChildren();
    transcript.replaceChildren();
    setHead(null);
    notice.replaceChildren(alertBox(message, 'info'));
  }

  /**
   * The message this tab sent before a reload or another conversation cut its answer off, or the text left in the box
   * as another conversation opened (`takePending`), back in the box; `id`: the conversation ('' a new chat); `held`: it
   * as the server holds it (`{revision, messages}`). Not while the box holds text typed as it loaded: the kept text
   * waits, still kept, and the notice, which said "it is back in the box" over the other text, is not shown.
   */
  function restorePending(id, held) {
    if (input.value) return;
    const pending = takePending(id, held, session.me?.account);
    if (pending === null) return;
    input.value = pending.text;
    givenBack = id;
    let back = 'Your last message was not answered before you left (the page or the conversation), and was not saved: it is back in the box.';
    if (pending.typed) back = 'What you were typing here when you left, not sent, is back in the box.';
    else if (pending.signedOut) back = 'Your message was not sent, or not answered, before the page returned to sign-in: it is back in the box.';
    notice.append(alertBox(back, 'info'));
  }

  /**
   * The page is leaving for sign-in (the key stopped working): the message being sent, else the one typed in the box
   * of a conversation, as `{conversation, text, from}` (or null), no longer forgotten when its request fails.
   */
  function leaving() {
    if (controller) controller.left = true; // its failure (the 401) must not forget the note kept for after sign-in
    if (inFlight) return inFlight;
    if (!conversationId || !input.value.trim()) return null;
    return { conversation: conversationId, text: input.value, from: knownRevision() };
  }

  async function sendMessage(text) {
    notice.replaceChildren();
    const madeId = !conversationId;
    if (!conversationId) {
      conversationId = `web-${randomId()}`;
      shownId = conversationId;
      // Not a hash change: the view stays as it is, and a reload reopens this conversation.
      window.history.replaceState(null, '', `#/chat/${encodeURIComponent(conversationId)}`);
    }
    const mine = userMessage(text);
    const turn = new AssistantTurn({ live: true });
    const isFirst = transcript.childElementCount === 0;
    transcript.append(mine, turn.element);
    setHead(isFirst ? headingOf(text) : null);
    toEnd(); // what was just sent, and its answer as it comes, even when the reader had scrolled up
    const sending = conversationId;
    // Kept with the revision the turn starts from (`takePending` tells by it whether the turn was saved), known once
    // the checks below are done: kept again then.
    const keep = () => {
      inFlight = { conversation: sending, text, from: conversationId === sending ? knownRevision() : null };
      keepPending(sending, text, session.me?.account, { from: inFlight.from });
    };
    keep();
    const ownController = (controller = new AbortController());
    setBusy(true);
    let response = null;
    try {
      if (tagRead?.id === sending) {
        // Sent before the read after its last answer was back: that read is the check's starting point. Waited for at
        // most TAG_WAIT_MS, and Stop ends the wait (a stalled read held the send, Stop doing nothing: qa126).
        const pending = tagRead.done;
        tagRead = null;
        const learnt = await Promise.race([pending, abortedBy(ownController.signal), wait(TAG_WAIT_MS)]);
        if (learnt?.tag && conversationId === sending) knownTag = learnt.tag;
        else if (learnt?.deleted && conversationId === sending) unfound = sending;
      }
      if ((knownTag || unfound === sending) && !isFirst) {
        // Saved by another tab or client since it was shown here? Then its turns are shown first, this message after
        // them: the answer followed a question this tab never showed, with nothing on screen to say why (QA).
        const latest = await latestIfChanged(sending, knownTag, ownController.signal);
        if (latest?.deleted) {
          // Deleted meanwhile (another tab, Conversations, another client): sent, it started a new conversation of
          // the same id below turns the model no longer had. Not sent; the view is a new chat, the text in the box.
          mine.remove();
          turn.element.remove();
          if (conversationId === sending) {
            forgetDeleted(`${DELETED} ${NOT_SENT}`);
            window.history.replaceState(null, '', '#/chat/new');
            if (!input.value) input.value = text;
          }
          return;
        }
        if (latest === null && !knownTag && unfound === sending) {
          // Not found a moment ago, and the read that would say it is back failed (a 503, a dropped connection):
          // sent, the message would start it again below turns the model no longer has (qa125). It waits.
          mine.remove();
          turn.element.remove();
          if (!input.value) input.value = text;
          notice.replaceChildren(alertBox(UNCHECKED));
          return;
        }
        if (latest && conversationId === sending) {
          putHistory(latest.data, latest.tag);
          transcript.append(mine, turn.element);
          if (storedTitle) setHead(storedTitle);
          toEnd();
        }
      }
      keep();
      response = await postChat(
        {
          trigger: 'submit-message',
          id: sending,
          messages: [{ id: `msg-${randomId()}`, role: 'user', parts: [{ type: 'text', text }] }],
        },
        controller.signal,
      );
      const type = response.headers.get('Content-Type') || 'no content type';
      if (!type.startsWith('text/event-stream')) {
        // A proxy's page (a sign-in, an error) answered with 200: what became of the turn, the server knows.
        turn.fail(
          `The answer was not a chat stream (${type.split(';')[0]}): something between this page and the server answered instead. Reload to see what the conversation holds.`,
        );
        return;
      }
      await readEventStream(response.body, (events) => follow(() => events.forEach((event) => turn.handle(event))));
      if (!turn.finished && !turn.failed) stale = true; // cut off: see `end()`
      turn.end();
      if (turn.finished) {
        if (conversationId === sending) saved = true; // saved just before its finish event
        learnTag(sending);
      }
    } catch (error) {
      if (error.name === 'AbortError') turn.stopped();
      else if (response === null) {
        if (error instanceof ApiError && error.status === 409) stale = true;
        // Refused before the turn started (busy, bad input, ...): nothing was sent to the model; give the text back.
        mine.remove();
        turn.element.remove();
        if (!input.value) input.value = text;
        if (madeId && conversationId === sending) {
          // Still a new conversation: the id made for it named nothing saved (its header offered "Its requests").
          conversationId = null;
          shownId = null;
          window.history.replaceState(null, '', '#/chat/new');
        }
        setHead(null);
        notice.append(alertBox(errorMessage(error)));
      } else {
        stale = true; // the stream broke mid-way: what the server saved, the next send shows first
        turn.fail(errorMessage(error));
      }
    } finally {
      if (!ownController.left) forgetPending(sending); // its turn ended here: saved, stopped, or its text back in the box
      controller = null;
      inFlight = null;
      setBusy(false);
      // A failed turn saved nothing: its text goes back to the box to be sent again, unless something was typed
      // meanwhile. Not a stopped one: stopping was the person's choice, or they opened another conversation.
      if (turn.element.dataset.state === 'error' && !input.value) input.value = text;
    }
  }

  /**
   * The transcript made of `data` (a page of the conversation's latest messages, as the server holds it) and its
   * entity tag `tag` (the response's ETag: the revision and the title, which changes under the same revision); the
   * page's first user message.
   */
  function putHistory(data, tag) {
    transcript.replaceChildren();
    saved = true;
    knownTag = tag;
    storedTitle = data.title || null;
    setEarlier(data.earlier ? (data.earlier_cursor ?? null) : null);
    return renderHistory(data.messages);
  }

  /**
   * The entity tag of what this tab's own turn saved on `id`, so that the next send can tell another's turn from it:
   * `{tag}`, `{deleted: true}` (404), or null when unknown. A send that starts before the read is back waits for it
   * (`tagRead`): on a slow network the message went unchecked, the tag not known yet (qa125).
   */
  function learnTag(id) {
    knownTag = null; // until known: the next send checks nothing rather than take its own turn for another's
    const done = readTag(id);
    tagRead = { id, done };
    return done;
  }

  async function readTag(id) {
    try {
      // With the key given: a 401 here (a key revoked meanwhile) does not return the page to sign-in by itself; the
      // next send finds it out, with its message kept (pending.js).
      const response = await request('GET', `/conversations/${encodeURIComponent(id)}`, {
        params: { format: 'vercel', limit: '1' },
        key: session.key,
      });
      const tag = response.headers.get('ETag');
      if (conversationId === id && !controller) {
        knownTag = tag;
        unfound = null;
      }
      return { tag };
    } catch (error) {
      // Deleted while its answer came (another tab or client, or Conversations here, whose event an answer on its way
      // leaves alone): with no tag the next send checked nothing, and started a conversation of the same id below
      // turns the model no longer had. It checks now (a 404 then takes the deleted path).
      if (error instanceof ApiError && error.status === 404) {
        if (conversationId === id && !controller) unfound = id;
        return { deleted: true };
      }
      // Otherwise unknown: the next send is not checked; the server still refuses one that races another (409).
      return null;
    }
  }

  /**
   * Conversation `id`'s latest messages when it was saved by someone else since this tab showed or saved it (at entity
   * tag `tag`), `{deleted: true}` when it no longer exists (404), else null: one conditional read, a 304 when it was
   * not changed. A read that fails otherwise is taken for "not changed" (the send goes on; the server still refuses a
   * turn racing another). Aborted with `signal` (Stop).
   */
  async function latestIfChanged(id, tag, signal) {
    let response;
    try {
      response = await request('GET', `/conversations/${encodeURIComponent(id)}`, {
        params: { format: 'vercel', limit: String(HISTORY_MESSAGES) },
        headers: tag ? { 'If-None-Match': tag } : {}, // the ETag as it came, quotes and all
        key: session.key, // a 401 is the send's to find out, with its message kept (pending.js)
        signal,
      });
    } catch (error) {
      if (error.name === 'AbortError') throw error;
      if (error instanceof ApiError && error.status === 404) return { deleted: true };
      return null; // 304 (the same), or the read failed
    }
    return { data: await response.json(), tag: response.headers.get('ETag') };
  }

  form.addEventListener('submit', (event) => {
    event.preventDefault();
    const text = wellFormed(input.value);
    if (!text.trim()) {
      refusal.textContent = text ? 'Nothing to send: the message is only spaces or blank lines.' : 'Nothing to send: type a message first.';
      return;
    }
    if (element.dataset.busy === 'true') {
      refusal.textContent = 'An answer is still coming: wait for it, or press Stop, then send this message.';
      return;
    }
    if (loading !== null) return; // the message waits in the box; the notice says the conversation is loading
    refusal.textContent = '';
    const bad = conversationId && badConversationId(conversationId);
    if (bad) {
      notice.replaceChildren(alertBox(bad)); // the message stays in the box
      return;
    }
    if (stale && conversationId) {
      // Refused (409) while another tab or client ran a turn here, or the last answer's stream was cut: what the
      // server saved is shown first, then this message is sent (its answer follows what the server holds).
      const id = conversationId;
      show(id).then(() => {
        // Not if the person moved on, nor when it could not be loaded (the message waits in the box; the notice says why).
        if (conversationId !== id || !element.isConnected) return;
        if (!stale) form.requestSubmit();
        else refusal.textContent = 'Not sent: the conversation must be loaded first (see the notice above). Send again to retry.';
      });
      return;
    }
    if (givenBack !== null) forgetPending(givenBack); // sent: a new chat's was kept under '', a conversation's is sent
    givenBack = null;
    input.value = '';
    sendMessage(text);
  });
  input.addEventListener('keydown', (event) => {
    if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      form.requestSubmit();
    }
  });
  input.addEventListener('input', () => {
    refusal.textContent = '';
    if (givenBack === null) return;
    retypePending(givenBack, input.value); // a reload gives back what the box shows; emptied, nothing
    if (!input.value) givenBack = null;
  });
  stop.addEventListener('click', () => controller?.abort());
  olderButton.addEventListener('click', showOlder);
  window.addEventListener(
    'scroll',
    () => {
      if (!element.isConnected) return; // another view's scrolling
      const atEnd = window.innerHeight + window.scrollY >= document.documentElement.scrollHeight - 160;
      readingAt = atEnd ? null : window.scrollY;
    },
    { passive: true },
  );
  window.addEventListener('offline', sayIfOffline);
  window.addEventListener('online', sayIfOffline);
  window.addEventListener('agentrt:conversation-deleted', (event) => {
    // Deleted from Conversations while shown here (no answer coming): it stayed on screen, and the next message started
    // a conversation of the same id without any of it, below messages the model no longer had.
    if (event.detail !== conversationId || controller) return;
    forgetDeleted(DELETED);
  });

  return {
    element,
    title: 'Chat',
    show,
    focus: () => {
      // The message box stays in view (it sticks to the bottom): the transcript goes where the reader left it.
      input.focus({ preventScroll: true });
      window.scrollTo(0, readingAt ?? document.documentElement.scrollHeight);
    },
    leaving,
    get conversationId() {
      return conversationId;
    },
  };
}
