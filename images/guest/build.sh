#!/usr/bin/env bash
# Build the Testbed guest image: Debian cloud kernel + busybox initramfs with tb-agent.
#
#   images/guest/build.sh OUTDIR
#
# Writes OUTDIR/vmlinuz, OUTDIR/initrd.img and OUTDIR/manifest.json. The kernel
# .deb is fetched once with `apt-get download` into images/guest/cache/. The
# initramfs is reproducible: same inputs -> byte-identical initrd.img.
# If OUTDIR/manifest.json carries the same cache key and the outputs are intact,
# the script exits at once.
set -euo pipefail

die() { echo "guest build: $*" >&2; exit 1; }

[ $# -eq 1 ] || die "usage: $0 OUTDIR"
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
CACHE=${TB_GUEST_CACHE:-$HERE/cache}
META=linux-image-cloud-amd64
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1704067200}   # 2024-01-01T00:00:00Z
export LC_ALL=C TZ=UTC
umask 022

# Modules loaded by init, in this order (init lists them again).
MODULES="virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci
         failover net_failover virtio_net virtio_blk"
# busybox applets used by init.
APPLETS="sh mount insmod ip usleep sleep cat grep echo"

for t in apt-cache apt-get dpkg-deb gcc cpio gzip sha256sum busybox; do
    command -v "$t" >/dev/null || die "missing tool: $t"
done
BUSYBOX=$(command -v busybox)
file_is_static() { ! LC_ALL=C ldd "$1" >/dev/null 2>&1; }
file_is_static "$BUSYBOX" || die "$BUSYBOX is not static; install busybox-static"

# ---- resolve the kernel package (local apt metadata only)
# One apt-cache call when the metapackage pins the version (Debian's do: "(= V)").
DEP=$(apt-cache show --no-all-versions "$META" 2>/dev/null | sed -n 's/^Depends: .*\(linux-image-[0-9][^ ,]*\) *(= *\([^)]*\)).*/\1 \2/p' | head -n1)
KPKG=${DEP%% *}; KVER=${DEP#* }
if [ -z "$DEP" ]; then
    KPKG=$(apt-cache depends "$META" 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
    [ -n "$KPKG" ] || die "cannot resolve $META with apt-cache (run apt-get update?)"
    KVER=$(apt-cache policy "$KPKG" | awk '/Candidate:/ {print $2; exit}')
fi
[ -n "$KVER" ] && [ "$KVER" != "(none)" ] || die "no candidate version for $KPKG"

# ---- cache key over every build input
AGENT_SRCS=$(cd "$HERE" && find agent -type f \( -name '*.c' -o -name '*.h' \) | sort)
KEY=$( {
    echo "kernel $KPKG $KVER"
    echo "sde $SOURCE_DATE_EPOCH"
    echo "modules $MODULES"
    echo "applets $APPLETS"
    echo "busybox $(sha256sum < "$BUSYBOX" | cut -d' ' -f1)"
    echo "gcc $(gcc --version | head -n1)"
    (cd "$HERE" && sha256sum build.sh init $AGENT_SRCS)
} | sha256sum | cut -d' ' -f1)

manifest_ok() {
    local m=$OUT/manifest.json f want
    [ -f "$m" ] || return 1
    grep -q "\"cache_key\": \"$KEY\"" "$m" || return 1
    for f in vmlinuz initrd.img; do
        [ -f "$OUT/$f" ] || return 1
        want=$(sed -n "s/.*\"$f\": \"\([0-9a-f]\{64\}\)\".*/\1/p" "$m")
        [ "$want" = "$(sha256sum < "$OUT/$f" | cut -d' ' -f1)" ] || return 1
    done
}
if manifest_ok; then
    echo "guest image up to date ($OUT, $KPKG $KVER)"
    exit 0
fi

# ---- fetch the kernel package
mkdir -p "$CACHE"
DEB=
for f in "$CACHE/${KPKG}"_*.deb; do
    [ -f "$f" ] || continue
    [ "$(dpkg-deb -f "$f" Version)" = "$KVER" ] && DEB=$f
done
if [ -z "$DEB" ]; then
    echo "guest build: apt-get download $KPKG=$KVER"
    # _apt cannot write into every cache dir; apt then downloads as root with a warning.
    (cd "$CACHE" && apt-get download -q "$KPKG=$KVER" 2>&1 | grep -v 'unsandboxed' || true)
    for f in "$CACHE/${KPKG}"_*.deb; do
        [ -f "$f" ] && [ "$(dpkg-deb -f "$f" Version)" = "$KVER" ] && DEB=$f
    done
    [ -n "$DEB" ] || die "apt-get download $KPKG=$KVER failed"
fi

TMP=$(mktemp -d "${TMPDIR:-/tmp}/tb-guest-build.XXXXXX")
trap 'rm -rf "$TMP"' EXIT

# ---- kernel and modules
mkdir "$TMP/k"
dpkg-deb -x "$DEB" "$TMP/k"
VMLINUZ=$(ls "$TMP"/k/boot/vmlinuz-* | head -n1)
[ -f "$VMLINUZ" ] || die "no vmlinuz in $DEB"
KREL=$(basename "$VMLINUZ"); KREL=${KREL#vmlinuz-}
MODDIR=$TMP/k/lib/modules/$KREL/kernel

R=$TMP/root
mkdir -p "$R"/bin "$R"/sbin "$R"/dev "$R"/proc "$R"/sys "$R"/tmp "$R"/lib/modules
for m in $MODULES; do
    src=$(find "$MODDIR" -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" | head -n1)
    [ -n "$src" ] || die "module $m not found in $KPKG"
    case "$src" in
        *.ko) cp "$src" "$R/lib/modules/$m.ko" ;;
        *.xz) xz -dc "$src" > "$R/lib/modules/$m.ko" ;;
        *.zst) zstd -qdc "$src" > "$R/lib/modules/$m.ko" ;;
    esac
done

# ---- userspace
cp "$BUSYBOX" "$R/bin/busybox"
for a in $APPLETS; do ln -s busybox "$R/bin/$a"; done
install -m 0755 "$HERE/init" "$R/init"
gcc -O2 -static -pthread -Wall -ffile-prefix-map="$HERE"=. \
    -o "$R/bin/tb-agent" $(cd "$HERE" && for s in $AGENT_SRCS; do [ "${s%.c}" != "$s" ] && echo "$HERE/$s"; done)
strip "$R/bin/tb-agent"
# The kernel opens /dev/console before init mounts devtmpfs.
mknod -m 0600 "$R/dev/console" c 5 1 2>/dev/null || echo "guest build: warning: cannot mknod dev/console (not root?)"

# ---- pack reproducibly
chmod -R u+rwX,go+rX,go-w "$R"
find "$R" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
(cd "$R" && find . -mindepth 1 | sort | cpio --quiet -o -H newc --reproducible -R 0:0) \
    | gzip -n -9 > "$TMP/initrd.img"
cp "$VMLINUZ" "$TMP/vmlinuz"

sum() { sha256sum < "$1" | cut -d' ' -f1; }
cat > "$TMP/manifest.json" <<EOF
{
  "kernel_package": "$KPKG",
  "kernel_version": "$KVER",
  "kernel_release": "$KREL",
  "cache_key": "$KEY",
  "source_date_epoch": $SOURCE_DATE_EPOCH,
  "sha256": {
    "vmlinuz": "$(sum "$TMP/vmlinuz")",
    "initrd.img": "$(sum "$TMP/initrd.img")"
  }
}
EOF
# outputs first, manifest last: an interrupted build is never "up to date"
rm -f "$OUT/manifest.json"
mv -f "$TMP/vmlinuz" "$OUT/vmlinuz"
mv -f "$TMP/initrd.img" "$OUT/initrd.img"
mv -f "$TMP/manifest.json" "$OUT/manifest.json"
echo "guest image built: $OUT (kernel $KPKG $KVER, initrd $(stat -c %s "$OUT/initrd.img") bytes)"
