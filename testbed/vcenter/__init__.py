"""vCenter Server, simulated: one service per site with its own SSO domain, inventory and HTTPS API.

- ``certs``: the service's self-signed certificate and its SHA-256 thumbprint.
- ``sso``: users (hashed passwords) and signed, expiring session tokens.
- ``inventory``: the persistent inventory (SQLite): datacenter, clusters, hosts,
  datastores, networks, VMs, tasks, events, trusted peers.
- ``hostconn``: adding a host the ESXi way (SSH with root's password, key and agent installed).
- ``service``: the vCenter's operations (VMs, relocate, admission, reconcile).
- ``prechecks``: the named checks a cross-vCenter relocate runs.
- ``api``: the HTTPS API (FastAPI), shaped after the vSphere Automation REST API; ``limits``: every
  input's rule (the API, scenarios and the CLI use its types); ``views``: its answers' shapes;
  ``api_errors``: one error shape, the status of each error.
- ``client``: a small Python client, with certificate thumbprint pinning.
- ``deploy``: starting a lab's vCenter services and adding its hosts to them.
- ``vmspec``: a new VM's spec and its making on a host; ``labvms``: a lab's VMs through its vCenters.
"""
