"""Test-time orchestration over the kilolora engine: agent graphs, strategies, tools, the CLI.

The graph API and strategies arrive with the orchestrator issue; today this package holds the
`kilolora` command line (`orchestrator.cli`), the top of the import chain
`orchestrator → skills → serving → compression`.
"""
