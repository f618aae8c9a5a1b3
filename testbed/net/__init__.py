"""Switches, VLANs and the WAN of the embedded lab, over iproute2.

Nodes (namespaces) run commands, interfaces are made by ``fabric``, and the
site-to-site link is shaped by ``fabric.shape_link``.
"""
