"""Serving: the model runner, adapter layers, Triton kernels, the batched engine and the
OpenAI-compatible server. Arrives with the serving issue; see ../shared/DESIGN.md."""
