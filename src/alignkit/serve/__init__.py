"""After training: talk to a model (``alignkit chat``) or put it behind an OpenAI-compatible HTTP API
(``alignkit serve``).

Modules: ``engine`` (the model loaded as evaluation loads it, answering one conversation at a time, whole or
streamed), ``protocol`` (the chat-completions request checked, answers and errors shaped as the protocol's
JSON), ``server`` (the FastAPI application on uvicorn), ``chat`` (the terminal chat).
"""
