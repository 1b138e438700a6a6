"""Skills (verifier, tool selector, self-evaluation, task adapters), their training recipes and
the embedded default world. Arrives with the skills issue; see ../shared/DESIGN.md."""
