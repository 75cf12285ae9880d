"""The one pydantic adapter for a pydantic-ai message's JSON, shared by every part of the runtime that writes it.

The ledger's stored prompts and responses, the conversation store's entries, the budget's size estimates and the HTTP
API's conversation bodies are the same JSON: the store saves a turn's new messages from the text the ledger dumped
(`dumped_message_json`), or dumps a message with this adapter when the ledger did not. One adapter keeps them the same
by construction, and builds its schema once per process: each `TypeAdapter(ModelMessage)` after the first costs about 25
ms of start-up, and four were built at import, by every command and every server worker.
"""

from __future__ import annotations

from pydantic import TypeAdapter
from pydantic_ai.messages import ModelMessage

message_adapter: TypeAdapter[ModelMessage] = TypeAdapter(ModelMessage)
"""Dumps and validates one `ModelMessage`, with pydantic's default configuration (as each of the four had)."""
