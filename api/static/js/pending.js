// The message whose answer is streaming, kept in the tab (sessionStorage) until its turn ends here. A reload (or the
// tab closed and restored), or another conversation opened, in the middle of the answer cancels the turn on the
// server, which saves nothing of it, and the message was gone: its conversation, shown again, gives it back.

const KEY = 'agentrt.pendingMessage';

/** Keep `text`, sent to conversation `conversation`, until `forgetPending()`. */
export function keepPending(conversation, text) {
  sessionStorage.setItem(KEY, JSON.stringify({ conversation, text }));
}

/** Its turn ended on this page (saved, stopped, or its text given back), or the key is signed out. */
export function forgetPending() {
  sessionStorage.removeItem(KEY);
}

/**
 * The message kept for conversation `id`, forgotten now, or null: none (another conversation's stays kept), or saved
 * after all (the last user message of `messages`, the conversation as the server holds it, is it: stored with NUL as
 * U+FFFD).
 */
export function takePending(id, messages) {
  let pending = null;
  try {
    pending = JSON.parse(sessionStorage.getItem(KEY) || 'null');
  } catch {
    forgetPending(); // an unreadable note: nothing to give back
  }
  if (pending?.conversation !== id || typeof pending.text !== 'string') return null;
  forgetPending();
  const lastUser = messages.findLast((message) => message.role === 'user');
  const saved = (lastUser?.parts || []).filter((part) => part.type === 'text').map((part) => part.text).join('');
  return saved === pending.text.replaceAll('\0', '\ufffd') ? null : pending.text;
}
