"""Scenarios: one YAML file per experiment (``model``, ``load``), run against a lab's vCenters
(``runner``), reported as JSON and as a page with charts (``report``)."""
