"""Operator access: the admin socket, operators and their two-factor login, inspection grants
and the tamper-evident audit log (see DESIGN.md, Operator access)."""
