# Sourced by the scripts that build Go programs from a module's sources
# (image/kine/build-kine.sh, vm-tests/k3s-standin/build-kube-apiserver.sh).
#
# go_module_source MODULE@VERSION DEST: a writable copy of the module's
# sources in DEST, fetched into a scratch module and build cache under
# DEST's parent (removed by the caller's `rm -rf "$work"`).
go_module_source() {
    local module="$1" dest="$2" dir
    command -v go >/dev/null || { echo "Go is needed to build ${module%@*}: install Go 1.24 or newer" >&2; exit 1; }
    export GOMODCACHE="$(dirname "$dest")/mod" GOCACHE="$(dirname "$dest")/cache" GOFLAGS=-modcacherw
    local answer
    answer="$(go mod download -json "$module")" || {
        echo "go mod download $module failed: $answer" >&2
        exit 1
    }
    dir="$(sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p' <<<"$answer")"
    [ -d "$dir" ] || { echo "go mod download $module gave no module directory: $answer" >&2; exit 1; }
    cp -r "$dir" "$dest"
    chmod -R u+w "$dest"
}
