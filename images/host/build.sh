#!/usr/bin/env bash
# Build the Testbed host image: the L1 "ESXi" of the nested and Vagrant host kinds.
#
#   images/host/build.sh OUTDIR
#
# Debian 12 (debootstrap --variant=minbase) with systemd, openssh-server, Python,
# QEMU from bookworm-backports, the host agent (this repo's `testbed` package,
# the modules `testbed-hostd` and `testbed-provision` import, with their wheels
# from PyPI) and the built-in L2 guest image (images/guest/build) under
# /usr/share/testbed/guest. Writes OUTDIR/host.qcow2 (compressed, one ext4
# filesystem, no partition table), OUTDIR/vmlinuz + OUTDIR/initrd.img (direct
# kernel boot: root=/dev/vda) and OUTDIR/manifest.json (cache key, package
# versions, sha256 of the outputs, the agent's source hash).
#
# Cached by content: if OUTDIR/manifest.json carries the same cache key and the
# outputs are intact, the script exits at once. The key covers this script, the
# files under images/host/rootfs, the candidate versions of every package named
# here (local apt metadata), the wheels' pins, the agent's sources and the
# guest image's own cache key. No loop mounts: mkfs.ext4 -d fills the filesystem.
set -euo pipefail

die() { echo "host build: $*" >&2; exit 1; }

[ $# -eq 1 ] || die "usage: $0 OUTDIR"
[ "$(id -u)" = 0 ] || die "must run as root (debootstrap, chroot)"
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
CACHE=${TB_HOST_CACHE:-$HERE/cache}
PY=${TB_PYTHON:-$REPO/.venv/bin/python}
GUEST=${TESTBED_GUEST_IMAGE:-$REPO/images/guest/build}
SUITE=bookworm
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1704067200}   # 2024-01-01T00:00:00Z
export LC_ALL=C TZ=UTC
umask 022

# Debian packages (main suite; QEMU from backports). Small: minbase, no recommends.
PKGS_MAIN="systemd-sysv udev dbus linux-image-cloud-amd64 initramfs-tools openssh-server python3
           iproute2 kmod procps"
PKGS_BPO="qemu-system-x86 qemu-utils"
# The agent's Python dependencies (what `testbed-hostd` imports), pinned.
WHEELS="pydantic==2.14.4 pydantic_core==2.50.5 annotated_types==0.8.0 typing_extensions==4.16.0
        typing_inspection==0.4.5 qemu.qmp==0.0.6"
IMAGE_SIZE=${TB_HOST_IMAGE_SIZE:-24G}   # ext4 size (sparse); datastores live on it
UUID=7e57bed0-0000-4000-8000-000000000001

for t in debootstrap chroot mkfs.ext4 qemu-img sha256sum apt-cache; do
    command -v "$t" >/dev/null || die "missing tool: $t (run \`make setup-host-image\`)"
done
[ -x "$PY" ] || die "no Python at $PY (run \`make setup\`)"
[ -f "$GUEST/manifest.json" ] || die "no guest image at $GUEST (run \`make image\`)"
MIRROR=$(grep -rhs '^URIs:.*debian/\?$' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1 | awk '{print $2}')
[ -n "$MIRROR" ] || MIRROR=$(awk '/^deb .*bookworm main/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
[ -n "$MIRROR" ] || MIRROR=http://deb.debian.org/debian

# ---- the agent's sources: every testbed module the agent and the provisioner import (testbed.hosts.hostimage)
AGENT_FILES=$(cd "$REPO" && "$PY" -m testbed.hosts.hostimage files)
[ -n "$AGENT_FILES" ] || die "cannot list the agent's modules"
AGENT_SHA=$(cd "$REPO" && sha256sum $AGENT_FILES | sha256sum | cut -d' ' -f1)
GUEST_KEY=$(sed -n 's/.*"cache_key": "\([0-9a-f]*\)".*/\1/p' "$GUEST/manifest.json")

versions() {   # candidate versions from local apt metadata: "pkg ver" lines
    local p
    for p in $PKGS_MAIN; do echo "$p $(apt-cache policy "$p" 2>/dev/null | awk '/Candidate:/ {print $2; exit}')"; done
    for p in $PKGS_BPO; do
        echo "$p $(apt-cache madison "$p" 2>/dev/null | awk -F'|' '/bookworm-backports/ {gsub(/ /,"",$2); print $2; exit}')"
    done
}
VERSIONS=$(versions)
KEY=$( {
    echo "suite $SUITE sde $SOURCE_DATE_EPOCH size $IMAGE_SIZE"
    echo "$VERSIONS"
    echo "wheels $WHEELS"
    echo "agent $AGENT_SHA"
    echo "guest $GUEST_KEY"
    (cd "$HERE" && sha256sum build.sh && find rootfs -type f | sort | xargs sha256sum)
} | sha256sum | cut -d' ' -f1)

manifest_ok() {
    local m=$OUT/manifest.json f want
    [ -f "$m" ] || return 1
    grep -q "\"cache_key\": \"$KEY\"" "$m" || return 1
    for f in host.qcow2 vmlinuz initrd.img; do
        [ -f "$OUT/$f" ] || return 1
        want=$(sed -n "s/.*\"$f\": \"\([0-9a-f]\{64\}\)\".*/\1/p" "$m")
        [ "$want" = "$(sha256sum < "$OUT/$f" | cut -d' ' -f1)" ] || return 1
    done
}
if manifest_ok; then
    echo "host image up to date ($OUT)"
    exit 0
fi
T0=$(date +%s)

# ---- wheels (pip's own client, PyPI), cached
mkdir -p "$CACHE/wheels"
# shellcheck disable=SC2086
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    -d "$CACHE/wheels" $WHEELS

TMP=$(mktemp -d "${TMPDIR:-/var/tmp}/tb-host-build.XXXXXX")
R=$TMP/root
cleanup() {
    for m in "$R/proc" "$R/sys" "$R/dev/pts"; do mountpoint -q "$m" 2>/dev/null && umount -l "$m"; done
    rm -rf "$TMP"
}
trap cleanup EXIT

# ---- Debian
echo "host build: debootstrap $SUITE ($MIRROR)"
debootstrap --variant=minbase --include="$(echo $PKGS_MAIN | tr ' ' ,)" "$SUITE" "$R" "$MIRROR" \
    > "$TMP/debootstrap.log" 2>&1 || { tail -n 30 "$TMP/debootstrap.log" >&2; die "debootstrap failed"; }
mount -t proc proc "$R/proc"
mount -t sysfs sys "$R/sys"
printf '#!/bin/sh\nexit 101\n' > "$R/usr/sbin/policy-rc.d"; chmod 755 "$R/usr/sbin/policy-rc.d"
cat > "$R/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb $MIRROR $SUITE-backports main
EOF
echo "host build: QEMU from $SUITE-backports"
chroot "$R" apt-get update -qq
# shellcheck disable=SC2086
DEBIAN_FRONTEND=noninteractive chroot "$R" apt-get install -y -qq --no-install-recommends \
    -t "$SUITE-backports" $PKGS_BPO > "$TMP/apt.log" 2>&1 || { tail -n 30 "$TMP/apt.log" >&2; die "apt-get failed"; }

# ---- the agent and its wheels
"$PY" -m pip install -q --disable-pip-version-check --no-deps --no-index --no-compile \
    --target "$R/opt/testbed/lib" "$CACHE"/wheels/*.whl
(cd "$REPO" && for f in $AGENT_FILES; do install -D -m 0644 "$f" "$R/opt/testbed/lib/$f"; done)
for d in $(cd "$R/opt/testbed/lib" && find testbed -type d); do
    [ -f "$R/opt/testbed/lib/$d/__init__.py" ] || : > "$R/opt/testbed/lib/$d/__init__.py"
done
rm -rf "$R"/opt/testbed/lib/*.dist-info/RECORD "$R"/opt/testbed/lib/bin
echo "$AGENT_SHA" > "$R/opt/testbed/AGENT_SHA256"

# ---- the L2 guest image
install -d "$R/usr/share/testbed/guest"
install -m 0644 "$GUEST/vmlinuz" "$GUEST/initrd.img" "$GUEST/manifest.json" "$R/usr/share/testbed/guest/"

# ---- configuration shipped in the image (identity comes at first boot: testbed-provision)
cp -r --no-preserve=ownership "$HERE/rootfs/." "$R/"
chmod 0755 "$R"/usr/local/bin/*
chroot "$R" systemctl enable testbed-provision.service >/dev/null
chroot "$R" systemctl disable systemd-networkd.service systemd-networkd.socket >/dev/null 2>&1 || true
chroot "$R" systemctl mask systemd-timesyncd.service apt-daily.timer apt-daily-upgrade.timer \
    e2scrub_reap.service >/dev/null 2>&1 || true
echo "testbed-host" > "$R/etc/hostname"
printf '/dev/vda / ext4 defaults,noatime 0 1\n' > "$R/etc/fstab"
: > "$R/etc/machine-id"
chroot "$R" passwd -l root >/dev/null
# A small initramfs: the root disk is virtio-blk (ext4 is built into the cloud kernel).
sed -i 's/^MODULES=.*/MODULES=list/' "$R/etc/initramfs-tools/initramfs.conf"
printf 'virtio_pci\nvirtio_blk\n' >> "$R/etc/initramfs-tools/modules"
chroot "$R" update-initramfs -u -k all > /dev/null 2>&1 || die "update-initramfs failed"
umount -l "$R/proc" "$R/sys"
PKG_LIST=$(chroot "$R" dpkg-query -W -f '${Package} ${Version}\n' | sort)

# ---- strip what differs per build or per host
rm -f "$R"/etc/ssh/ssh_host_* "$R/usr/sbin/policy-rc.d"
rm -rf "$R"/var/lib/apt/lists/* "$R"/var/cache/apt/*.bin "$R"/var/cache/apt/archives/*.deb \
       "$R"/var/log/* "$R"/var/cache/debconf/*-old "$R"/var/lib/dpkg/*-old "$R"/tmp/* "$R"/root/.cache
find "$R/usr" "$R/opt" -name __pycache__ -type d -prune -exec rm -rf {} +
cp -L "$R"/boot/vmlinuz-* "$TMP/vmlinuz"
cp -L "$R"/boot/initrd.img-* "$TMP/initrd.img"

# ---- filesystem and qcow2, reproducibly
find "$R" -xdev -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
truncate -s "$IMAGE_SIZE" "$TMP/host.raw"
E2FSPROGS_FAKE_TIME=$SOURCE_DATE_EPOCH mkfs.ext4 -q -F -L tb-host -U "$UUID" \
    -E "hash_seed=$UUID,root_owner=0:0" -d "$R" "$TMP/host.raw"
qemu-img convert -q -O qcow2 -c "$TMP/host.raw" "$TMP/host.qcow2"
rm -f "$TMP/host.raw"

sum() { sha256sum < "$1" | cut -d' ' -f1; }
KREL=$(basename "$R"/boot/vmlinuz-*); KREL=${KREL#vmlinuz-}
{
    echo "{"
    echo "  \"cache_key\": \"$KEY\","
    echo "  \"agent_sha256\": \"$AGENT_SHA\","
    echo "  \"guest_cache_key\": \"$GUEST_KEY\","
    echo "  \"kernel_release\": \"$KREL\","
    echo "  \"source_date_epoch\": $SOURCE_DATE_EPOCH,"
    echo "  \"build_seconds\": $(( $(date +%s) - T0 )),"
    echo "  \"packages\": ["
    echo "$PKG_LIST" | sed 's/^\(.*\) \(.*\)$/    "\1=\2",/' | sed '$ s/,$//'
    echo "  ],"
    echo "  \"sha256\": {"
    echo "    \"host.qcow2\": \"$(sum "$TMP/host.qcow2")\","
    echo "    \"vmlinuz\": \"$(sum "$TMP/vmlinuz")\","
    echo "    \"initrd.img\": \"$(sum "$TMP/initrd.img")\""
    echo "  }"
    echo "}"
} > "$TMP/manifest.json"
# outputs first, manifest last: an interrupted build is never "up to date"
rm -f "$OUT/manifest.json"
mv -f "$TMP/host.qcow2" "$OUT/host.qcow2"
mv -f "$TMP/vmlinuz" "$OUT/vmlinuz"
mv -f "$TMP/initrd.img" "$OUT/initrd.img"
mv -f "$TMP/manifest.json" "$OUT/manifest.json"
echo "host image built in $(( $(date +%s) - T0 )) s: $OUT/host.qcow2 ($(du -h "$OUT/host.qcow2" | cut -f1))"
