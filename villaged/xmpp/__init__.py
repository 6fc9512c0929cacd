"""Sans-I/O XMPP core: JIDs, SASL mechanisms, and (later) the stream parser and state machine.

Nothing in this package imports trio, socket, time or random: time and randomness are passed in.
"""
