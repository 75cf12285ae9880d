// One streamed turn of `agentrt serve` through the AI SDK's own client code: DefaultChatTransport (what `useChat`
// sends and receives with) and readUIMessageStream (how `useChat` builds the UI message from the stream). Prints the
// assistant message's tool parts and the start of its answer. Not part of the test suite (it needs npm):
//
//   mkdir /tmp/ai-sdk && cd /tmp/ai-sdk && npm init -y && npm install ai@6
//   cp <repo>/scripts/ai_sdk_client.mjs . && node ai_sdk_client.mjs http://127.0.0.1:8000 art_... conv-1 "Dermatologists in Boston"
//
// For AI SDK 5 (`npm install ai@5`), drop `?sdk_version=6` from the URL below.
import { DefaultChatTransport, readUIMessageStream } from 'ai';

const [url, key, chatId, text] = process.argv.slice(2);
const transport = new DefaultChatTransport({ api: `${url}/api/v1/chat?sdk_version=6`, headers: { Authorization: `Bearer ${key}` } });
const stream = await transport.sendMessages({
  chatId,
  messages: [{ id: `u-${Date.now()}`, role: 'user', parts: [{ type: 'text', text }] }],
  trigger: 'submit-message',
  messageId: undefined,
  abortSignal: undefined,
});
let last;
for await (const message of readUIMessageStream({ stream, onError: (e) => { throw e; } })) last = message;
const tools = last.parts.filter((p) => p.type.startsWith('tool-'));
const answer = last.parts.filter((p) => p.type === 'text').map((p) => p.text).join('');
console.log(JSON.stringify({ role: last.role, tools: tools.map((p) => [p.type, p.state]), answer: answer.slice(0, 160) }));
