"""The vMotion engine: phases (``phases``), the report (``report``), the driver (``engine``)."""
