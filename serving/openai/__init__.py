"""The OpenAI-compatible server: a thin HTTP wing over the engine (see `api_server.py` for the
routes and the map of this package). Nothing is imported here, so that `tool_formats` and
`protocol` can be used without loading FastAPI.
"""
