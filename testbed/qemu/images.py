"""What an image file is, decided without letting QEMU guess: its format from its first bytes, then checked
with ``qemu-img info -f <that format>`` (a format is never probed by qemu-img, so a raw file that looks like
a qcow2 is not opened as one); images that would make QEMU read another file are refused.

The content library (``testbed.vcenter.library``) and the host agent's ``disk.import`` both use this.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

ACCEPTED_FORMATS = ("qcow2", "raw")

# (offset, magic, format) of the formats QEMU knows besides qcow2 and raw: all refused here
_OTHER_MAGIC: tuple[tuple[int, bytes, str], ...] = (
    (0, b"KDMV", "vmdk"), (0, b"COWD", "vmdk"), (0, b"# Disk DescriptorFile", "vmdk"),
    (0, b"conectix", "vpc"), (0, b"vhdxfile", "vhdx"), (64, b"\x7f\x10\xda\xbe", "vdi"),
    (0, b"QED\x00", "qed"), (0, b"LUKS\xba\xbe", "luks"), (0, b"WithoutFreeSpace", "parallels"),
    (0, b"WithouFreSpacExt", "parallels"), (0, b"Bochs Virtual HD Image", "bochs"),
    (0, b"#!/bin/sh\n#V2.0 Format", "cloop"), (0, b"OOOM", "qcow"),
)
QCOW2_MAGIC = b"QFI\xfb"
# initramfs: a cpio archive, or one compressed the ways the kernel unpacks
_INITRD_MAGIC = (b"070701", b"070702", b"070707", b"\x1f\x8b", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd",
                 b"\x02\x21\x4c\x18", b"BZh", b"\x5d\x00\x00", b"\x89LZO")


def probe_format(path: Path) -> str:
    """The image's format from its header: ``qcow2``, ``raw``, or the name of a format this testbed refuses."""
    with path.open("rb") as f:
        head = f.read(1024)
    if head.startswith(QCOW2_MAGIC):
        return "qcow2"
    for off, magic, fmt in _OTHER_MAGIC:
        if head[off:off + len(magic)] == magic:
            return fmt
    return "raw"


def probe_kind(path: Path, fmt: str) -> str:
    """``kernel`` (a bzImage: 'HdrS' at 0x202), ``initrd`` (cpio or a compressed one), else ``disk``."""
    if fmt != "raw":
        return "disk"
    with path.open("rb") as f:
        head = f.read(1024)
    if head[0x202:0x206] == b"HdrS":
        return "kernel"
    if head.startswith(_INITRD_MAGIC):
        return "initrd"
    return "disk"


def info_args(path: Path, fmt: str) -> list[str]:
    """qemu-img's arguments for the check: always ``-f``, never a probe."""
    return ["info", "-U", "--output=json", "-f", fmt, str(path)]


def image_problem(info: dict[str, Any], fmt: str) -> str | None:
    """Why an image (``qemu-img info --output=json -f fmt``'s answer) is refused, or None: another format than
    probed, a backing file, an external data file (each makes QEMU read another file of the host), encryption."""
    if fmt not in ACCEPTED_FORMATS:
        return f"its format is {fmt}; only {' and '.join(ACCEPTED_FORMATS)} are accepted"
    if info.get("format") != fmt:
        return f"qemu-img reads it as {info.get('format')!r}, not {fmt}"
    backing = info.get("full-backing-filename") or info.get("backing-filename")
    if backing:
        return f"it has a backing file ({backing}): QEMU would read that file of the host too"
    data = info.get("format-specific", {}).get("data", {})
    if data.get("data-file") or data.get("data-file-raw"):
        return "it has an external data file: QEMU would read that file of the host too"
    if info.get("encrypted"):
        return "it is encrypted: the testbed cannot open it"
    return None


REFUSED_HINT = ("give a self-contained qcow2 or raw image: `qemu-img convert -O qcow2 IN OUT` makes one "
                "(it folds a backing file in)")
