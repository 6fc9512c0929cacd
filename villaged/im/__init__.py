"""Transport-agnostic IM logic: sessions, routing and one module per feature.

Handlers here see stanzas (ElementTree elements) and sessions, never sockets; they reach
durable state only through the store.
"""
