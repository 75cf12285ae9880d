"""Conversations in PostgreSQL: the pydantic-ai ConversationStore backend, titles and summaries."""
