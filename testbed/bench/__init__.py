"""``testbed bench``: the engine against libvirt's own live migration, side by side, in one run."""
