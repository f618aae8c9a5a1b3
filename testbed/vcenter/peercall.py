"""Signed calls between vCenters: what a call carries and signs (the caller's side, ``sign``) and the shape
its receiver checks (``parse``); ``trust.Trust.verify_peer`` checks the rest (the key, the clock, the audience,
the nonce once).

The caller signs, with its certificate's key, ``VERSION``, the method, the path (with its query), the time,
the audience (the name of the vCenter the call is for), a random nonce and the body's SHA-256, one per line.
A call signed for another vCenter, outside the window, or with a nonce already seen is refused; so is the old
format (no audience, no nonce), whose signature could be replayed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from testbed.errors import Forbidden
from testbed.vcenter import certs

VERSION = "testbed-peer-call/2"
WINDOW_S = 300.0            # a call is accepted this long either side of the receiver's clock
MAX_LIVE_NONCES = 100_000   # nonces kept at once (each for the window): beyond it calls are refused, not forgotten

H_PEER = "X-Testbed-Peer"
H_TIME = "X-Testbed-Timestamp"
H_AUDIENCE = "X-Testbed-Audience"
H_NONCE = "X-Testbed-Nonce"
H_SIGNATURE = "X-Testbed-Signature"

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")    # a vCenter's name (the topology's rule, and more)
NONCE = re.compile(r"^[0-9a-f]{32}$")                      # 16 random bytes, hex
TIMESTAMP = re.compile(r"^[0-9]{1,12}(\.[0-9]{1,6})?$")    # seconds since the epoch: no nan, inf or exponent


def message(method: str, target: str, ts: str, audience: str, nonce: str, body: bytes) -> bytes:
    """What is signed. ``target``: the path and, if any, ``?`` and the query string as sent."""
    return "\n".join([VERSION, method.upper(), target, ts, audience, nonce,
                      hashlib.sha256(body).hexdigest()]).encode()


def sign(name: str, key: Path, method: str, target: str, body: bytes, audience: str,
         now_s: float | None = None) -> dict[str, str]:
    """The headers of a call from vCenter ``name`` (its key ``key``) to vCenter ``audience``."""
    ts = f"{time.time() if now_s is None else now_s:.3f}"
    nonce = secrets.token_hex(16)
    sig = certs.sign(key, message(method, target, ts, audience, nonce, body))
    return {H_PEER: name, H_TIME: ts, H_AUDIENCE: audience, H_NONCE: nonce,
            H_SIGNATURE: base64.b64encode(sig).decode()}


@dataclass(frozen=True)
class SignedCall:
    """A call's signature headers, well-formed (not yet checked against anything)."""
    peer: str
    ts: str
    ts_s: float
    audience: str
    nonce: str
    signature: bytes


def parse(peer: str | None, ts: str | None, audience: str | None, nonce: str | None,
          signature: str | None) -> SignedCall:
    """The headers as a signed call of this version, or ``Forbidden`` saying what is wrong with them."""
    if not NAME.fullmatch(peer or ""):
        raise Forbidden(f"the {H_PEER} header is not a vCenter name")
    if not audience and not nonce and ts and signature:
        raise Forbidden(f"the call is signed in the old format (method, path, time and body: no audience and "
                        f"no nonce), which a captured call could replay; it needs {H_AUDIENCE} and {H_NONCE} "
                        f"({VERSION})")
    if not NAME.fullmatch(audience or ""):
        raise Forbidden(f"the {H_AUDIENCE} header is missing or not a vCenter name")
    if not NONCE.fullmatch(nonce or ""):
        raise Forbidden(f"the {H_NONCE} header is missing or not 32 hex digits")
    if not TIMESTAMP.fullmatch(ts or ""):
        raise Forbidden(f"the {H_TIME} header is missing or not a time in seconds")
    try:
        sig = base64.b64decode(signature or "", validate=True)
    except (binascii.Error, ValueError) as err:
        raise Forbidden(f"the {H_SIGNATURE} header is not base64") from err
    if not sig:
        raise Forbidden(f"the {H_SIGNATURE} header is empty")
    assert peer and ts and audience and nonce
    return SignedCall(peer, ts, float(ts), audience, nonce, sig)


def shown(value: str | None, limit: int = 80) -> str:
    """A value from outside as it may appear in a message or an event: a name as is, anything else quoted, cut."""
    if value is None:
        return "(none)"
    return value if NAME.fullmatch(value) else repr(value[:limit]) + ("..." if len(value) > limit else "")
