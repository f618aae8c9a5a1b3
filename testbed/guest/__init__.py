"""The built-in guest: its image, its agent's command line, heartbeat and disk formats.

docs/guest-agent.md is the specification these modules read and write.
"""
