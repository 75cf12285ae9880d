"""agentrt: a runtime for Pydantic AI chat agents on PostgreSQL, with a database session per operation.

This file is only the root of the namespace. The code lives in four top-level folders of the repository,
installed beneath it by the `[tool.setuptools.package-dir]` mapping in pyproject.toml:
`agentrt.agents` (agents/), `agentrt.tools` (tools/), `agentrt.services` (services/), `agentrt.db` (db/).
AGENTS.md says which module holds which behaviour.
"""

__version__ = '0.1.0'
