"""Testbed: Cross-vCenter vMotion (XvMotion) reproduced end to end on QEMU."""

__version__ = "0.1.0"
