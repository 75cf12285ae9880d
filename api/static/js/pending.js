// The message whose answer is streaming, kept in the tab (sessionStorage) until its turn ends here. A reload (or the
// tab closed and restored), or another conversation opened, in the middle of the answer cancels the turn on the
// server, which saves nothing of it, and the message was gone: its conversation, shown again, gives it back. So does a
// key that stops working (a 401 returns the page to sign-in): the message being sent, or typed in the box, comes back
// once a key of the same account signs in (never another account's).
//
// One a conversation: a message sent in another conversation meanwhile took the one slot there was, and its turn's end
// forgot it (qa168). The latest `KEPT` conversations' are kept, the oldest forgotten first.

const KEY = 'agentrt.pendingMessages';
const KEPT = 20;

/** The messages kept, oldest first (`[{conversation, text, account, signedOut, from}]`). */
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
 * it.
 */
export function keepPending(conversation, text, account, { signedOut = false, from = null } = {}) {
  const others = kept().filter((note) => note.conversation !== conversation);
  store([...others, { conversation, text, account, signedOut, from }]);
}

/**
 * Conversation `conversation`'s turn ended on this page (saved, stopped, or its text given back); without it, every
 * conversation's (the key is signed out).
 */
export function forgetPending(conversation) {
  if (conversation === undefined) sessionStorage.removeItem(KEY);
  else store(kept().filter((note) => note.conversation !== conversation));
}

/**
 * The message kept for conversation `id` of account `account`, forgotten now (`{text, signedOut}`), or null: none
 * (other conversations' stay kept), another account's, or saved after all. `held` is the conversation as the
 * server holds it (`{revision, messages}`; a revision of null: nothing saved). Its turn was saved when the revision
 * moved on from the one it was sent at and the last user message is it (stored with NUL as U+FFFD); at the same
 * revision nothing was saved, whatever the text: a message that repeats the one before ("continue", "yes") was taken
 * for saved, and lost.
 */
export function takePending(id, held, account) {
  const pending = kept().find((note) => note.conversation === id);
  if (!pending) return null;
  forgetPending(id);
  if (typeof pending.text !== 'string') return null;
  if (pending.account !== account) return null; // a key of another account signed in on this tab
  const back = { text: pending.text, signedOut: pending.signedOut === true };
  if (typeof pending.from === 'string' && pending.from === (held.revision ?? '')) return back;
  const lastUser = held.messages.findLast((message) => message.role === 'user');
  const saved = (lastUser?.parts || []).filter((part) => part.type === 'text').map((part) => part.text).join('');
  return saved === pending.text.replaceAll('\0', '\ufffd') ? null : back;
}
