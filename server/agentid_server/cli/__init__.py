"""The `agentid` command. ``root``: its parser, serving and the dev helpers; ``remote``: what
the commands that call a running agentid share (where it is, the credential, how answers are
shown); one module per such command (agents, audit, keys, login, sessions, step-ups)."""

from agentid_server.cli.root import main

__all__ = ["main"]
