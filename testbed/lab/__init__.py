"""The embedded lab: a typed topology (``topology``) made real by ``builder``."""
