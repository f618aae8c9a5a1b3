"""SSO: log in to this vCenter's domain, check a session token, log out (the token is revoked).

In linked mode a token of this domain may come from another vCenter of it: its issuer is the one that knows
whether it was logged out, so it is asked (``Trust.check_with_issuer``) on every use here, and a logout here of
its session is done there first (``Trust.tell_issuer_logout``).
"""

from __future__ import annotations

from testbed.errors import Unauthorized
from testbed.vcenter import sso
from testbed.vcenter.trust import Trust


class Auth(Trust):
    """SSO sessions of this vCenter's domain."""

    def _qualify(self, user: str) -> str:
        return user if "@" in user else f"{user}@{self.cfg.sso_domain}"

    def login(self, user: str, password: str) -> str:
        user = self._qualify(user)
        domain = user.split("@", 1)[1]
        if domain != self.cfg.sso_domain:
            raise Unauthorized(f"user {user} is not in SSO domain {self.cfg.sso_domain} of vCenter {self.cfg.name}",
                               hint=f"log in as a user of {self.cfg.sso_domain}")
        row = self.inv.user(user)
        if row is None or not sso.check_password(password, row["password_hash"]):
            self.inv.event("UserLoginFailedEvent", f"failed login for {user}")
            raise Unauthorized(f"wrong user name or password for vCenter {self.cfg.name} ({self.cfg.sso_domain})",
                               hint="the lab keeps the administrator's password in "
                                    f"{self.cfg.path / 'administrator.password'}")
        token, _ = sso.issue(self.secret, user, self.cfg.sso_domain, self.cfg.session_ttl_s, issuer=self.cfg.name)
        self.inv.event("UserLoginSessionEvent", f"{user} logged in")
        return token

    def authenticate(self, token: str | None) -> sso.Session:
        """The session of ``token``: this domain's, not expired, not logged out here, and (one another vCenter of
        the domain issued) still valid at its issuer. Blocking (the issuer is asked over HTTPS): call it from a
        worker thread."""
        if not token:
            raise Unauthorized("this request needs a session: send the vmware-api-session-id header",
                               hint="create a session with POST /api/session (basic auth)")
        try:
            s = sso.verify(self.secret, self.cfg.sso_domain, token)
        except sso.TokenError as err:
            raise Unauthorized(f"vCenter {self.cfg.name}: {err}",
                               hint="create a new session with POST /api/session") from err
        if self.inv.revoked(s.sid):
            raise Unauthorized(f"vCenter {self.cfg.name}: this session was logged out",
                               hint="create a new session with POST /api/session")
        if s.issuer != self.cfg.name:
            self.check_with_issuer(s, token)
        return s

    def logout(self, s: sso.Session, token: str | None = None) -> None:
        """Revoke the session here; one another vCenter issued is logged out there first (``token``: the session's,
        needed for that), and if that fails nothing is revoked (the logout can be retried)."""
        elsewhere = s.issuer != self.cfg.name
        if elsewhere:
            if token is None:
                raise Unauthorized(f"vCenter {self.cfg.name}: logging out a session of vCenter {s.issuer} needs "
                                   "its token")
            self.tell_issuer_logout(s, token)
        self.inv.revoke(s.sid, s.expires_s)
        self.inv.event("UserLogoutSessionEvent", f"{s.user} logged out" +
                       (f" (a session of vCenter {s.issuer}, logged out there too)" if elsewhere else ""),
                       issuer=s.issuer)
