#!/usr/bin/env bash
# Vagrant and vagrant-libvirt from Debian 12's own packages, for the Vagrant lab (Vagrantfile).
# Not needed by `make test`. Idempotent. Also libvirt's network driver (vagrant-libvirt makes its
# networks with it) and storage driver (its pools hold the box and the disks) from bookworm-backports,
# to match libvirt 11 -- but never libvirt's `default`
# network (libvirt-daemon-config-network is not installed).
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "setup-vagrant: must run as root (it installs Debian packages)" >&2; exit 1; }
PKGS=(vagrant vagrant-libvirt)
PKGS_BPO=(libvirt-daemon-driver-network libvirt-daemon-driver-storage)
need=0
for p in "${PKGS[@]}" "${PKGS_BPO[@]}" dnsmasq-base; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed' || need=1
done
[ $need = 1 ] || exit 0
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -qq --no-install-recommends -t bookworm-backports "${PKGS_BPO[@]}" dnsmasq-base >/dev/null
apt-get install -y -qq --no-install-recommends "${PKGS[@]}" >/dev/null
vagrant --version
