"""Reaching hosts: an SSH transport (``ssh``) under a host agent client (``agent``).

Every host kind is reached the same way: SSH with paramiko, then the host
agent's JSON lines over an SSH channel. Blocking paramiko calls run in threads
behind async methods.
"""
