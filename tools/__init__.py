"""Tools the agents call, and `SessionDependencies` they see; each tool opens its own database session."""
