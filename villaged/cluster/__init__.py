"""The cluster: sans-I/O Raft (no trio, socket, time or random here) and what drives it."""
