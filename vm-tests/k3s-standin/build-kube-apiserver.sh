#!/usr/bin/env bash
# Build kube-apiserver from the k8s.io/kubernetes Go module (the version K3s
# embeds) for the K3s stand-in, and install it into BINDIR. Idempotent: does
# nothing when BINDIR/kube-apiserver already reports the version.
#
# The module's go.mod replaces the k8s.io/* staging modules with ./staging
# paths that the module zip does not carry; the build drops those replaces and
# requires the published staging modules at the matching v0.x version instead.
# The sources and Go's build cache live in a scratch directory removed at the
# end: together about 4 GB that nothing else needs once the binary is installed.
#
# Usage: build-kube-apiserver.sh [VERSION [BINDIR]]   (default v1.34.2 /usr/local/bin)
set -euo pipefail

version="${1:-v1.34.2}"
bindir="${2:-/usr/local/bin}"
target="$bindir/kube-apiserver"

if [ -x "$target" ] && "$target" --version 2>/dev/null | grep -qx "Kubernetes $version"; then
    echo "kube-apiserver $version: $target"
    exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# shellcheck source=image/kine/go-module.sh
. "$(dirname "$0")/../../image/kine/go-module.sh"
go_module_source "k8s.io/kubernetes@$version" "$work/kubernetes"

# v1.34.2 -> the staging modules' v0.34.2.
staging_version="v0.${version#v1.}"
cd "$work/kubernetes"
rm -f go.work go.work.sum

edits=()
for module in $(go mod edit -json | sed -n 's|^[[:space:]]*"Path": "\./staging/src/\(k8s\.io/[^"]*\)"$|\1|p'); do
    edits+=("-dropreplace=$module" "-require=$module@$staging_version")
done
[ "${#edits[@]}" -gt 0 ] || { echo "no ./staging replaces found in k8s.io/kubernetes@$version go.mod" >&2; exit 1; }
go mod edit "${edits[@]}"
echo "building kube-apiserver $version against $(( ${#edits[@]} / 2 )) published k8s.io staging modules at $staging_version"

ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$version -X $pkg.gitMajor=$(echo "$version" | cut -d. -f1 | tr -d v)"
    ldflags+=" -X $pkg.gitMinor=$(echo "$version" | cut -d. -f2) -X $pkg.gitTreeState=clean"
done
mkdir -p "$bindir"
GOFLAGS="-mod=mod -modcacherw" CGO_ENABLED=0 go build -trimpath -ldflags "$ldflags" -o "$work/kube-apiserver" ./cmd/kube-apiserver
install -m 0755 "$work/kube-apiserver" "$target"
"$target" --version
