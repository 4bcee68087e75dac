#!/usr/bin/env bash
# Build Kine VERSION with the patches in this directory and install it into
# BINDIR as `kine`. Idempotent: does nothing when BINDIR/kine already
# reports the patched version.
#
# Why patched: Kine v0.17.5's Create (pkg/logstructured) answers a create
# whose insert failed (its PostgreSQL connection cut mid-statement, as in a
# restart or a failover) with success and the current revision when the key
# does not exist: a write acknowledged that never happened. The patch
# returns the insert's error instead. See docs/image.md.
#
# The sources and Go's caches live in a scratch directory removed at the end.
#
# Usage: build-kine.sh [VERSION [BINDIR]]   (default v0.17.5 /usr/local/bin)
set -euo pipefail

version="${1:-v0.17.5}"
bindir="${2:-/usr/local/bin}"
patches="$(cd "$(dirname "$0")" && pwd)"
local_version="$version+geminik8s.1"
target="$bindir/kine"

if [ -x "$target" ] && "$target" --version 2>/dev/null | grep -qF "kine version $local_version "; then
    echo "kine $local_version: $target"
    exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# shellcheck source=image/kine/go-module.sh
. "$patches/go-module.sh"
go_module_source "github.com/k3s-io/kine@$version" "$work/kine"
cd "$work/kine"
for p in "$patches"/*.patch; do
    echo "applying $(basename "$p")"
    patch -p1 --forward --silent < "$p"
done

mkdir -p "$bindir"
CGO_ENABLED=1 go build -trimpath -ldflags "-X github.com/k3s-io/kine/pkg/version.Version=$local_version -X github.com/k3s-io/kine/pkg/version.GitCommit=$version" -o "$work/kine-bin" .
install -m 0755 "$work/kine-bin" "$target"
"$target" --version
