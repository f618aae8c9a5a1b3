"""The host agent's side of a live migration: it reacts to its own QEMU's events (roles: ``source``,
``destination``; this file says how they work together and holds what they share).

The engine decides; the agents act where timing matters, with no control-plane
round trip on the switchover path:

- ``SourceRole``: mirrors the disks to the destination's NBD export
  (``blockdev-mirror``, ``copy-mode: write-blocking``), starts ``migrate`` (possibly
  once the mirrors have copied the disks but before they are READY: until they are,
  the downtime limit is 0, so QEMU cannot stop the guest to switch over),
  samples ``query-migrate`` for telemetry, and at ``pre-switchover`` cancels the
  (READY) mirrors, which completes a consistent copy, then ``migrate-continue``.
- ``DestinationRole``: QEMU started paused for incoming (``-S -incoming defer``),
  NBD server on the vMotion address with the disks exported writable,
  ``migrate-incoming``; on ``completed`` it stops the NBD server, resumes the
  guest (``cont``) and announces it on the network.

Post-copy (``postcopy-ram``): the engine asks the source for
``migrate-start-postcopy``; the source's ``pre-switchover`` reaction is the
same (mirrors completed first), and the destination resumes at
``postcopy-active`` instead of ``completed`` (with ``-S`` it would stay paused),
then pulls the remaining pages on demand. A broken channel during post-copy
pauses both sides (``postcopy-paused``); ``migrate-pause``/``migrate-recover``/
``migrate resume=true`` reconnect them (``pause``, ``recover``, ``resume``).
SDPS (``testbed.hostd.sdps``) runs inside the source's sampler.

Both report what they did as events (``migration-*``) with CLOCK_MONOTONIC
timestamps, the clock every process of the lab shares.
"""

from __future__ import annotations

from typing import Any


def caps(**flags: bool) -> list[dict[str, Any]]:
    return [{"capability": k.replace("_", "-"), "state": v} for k, v in flags.items()]

