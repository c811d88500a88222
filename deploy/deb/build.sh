#!/bin/sh
# Build the Debian package clawgress_<version>_<arch>.deb from a clawgress
# binary with nothing but dpkg-deb: `clawgress install --root STAGING` lays
# out the files (the same layout as on a host), this script adds DEBIAN/
# (control, conffiles, maintainer scripts from this directory).
#
#   deploy/deb/build.sh [BINARY] [OUTDIR]
#     BINARY  default: target/release/clawgress  (cargo build --release)
#     OUTDIR  default: target/deb
#   DEB_COMPRESS=xz|zstd|gzip|none   (default: xz)
#
# Prints the path of the package it wrote.
set -eu
umask 022
here=$(cd "$(dirname "$0")" && pwd)
bin=${1:-target/release/clawgress}
out=${2:-target/deb}
compress=${DEB_COMPRESS:-xz}

if [ ! -x "$bin" ]; then
  echo "build.sh: $bin is not an executable clawgress binary (cargo build --release --bin clawgress)" >&2
  exit 2
fi
command -v dpkg-deb >/dev/null || { echo "build.sh: dpkg-deb not found (apt install dpkg)" >&2; exit 2; }

version=$("$bin" --version | awk '{print $2}')
case "$version" in
  [0-9]*) ;;
  *) echo "build.sh: cannot read a version from '$bin --version'" >&2; exit 2 ;;
esac
arch=$(dpkg --print-architecture)

staging=$(mktemp -d)
trap 'rm -rf "$staging"' EXIT
root="$staging/root"
mkdir -m 0755 "$root"
"$bin" install --root "$root" --unit-dir /lib/systemd/system >/dev/null
# The state directory belongs to the host, not the package: postinst makes
# it (systemd-tmpfiles), owned by clawgress; purging never deletes it.
rm -rf "$root/var"

# The newest glibc symbol version the binary needs.
glibc=$(objdump -T "$bin" 2>/dev/null | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -V | tail -n 1 || true)
libc_dep="libc6${glibc:+ (>= $glibc)}"

mkdir -m 0755 "$root/DEBIAN"
size=$(du -sk "$root" | cut -f1)
sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@SIZE@/$size/" -e "s/@LIBC@/$libc_dep/" \
  "$here/control" > "$root/DEBIAN/control"
install -m 0644 "$here/conffiles" "$root/DEBIAN/conffiles"
for s in postinst prerm postrm; do
  install -m 0755 "$here/$s" "$root/DEBIAN/$s"
done

mkdir -p "$out"
deb="$out/clawgress_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Z"$compress" --build "$root" "$deb" >/dev/null
echo "$deb"
