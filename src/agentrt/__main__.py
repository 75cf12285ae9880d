"""`python -m agentrt`: the `agentrt` command line (where the `agentrt` script is not on PATH)."""

from agentrt.agents.cli import main

main()
