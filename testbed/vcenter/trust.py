"""Trust between vCenters: a peer proves it holds its certificate's key over our challenge and an administrator
vouches for it; afterwards its requests are signed and checked here (``verify_peer``)."""

from __future__ import annotations

import re
import secrets
import time
from typing import Any, NoReturn

from testbed.errors import ApiError, Forbidden, HostUnreachable, InputError, TestbedError, Unauthorized
from testbed.vcenter import certs, peercall, sso
from testbed.vcenter.base import VcBase
from testbed.vcenter.client import VcClient

ISSUER_CHECK_TIMEOUT_S = 10.0     # asking a session's issuer whether it still holds
_PRINTABLE = re.compile(r"^[\x21-\x7e]{1,200}$")


class Trust(VcBase):
    """Peer vCenters: challenge, vouch, verify signed requests."""

    def challenge(self) -> str:
        nonce = secrets.token_hex(16)
        now = time.time()
        self.challenges = {k: v for k, v in self.challenges.items() if v > now}
        self.challenges[nonce] = now + 60
        return nonce

    def accept_trust(self, s: sso.Session, name: str, url: str, cert_pem: str, nonce: str, signature: bytes) -> None:
        """A peer vCenter asks to be trusted: an administrator of this domain vouches (their session),
        and the peer proves it holds the key of the certificate it presents (signature over our nonce)."""
        if self.inv.user(s.user) is None or self.inv.user(s.user)["role"] != "Admin":  # type: ignore[index]
            raise Forbidden(f"{s.user} may not configure trust on vCenter {self.cfg.name}")
        if self.challenges.pop(nonce, 0) < time.time():
            raise Forbidden("the trust challenge is unknown or expired; ask for a new one")
        if not certs.verify(cert_pem, f"{nonce}|{name}".encode(), signature):
            raise Forbidden(f"vCenter {name} did not prove it holds the key of the certificate it presented")
        if name == self.cfg.name:
            raise InputError(f"vCenter {name} cannot trust itself")
        self.inv.put_trust(name, url, certs.thumbprint_pem(cert_pem), cert_pem, how=f"vouched by {s.user}")
        self.inv.event("TrustAddedEvent", f"vCenter {name} ({url}) is now trusted, vouched by {s.user}",
                       peer=name, thumbprint=certs.thumbprint_pem(cert_pem))

    def verify_peer(self, peer: str | None, ts: str | None, audience: str | None, nonce: str | None,
                    signature: str | None, method: str, target: str, body: bytes,
                    now_s: float | None = None) -> str:
        """The name of the trusted peer vCenter that signed this call (``peercall``), or ``Forbidden``: not signed,
        the old format, an untrusted or wrong key, outside the window, meant for another vCenter, or a nonce
        already used. Each refusal is recorded (``PeerCallRefusedEvent``: peer, method, path, reason)."""
        now = time.time() if now_s is None else now_s
        me = self.cfg.name
        if not (peer or ts or signature):
            self._refuse(peer, method, target, "not signed",
                         f"vCenter {me} only accepts this from a trusted peer vCenter (signed request headers "
                         "missing)")
        try:
            call = peercall.parse(peer, ts, audience, nonce, signature)
        except Forbidden as err:
            self._refuse(peer, method, target, "malformed",
                         f"vCenter {me} refuses {method} {target} from {peercall.shown(peer)}: {err}",
                         hint="the calling vCenter must be upgraded to sign its calls with an audience and a nonce"
                         if "old format" in str(err) else None)
        trust = self.inv.trust(call.peer)
        if trust is None:
            self._refuse(call.peer, method, target, "not trusted",
                         f"vCenter {me} does not trust vCenter {call.peer!r}; refusing",
                         hint="a relocate from it establishes the trust with an administrator's login here")
        skew = now - call.ts_s
        if abs(skew) > peercall.WINDOW_S:
            self._refuse(call.peer, method, target, "outside the window",
                         f"peer call from {call.peer} is {abs(skew):.0f} s off this vCenter's clock "
                         f"(accepted: within {peercall.WINDOW_S:.0f} s)",
                         hint=f"synchronize the clocks of vCenters {call.peer} and {me}")
        msg = peercall.message(method, target, call.ts, call.audience, call.nonce, body)
        if not certs.verify(trust["cert_pem"], msg, call.signature):
            self._refuse(call.peer, method, target, "bad signature",
                         f"the request claims to come from vCenter {call.peer} but its signature does not verify")
        if call.audience != me:
            self._refuse(call.peer, method, target, "wrong audience",
                         f"the call from vCenter {call.peer} was signed for vCenter {call.audience}, not for this "
                         f"one: expected audience {me}, got {call.audience}", audience=call.audience)
        used = self.inv.use_nonce(call.nonce, call.peer, call.ts_s + peercall.WINDOW_S, now,
                                  peercall.MAX_LIVE_NONCES)
        if used == "seen":
            self._refuse(call.peer, method, target, "replayed nonce",
                         f"the call from vCenter {call.peer} reuses nonce {call.nonce}, already accepted here: "
                         "a replay; refusing", nonce=call.nonce)
        if used == "full":
            self._refuse(call.peer, method, target, "too many calls",
                         f"vCenter {me} holds {peercall.MAX_LIVE_NONCES} nonces of peer calls of the last "
                         f"{peercall.WINDOW_S:.0f} s; refusing more until they age out", nonce=call.nonce)
        return call.peer

    def _refuse(self, peer: str | None, method: str, target: str, reason: str, message: str,
                hint: str | None = None, **data: str) -> NoReturn:
        """Record a refused peer call (never its signature) and refuse it."""
        who, path = peercall.shown(peer), peercall.shown(target, 200) if not _PRINTABLE.fullmatch(target) else target
        self.inv.event("PeerCallRefusedEvent", f"refused {method} {path} from vCenter {who}: {message}",
                       peer=who, method=method, path=path, reason=reason, **data)
        raise Forbidden(message, hint=hint)

    def peer_client(self, url: str, thumbprint: str, token: str | None = None,
                    audience: str | None = None) -> VcClient:
        """A client of the peer vCenter at ``url`` (pinned to ``thumbprint``) whose calls this vCenter signs for it
        (``audience``: its name; by default the name this vCenter trusts at that URL and thumbprint)."""
        if audience is None:
            tp = certs.normalize(thumbprint)
            audience = next((tr["name"] for tr in self.inv.trusts()
                             if tr["url"].rstrip("/") == url.rstrip("/") and certs.normalize(tr["thumbprint"]) == tp),
                            None)
        return VcClient(url, thumbprint=thumbprint, token=token, peer=(self.cfg.name, self.cfg.key),
                        audience=audience)

    def check_with_issuer(self, s: sso.Session, token: str) -> None:
        """A session another vCenter of this domain issued is valid here only while its issuer says so: asked, with
        the token itself, over TLS pinned to the issuer's certificate this vCenter trusts. Fails closed: an issuer
        this vCenter does not trust or cannot reach means no session here (log in here instead)."""
        me, issuer = self.cfg.name, s.issuer
        trust = self.inv.trust(issuer) if peercall.NAME.fullmatch(issuer) else None
        if trust is None:
            raise Unauthorized(f"vCenter {me}: this session was issued by vCenter {peercall.shown(issuer)}, which "
                               f"{me} has no trust with, so it cannot check the session is still valid",
                               hint=f"create a session at {me} with POST /api/session")
        peer = self.peer_client(trust["url"], trust["thumbprint"], token=token, audience=issuer)
        try:
            who = peer.get("/api/session", timeout_s=ISSUER_CHECK_TIMEOUT_S)
        except ApiError as err:
            if err.status != 401:
                raise HostUnreachable(f"vCenter {me} could not check this session with vCenter {issuer}, which "
                                      f"issued it: {err}", hint=f"retry, or create a session at {me}") from err
            self.inv.revoke(s.sid, s.expires_s)     # refused here from now on without asking
            raise Unauthorized(f"vCenter {me}: vCenter {issuer}, which issued this session, no longer accepts "
                               f"it (logged out or expired there): {err}",
                               hint="create a new session with POST /api/session") from err
        except TestbedError as err:
            raise HostUnreachable(f"vCenter {me} cannot check this session with vCenter {issuer}, which issued "
                                  f"it, so it refuses it: {err}",
                                  hint=f"retry when {issuer} answers, or create a session at {me}") from err
        finally:
            peer.close()
        if not isinstance(who, dict) or who.get("vcenter") != issuer or who.get("user") != s.user:
            raise Unauthorized(f"vCenter {me}: vCenter {issuer} did not confirm this session as its own for {s.user}",
                               hint="create a new session with POST /api/session")

    def tell_issuer_logout(self, s: sso.Session, token: str) -> None:
        """Log out at the issuer a session it issued (the issuer is where its peers check it): or fail, and then
        nothing is revoked anywhere (the caller revokes here after this)."""
        trust = self.inv.trust(s.issuer)
        if trust is None:
            raise Unauthorized(f"vCenter {self.cfg.name} has no trust with vCenter {s.issuer}, which issued this "
                               "session; it cannot log it out there")
        peer = self.peer_client(trust["url"], trust["thumbprint"], token=token, audience=s.issuer)
        try:
            peer.delete("/api/session", timeout_s=ISSUER_CHECK_TIMEOUT_S)
        except ApiError as err:
            if err.status != 401:    # 401: already logged out there
                raise HostUnreachable(f"not logged out: vCenter {s.issuer}, which issued this session, refused the "
                                      f"logout: {err}", hint=f"retry, or log out at {s.issuer}") from err
        except TestbedError as err:
            raise HostUnreachable(f"not logged out: vCenter {s.issuer}, which issued this session, could not be "
                                  f"told: {err}", hint=f"retry, or log out at {s.issuer}") from err
        finally:
            peer.close()

    async def establish_trust(self, peer: VcClient) -> dict[str, Any]:
        """Source side: prove who we are to ``peer`` (logged in), and record it as trusted here."""
        about = await peer.aget("/api/testbed/about")
        peer.audience = about["name"]
        nonce = await peer.apost("/api/testbed/trust/challenge")
        import base64
        sig = base64.b64encode(certs.sign(self.cfg.key, f"{nonce}|{self.cfg.name}".encode())).decode()
        await peer.apost("/api/testbed/trust", {
            "name": self.cfg.name, "url": self.cfg.url, "certificate": self.cert_pem, "nonce": nonce,
            "signature": sig})
        if about["certificate"] and certs.thumbprint_pem(about["certificate"]) != peer.thumbprint:
            raise Forbidden(f"vCenter at {peer.url} reports a certificate that is not the one it presented")
        self.inv.put_trust(about["name"], peer.url, str(peer.thumbprint), about["certificate"],
                           how="pinned thumbprint at relocate")
        return dict(about)

    def about(self) -> dict[str, Any]:
        return {"name": self.cfg.name, "fqdn": self.cfg.fqdn, "url": self.cfg.url,
                "sso_domain": self.cfg.sso_domain, "thumbprint": self.thumbprint, "certificate": self.cert_pem,
                "datacenter": self.cfg.datacenter, "version": "testbed-vcenter 1", "started_s": self.started_s}

    async def _connect_peer(self, dest_vc: dict[str, Any], user: str) -> tuple[VcClient, dict[str, Any]]:
        url = dest_vc["url"]
        thumbprint = dest_vc.get("thumbprint")
        trusted = next((tr for tr in self.inv.trusts() if tr["url"].rstrip("/") == url.rstrip("/")), None)
        if thumbprint is None:
            if trusted is None:
                raise InputError(f"no thumbprint given for {url}, and this vCenter has no trust with it",
                                 hint="pass --dest-thumbprint (`testbed vcenter show NAME` prints it)")
            thumbprint = trusted["thumbprint"]
        peer = self.peer_client(url, thumbprint)
        try:
            if dest_vc.get("user_name"):
                await peer.alogin(dest_vc["user_name"], dest_vc.get("password", ""))
            else:
                # enhanced linked mode: the same SSO domain, so this vCenter's session is valid there
                token, _ = sso.issue(self.secret, user, self.cfg.sso_domain, 600, issuer=self.cfg.name)
                peer.token = token
            about = await self.establish_trust(peer) if trusted is None or dest_vc.get("user_name") else \
                await peer.aget("/api/testbed/about")
            peer.audience = about["name"]
        except BaseException:
            peer.close()
            raise
        return peer, about
