#!/usr/bin/env bash
# Make a vagrant-libvirt box from the host image: images/host/vagrant-box.sh IMAGEDIR BOX
#
# The box is the host image plus what Vagrant needs to log in the first time: Vagrant's
# well-known insecure public key for root (Vagrant replaces it with a key of its own at the
# first `vagrant up`), and DHCP (systemd-networkd) on eth0, vagrant-libvirt's management NIC.
# Files are written into the ext4 filesystem with debugfs: no loop mounts. The kernel and
# initrd are booted directly (the Vagrantfile points at IMAGEDIR/vmlinuz and initrd.img).
set -euo pipefail
die() { echo "vagrant-box: $*" >&2; exit 1; }
[ $# -eq 2 ] || die "usage: $0 IMAGEDIR BOX"
IMG=$(cd "$1" && pwd); BOX=$2
[ -f "$IMG/manifest.json" ] || die "no host image in $IMG (run \`make host-image\`)"
PUB=$(ls /usr/share/rubygems-integration/all/gems/vagrant-*/keys/vagrant.pub 2>/dev/null | head -n1)
[ -n "$PUB" ] || PUB=$(ls /opt/vagrant/embedded/gems/gems/vagrant-*/keys/vagrant.pub 2>/dev/null | head -n1)
[ -n "$PUB" ] || die "Vagrant's insecure public key not found (is vagrant installed? \`make setup-vagrant\`)"
# the host image's key and this script's own content: a change to either makes a new box
KEY=$(sed -n 's/.*"cache_key": "\([0-9a-f]*\)".*/\1/p' "$IMG/manifest.json")-$(sha256sum "$0" | cut -c1-16)
if [ -f "$BOX" ] && [ -f "$BOX.key" ] && [ "$(cat "$BOX.key")" = "$KEY" ]; then
    echo "vagrant box up to date ($BOX)"; exit 0
fi
TMP=$(mktemp -d "${TMPDIR:-/var/tmp}/tb-vagrant-box.XXXXXX"); trap 'rm -rf "$TMP"' EXIT
qemu-img convert -O raw "$IMG/host.qcow2" "$TMP/root.raw"
# The client identifier is the MAC: every box starts from one image, and a DUID made from it could be the
# same on every host (seen: four hosts given one lease).
printf '[Match]\nName=eth0\n\n[Network]\nDHCP=ipv4\n\n[DHCPv4]\nClientIdentifier=mac\n' > "$TMP/eth0.network"
debugfs -w "$TMP/root.raw" >/dev/null 2>"$TMP/debugfs.log" <<CMDS
mkdir /root/.ssh
write $PUB /root/.ssh/authorized_keys
set_inode_field /root/.ssh mode 040700
set_inode_field /root/.ssh/authorized_keys mode 0100600
write $TMP/eth0.network /etc/systemd/network/10-vagrant-eth0.network
symlink /etc/systemd/system/multi-user.target.wants/systemd-networkd.service /lib/systemd/system/systemd-networkd.service
mkdir /etc/systemd/system/sockets.target.wants
symlink /etc/systemd/system/sockets.target.wants/systemd-networkd.socket /lib/systemd/system/systemd-networkd.socket
CMDS
grep -qi "error\|not found" "$TMP/debugfs.log" && { cat "$TMP/debugfs.log" >&2; die "debugfs failed"; }
qemu-img convert -O qcow2 "$TMP/root.raw" "$TMP/box.img"
rm -f "$TMP/root.raw"
SIZE_G=$(qemu-img info --output=json "$TMP/box.img" | python3 -c 'import json,sys; print(-(-json.load(sys.stdin)["virtual-size"] // 2**30))')
echo "{\"provider\": \"libvirt\", \"format\": \"qcow2\", \"virtual_size\": $SIZE_G}" > "$TMP/metadata.json"
printf 'Vagrant.configure("2") do |c|\n  c.vm.provider :libvirt do |l|\n    l.driver = "kvm"\n  end\nend\n' > "$TMP/Vagrantfile"
tar -C "$TMP" -cf "$TMP/out.box" metadata.json Vagrantfile box.img
mv -f "$TMP/out.box" "$BOX"
echo "$KEY" > "$BOX.key"
echo "vagrant box: $BOX ($(du -h "$BOX" | cut -f1)); add it with: vagrant box add --force --name testbed/host $BOX"
