"""The host agent, ``testbed-hostd``: the ESXi hostd/vpxa of the lab.

It runs on every host, owns the host's QEMU processes, their QMP sockets and
the host's datastores, and reacts to its own QEMU's events locally. Clients
reach it over SSH: ``testbed-hostd connect`` bridges the SSH channel's stdio
to the daemon's UNIX socket (the pattern of libvirt's ``qemu+ssh``), and the
two speak JSON lines (``protocol``).
"""
