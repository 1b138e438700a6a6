"""Skills (verifier, tool selector, self-evaluation, task adapters), their training recipes and
the default world they live in: `tasks` (problem generators), `tokenizer`, `spec` (skill specs),
`train` (many adapters at once through the serving layers), `build` / `evaluate` (the
`kilolora world` commands), `world` (a world on disk). See ARCHITECTURE.md."""
