"""The VMM layer: VM specs, QEMU command lines, QMP sessions."""
