"""A vCenter service's configuration, written by whoever deploys it (``deploy``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class VcenterConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str                        # vc-a
    fqdn: str                        # vc-a.<lab>.test: in its certificate, resolvable in the lab
    address: str                     # 198.18.0.2: where the API listens
    port: int = 443
    dir: str                         # everything this vCenter keeps: inventory, keys, certificate, log
    sso_domain: str                  # vsphere-a.local
    session_ttl_s: int = 3600
    datacenter: str = "Datacenter"
    cluster: str = "Cluster"
    lab: str                         # the lab it runs in: its observer, its link settings
    site_index: int = 0              # picks this vCenter's pool of VM addresses
    vm_ip_pool: int = Field(default=4096, description="addresses per vCenter pool")
    reconcile_every_s: float = 60.0  # compare inventory and hosts this often (0: only on request)

    @property
    def url(self) -> str:
        return f"https://{self.fqdn}" + ("" if self.port == 443 else f":{self.port}")

    @property
    def path(self) -> Path:
        return Path(self.dir)

    @property
    def cert(self) -> Path:
        return self.path / "cert.pem"

    @property
    def key(self) -> Path:
        return self.path / "key.pem"

    @property
    def domain_secret(self) -> Path:
        return self.path / "sso-domain.secret"

    @property
    def ssh_key(self) -> Path:
        return self.path / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.path / "known_hosts"

    @property
    def inventory(self) -> Path:
        return self.path / "inventory.db"

    @property
    def pidfile(self) -> Path:
        return self.path / "vcenter.pid"

    @property
    def library(self) -> Path:
        """The content library: ``items/`` (the files, copied in) and ``catalog.json`` (what each one is)."""
        return self.path / "library"

    @property
    def library_items(self) -> Path:
        return self.library / "items"

    @property
    def log(self) -> Path:
        return self.path / "vcenter.log"

    @classmethod
    def load(cls, path: Path) -> VcenterConfig:
        return cls.model_validate_json(path.read_text())
