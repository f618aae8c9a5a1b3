#!/usr/bin/env bash
# System setup for Testbed on Debian 12 (run as root). Idempotent: a second run
# that finds everything in place returns in well under a second.
#
# QEMU and libvirt come from bookworm-backports: Debian 12's own QEMU 7.2
# corrupts migrating guests under TCG (see shared/FINDINGS.md).
set -euo pipefail

STAMP_DIR=${TESTBED_STATE_DIR:-/var/lib/testbed}
STAMP="$STAMP_DIR/system-setup.v1"
[ "$(id -u)" = 0 ] || { echo "setup-system: must run as root (it installs Debian packages)" >&2; exit 1; }

PKGS_MAIN=(busybox-static cpio iproute2 iputils-ping openssh-server openssh-client
           python3-venv python3-dev gcc make libc6-dev pkg-config xz-utils kmod
           bridge-utils ca-certificates openssl)
PKGS_BPO=(qemu-system-x86 qemu-utils libvirt-daemon libvirt-daemon-driver-qemu
          libvirt-clients libvirt-dev)

have_all() {
    local p
    for p in "${PKGS_MAIN[@]}" "${PKGS_BPO[@]}"; do
        dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed' || return 1
    done
    qemu_major=$(qemu-system-x86_64 --version 2>/dev/null | sed -n 's/^QEMU emulator version \([0-9]*\).*/\1/p')
    [ "${qemu_major:-0}" -ge 8 ]
}

if [ -f "$STAMP" ] && have_all; then
    exit 0
fi

. /etc/os-release
if [ "${VERSION_CODENAME:-}" != bookworm ]; then
    echo "setup-system: this script targets Debian 12 (bookworm); found ${PRETTY_NAME:-unknown}." >&2
    echo "  Install QEMU >= 8, libvirt, busybox-static, cpio, iproute2, openssh-server yourself, then rerun." >&2
    exit 1
fi

BPO=/etc/apt/sources.list.d/testbed-bookworm-backports.sources
if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    # Same mirror as the machine's own Debian sources.
    mirror=$(grep -rhs '^URIs:.*debian$\|^URIs:.*debian/$' /etc/apt/sources.list.d/*.sources | head -n1 | awk '{print $2}')
    [ -n "$mirror" ] || mirror=$(awk '/^deb .*bookworm main/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
    [ -n "$mirror" ] || mirror=http://deb.debian.org/debian
    cat > "$BPO" <<SRC
Types: deb
URIs: $mirror
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    echo "setup-system: added bookworm-backports ($mirror)"
fi

export DEBIAN_FRONTEND=noninteractive
echo "setup-system: apt-get update"
apt-get update -qq || echo "setup-system: apt-get update reported errors (unreachable third-party sources are ignored)" >&2
echo "setup-system: installing ${PKGS_MAIN[*]}"
apt-get install -y -qq --no-install-recommends "${PKGS_MAIN[@]}" >/dev/null
echo "setup-system: installing from bookworm-backports: ${PKGS_BPO[*]}"
apt-get install -y -qq --no-install-recommends -t bookworm-backports "${PKGS_BPO[@]}" >/dev/null

# The packaged sshd and libvirtd are not needed as system services: every lab
# host runs its own. Leave their state as the administrator had it.
qemu-system-x86_64 --version | head -n1
mkdir -p "$STAMP_DIR"
touch "$STAMP"
