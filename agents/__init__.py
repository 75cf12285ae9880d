"""Agent factories, SessionDependencies, simple_chat / simple_chat_stream and the `agentrt` CLI."""
