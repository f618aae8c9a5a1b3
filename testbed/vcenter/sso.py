"""Single sign-on for one SSO domain: users with hashed passwords, signed expiring tokens.

Passwords are stored as scrypt hashes. A session token is
``<payload>.<signature>``: the payload (base64url JSON) names the user, the
domain, the vCenter that issued it, a session id and the expiry; the signature
is an HMAC-SHA256 with the domain's secret. Every vCenter of a domain holds its
secret (enhanced linked mode: two vCenters in one domain accept each other's
tokens); a token of another domain fails its signature. Logging out revokes the
session id at its issuer, which every other vCenter of the domain asks before
it accepts the token (``trust.Trust.check_with_issuer``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass

from testbed.errors import TokenError

SCRYPT = {"n": 2**14, "r": 8, "p": 1}


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    dk = hashlib.scrypt(password.encode(), salt=salt, dklen=32, **SCRYPT)
    return f"scrypt${SCRYPT['n']}${SCRYPT['r']}${SCRYPT['p']}${salt.hex()}${dk.hex()}"


def check_password(password: str, stored: str) -> bool:
    try:
        algo, n, r, p, salt, dk = stored.split("$")
    except ValueError:
        return False
    if algo != "scrypt":
        return False
    got = hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt), dklen=len(dk) // 2,
                         n=int(n), r=int(r), p=int(p))
    return hmac.compare_digest(got.hex(), dk)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class Session:
    user: str            # user@domain
    domain: str
    sid: str
    issuer: str          # the vCenter that issued it: the one that knows whether it was logged out
    issued_s: float
    expires_s: float


def issue(secret: bytes, user: str, domain: str, ttl_s: float, *, issuer: str) -> tuple[str, Session]:
    now = time.time()
    s = Session(user=user, domain=domain, sid=secrets.token_hex(12), issuer=issuer, issued_s=now,
                expires_s=now + ttl_s)
    payload = _b64(json.dumps({"u": s.user, "d": s.domain, "iss": s.issuer, "sid": s.sid, "iat": s.issued_s,
                               "exp": s.expires_s}, separators=(",", ":")).encode())
    sig = _b64(hmac.new(secret, payload.encode(), hashlib.sha256).digest())
    return f"{payload}.{sig}", s


def verify(secret: bytes, domain: str, token: str) -> Session:
    try:
        payload, sig = token.split(".")
        want = _b64(hmac.new(secret, payload.encode(), hashlib.sha256).digest())
        if not hmac.compare_digest(want, sig):
            raise TokenError(f"the session token was not issued by SSO domain {domain}")
        d = json.loads(_unb64(payload))
        if "iss" not in d:
            raise TokenError("the session token names no issuing vCenter (a token of an older version); "
                             "log in again")
        s = Session(user=d["u"], domain=d["d"], sid=d["sid"], issuer=d["iss"], issued_s=d["iat"],
                    expires_s=d["exp"])
        if not all(isinstance(x, str) and x for x in (s.user, s.domain, s.sid, s.issuer)):
            raise TypeError("empty or not a string")
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (s.issued_s, s.expires_s)):
            raise TypeError("times are not numbers")
    except (ValueError, KeyError, TypeError) as err:
        raise TokenError("the session token is malformed") from err
    if s.domain != domain:
        raise TokenError(f"the session token belongs to SSO domain {s.domain}, not {domain}")
    if time.time() >= s.expires_s:
        raise TokenError(f"the session token expired {time.time() - s.expires_s:.0f} s ago; log in again")
    return s
