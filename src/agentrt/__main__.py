"""`python -m agentrt`: the `agentrt` command line (where the `agentrt` script is not on PATH)."""

from agentrt.agents.cli_entry import main

main()
