"""The LLM ledger: billing and audit rows for every model request, their reading, costs and daily rollup."""
