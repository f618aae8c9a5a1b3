"""Trust between vCenters: a peer proves it holds its certificate's key over our challenge and an administrator
vouches for it; afterwards its requests are signed and checked here (``verify_peer``)."""

from __future__ import annotations

import secrets
import time
from typing import Any

from testbed.errors import Forbidden, InputError
from testbed.vcenter import certs, sso
from testbed.vcenter.base import VcBase
from testbed.vcenter.client import VcClient

PEER_CLOCK_SKEW_S = 300


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

    def verify_peer(self, name: str | None, ts: str | None, sig_b64: str | None, method: str, path: str,
                    body: bytes) -> str:
        import base64

        from testbed.vcenter.client import signing_message
        if not name or not ts or not sig_b64:
            raise Forbidden(f"vCenter {self.cfg.name} only accepts this from a trusted peer vCenter "
                            "(signed request headers missing)")
        trust = self.inv.trust(name)
        if trust is None:
            raise Forbidden(f"vCenter {self.cfg.name} does not trust vCenter {name!r}; refusing",
                            hint="a relocate from it establishes the trust with an administrator's login here")
        try:
            skew = abs(time.time() - float(ts))
            sig = base64.b64decode(sig_b64)
        except ValueError as err:
            raise Forbidden("malformed peer signature headers") from err
        if skew > PEER_CLOCK_SKEW_S:
            raise Forbidden(f"peer request from {name} is {skew:.0f} s off this vCenter's clock")
        if not certs.verify(trust["cert_pem"], signing_message(method, path, ts, body), sig):
            raise Forbidden(f"the request claims to come from vCenter {name} but its signature does not verify")
        return name

    def peer_client(self, url: str, thumbprint: str, token: str | None = None) -> VcClient:
        return VcClient(url, thumbprint=thumbprint, token=token, peer=(self.cfg.name, self.cfg.key))

    async def establish_trust(self, peer: VcClient) -> dict[str, Any]:
        """Source side: prove who we are to ``peer`` (logged in), and record it as trusted here."""
        about = await peer.aget("/api/testbed/about")
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
                token, _ = sso.issue(self.secret, user, self.cfg.sso_domain, 600)
                peer.token = token
            about = await self.establish_trust(peer) if trusted is None or dest_vc.get("user_name") else \
                await peer.aget("/api/testbed/about")
        except BaseException:
            peer.close()
            raise
        return peer, about
