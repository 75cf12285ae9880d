// The message whose answer is streaming, kept in the tab (sessionStorage) until its turn ends here. A reload (or the
// tab closed and restored), or another conversation opened, in the middle of the answer cancels the turn on the
// server, which saves nothing of it, and the message was gone: its conversation, shown again, gives it back. So does a
// key that stops working (a 401 returns the page to sign-in): the message being sent, or typed in the box, comes back
// once a key of the same account signs in (never another account's).
//
// One a conversation: a message sent in another conversation meanwhile took the one slot there was, and its turn's end
// forgot it (qa168). The latest `KEPT` conversations' are kept, the oldest forgotten first.
//
// A message given back stays kept until it is sent or the box is emptied: forgotten as it was given back, a second
// reload lost it. Text in the box when another conversation opens is kept the same way, for the conversation
// it was typed in ('' a new chat): it stayed in the box, sent to the next conversation by Enter, and a message given
// back there found the box taken and was forgotten (qa175).

const KEY = 'agentrt.pendingMessages';
const KEPT = 20;

/** The messages kept, oldest first (`[{conversation, text, account, signedOut, from, typed, draft}]`). */
function kept() {
  try {
    const notes = JSON.parse(sessionStorage.getItem(KEY) || '[]');
    return Array.isArray(notes) ? notes.filter((note) => typeof note?.conversation === 'string') : [];
  } catch {
    return []; // an unreadable note: nothing to give back
  }
}

function store(notes) {
  if (notes.length) sessionStorage.setItem(KEY, JSON.stringify(notes.slice(-KEPT)));
  else sessionStorage.removeItem(KEY);
}

/**
 * Keep `text`, sent to (or typed for) conversation `conversation` of account `account`, in place of what was kept for
 * it, until `forgetPending()`; `signedOut`: kept because the key stopped working, not for a reload; `from`: the
 * conversation's revision when it was sent ('' when nothing of it was saved yet), or null when this tab did not know
 * it; `typed`: typed in the box and never sent; `draft`: text typed in the box beside it, not sent.
 */
export function keepPending(
  conversation,
  text,
  account,
  { signedOut = false, from = null, typed = false, draft = '' } = {},
) {
  const others = kept().filter((note) => note.conversation !== conversation);
  store([...others, { conversation, text, account, signedOut, from, typed, draft }]);
}

/** What `note` says of its text, to keep it again. */
function noted(note) {
  return { signedOut: note.signedOut === true, from: note.from ?? null, typed: note.typed === true };
}

/**
 * Keep `text`, in the box of conversation `conversation` ('' a new chat) as another one opens, not sent: beside the
 * message kept for it (its answer cut off by this leaving, or its conversation left before it could be given back), as
 * its `draft`, or alone; `from`: the conversation's revision as shown.
 */
export function keepTyped(conversation, text, account, from) {
  const note = kept().find((candidate) => candidate.conversation === conversation && candidate.account === account);
  if (note && typeof note.text === 'string') {
    // After a draft set aside before, if any (typed as the conversation loaded, the box then not free to give it back).
    const before = typeof note.draft === 'string' ? note.draft : '';
    const draft = [before, text].filter(Boolean).join('\n\n');
    keepPending(conversation, note.text, account, { ...noted(note), draft });
  } else keepPending(conversation, text, account, { from, typed: true });
}

/** The box given the text kept for `conversation` back was edited: `text` is kept instead (none: forgotten). */
export function retypePending(conversation, text) {
  const note = kept().find((candidate) => candidate.conversation === conversation);
  if (!text) forgetPending(conversation);
  else if (note) keepPending(conversation, text, note.account, noted(note));
}

/**
 * Conversation `conversation`'s turn ended on this page (saved, stopped, or refused with its text back in the box), or
 * the text given back was sent; without it, every conversation's (the key is signed out).
 */
export function forgetPending(conversation) {
  if (conversation === undefined) sessionStorage.removeItem(KEY);
  else store(kept().filter((note) => note.conversation !== conversation));
}

/**
 * The text kept for conversation `id` of account `account` (`{text, signedOut, typed}`), or null: none, another
 * account's, or saved after all (then forgotten). Given back, it stays kept, as the box now shows it, until it is sent
 * or the box emptied (`retypePending`): a second reload gives it back again. `held` is the conversation as the server
 * holds it (`{revision, messages}`; a revision of null: nothing saved). A turn was saved when the revision moved on
 * from the one it was sent at and the last user message is it (stored with NUL as U+FFFD); at the same revision nothing
 * was saved, whatever the text: a message that repeats the one before ("continue", "yes") was taken for saved, and
 * lost. Its `draft` (typed beside it) comes back after it, saved or not.
 */
export function takePending(id, held, account) {
  const pending = kept().find((note) => note.conversation === id);
  if (!pending) return null;
  if (typeof pending.text !== 'string' || pending.account !== account) {
    forgetPending(id); // unreadable, or another account's: a key of another account signed in on this tab
    return null;
  }
  const draft = typeof pending.draft === 'string' ? pending.draft : '';
  const text = savedSince(pending, held) ? '' : pending.text;
  if (!text && !draft) {
    forgetPending(id);
    return null;
  }
  const back = {
    text: [text, draft].filter(Boolean).join('\n\n'),
    signedOut: pending.signedOut === true && text !== '',
    typed: pending.typed === true || text === '',
  };
  // Kept as given back, from the revision shown: at the next restore it is unsaved while the revision stays.
  keepPending(id, back.text, account, { signedOut: back.signedOut, from: held.revision ?? '', typed: back.typed });
  return back;
}

/** Whether the turn of kept message `pending` was saved, by `held` (see `takePending`). */
function savedSince(pending, held) {
  if (typeof pending.from === 'string' && pending.from === (held.revision ?? '')) return false;
  const lastUser = held.messages.findLast((message) => message.role === 'user');
  const saved = (lastUser?.parts || []).filter((part) => part.type === 'text').map((part) => part.text).join('');
  return saved === pending.text.replaceAll('\0', '\ufffd');
}
