"""Agents: the chat agent factory, simple_chat / simple_chat_stream, the demo model, lifecycle and the CLI."""
