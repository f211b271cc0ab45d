"""`vllm-mlx-chat`: a browser chat UI (Gradio) for any OpenAI-compatible server.

It talks to the server over HTTP only, never importing the engine or the
gateway (tests/test_layering.py holds it to that): `client.py` is the OpenAI
API side, `conversation.py` the chat history, `app.py` the page.
"""
