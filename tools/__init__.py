"""Tools the agents call; each opens its own database session."""
