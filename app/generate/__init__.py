"""The simple-client API: `POST /generate` and stored conversations.

`/v1/*` serves OpenAI clients as they are. `/generate` is for clients that want
one call with a prompt and get back the text, its timings and, when they pass a
`conversation_id`, the earlier turns of the conversation as context, kept by
the server (SQLite on the cache volume, or PostgreSQL shared by replicas).

Modules: `schemas` (request and reply bodies), `engine` (the two engine calls),
`history` (fitting earlier turns into the context window), `json_reply`
(spotting JSON replies), `store` (conversation storage), `validation` (body
errors in the OpenAI error shape) and `routes` (the HTTP handlers).
"""
