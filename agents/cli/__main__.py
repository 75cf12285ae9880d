"""`python -m agentrt.agents.cli`: the `agentrt` command line."""

from agentrt.agents.cli import main

main()
