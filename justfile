# geminik8s: the one entry point for people and CI. `just --list` shows the recipes.

set shell := ["bash", "-euo", "pipefail", "-c"]

kine_version := "v0.17.5"
# The Kubernetes release K3s v1.34.2+k3s1 embeds; the K3s stand-in runs its kube-apiserver.
kubernetes_version := "v1.34.2"
# The S3-compatible server the s3:// backup tests run (the last release that builds with Rust 1.95).
s3s_fs_version := "0.14.1"
apt_packages := "patch openssh-client postgresql-15 etcd-client iproute2 nftables chrony iputils-ping arping dbus ca-certificates curl build-essential mmdebstrap docker-registry qemu-system-x86 qemu-utils ovmf seabios ipxe-qemu squashfs-tools-ng xorriso mtools dosfstools fdisk cpio"

# Show the recipes.
default:
    @just --list

# Build the whole workspace.
build:
    cargo build --workspace --all-targets

# Build release binaries (gemin_k8s, gemin-image).
release:
    cargo build --workspace --release

# Run every test. Tests that need root or tools print SKIPPED with the reason when they cannot run.
test:
    cargo test --workspace --no-fail-fast

# Formatting and lints, warnings as errors.
lint:
    cargo fmt --all --check
    cargo clippy --workspace --all-targets -- -D warnings

# Regenerate the generated docs (man pages, cloud-config reference).
docs:
    cargo run --quiet -p geminik8s-agent --bin gemin_k8s -- gen-docs --out docs

# Install what the tests need (idempotent): Debian packages, Kine (patched), and kube-apiserver for the K3s stand-in.
deps:
    #!/usr/bin/env bash
    set -euo pipefail
    missing=""
    for p in {{apt_packages}}; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
    done
    if [ -n "$missing" ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing
    fi
    # Kine with the geminik8s patches (image/kine/: a failed create must not be acknowledged).
    image/kine/build-kine.sh {{kine_version}} /usr/local/bin
    # K3s cannot be downloaded everywhere: the K3s stand-in (vm-tests) runs the real
    # kube-apiserver, built from the k8s.io/kubernetes Go module (first build: about 8 minutes).
    vm-tests/k3s-standin/build-kube-apiserver.sh {{kubernetes_version}} /usr/local/bin
    # The S3-compatible server of the s3:// backup tests, built from crates.io (about 3 minutes on 2 cores).
    if [ "$(s3s-fs --version 2>/dev/null)" != "s3s-fs {{s3s_fs_version}}" ]; then
        cargo install s3s-fs@{{s3s_fs_version}} --features binary --locked --root /usr/local
    fi
    command -v kubectl >/dev/null || echo "kubectl is missing: the K3s stand-in tests skip without it" >&2

# A cluster definition in ./lab-cluster, validated as the agent loads it (no root needed).
demo dir="lab-cluster":
    cargo run --quiet -p geminik8s-agent --bin gemin_k8s -- init --name lab --node1-ip 10.77.0.11 --node2-ip 10.77.0.12 --vip 10.77.0.10 --witness gateway --witness-target 10.77.0.254 --config-dir {{dir}} --force
    cargo run --quiet -p geminik8s-agent --bin gemin_k8s -- config validate --no-file-checks {{dir}}/node1.yaml
    cargo run --quiet -p geminik8s-agent --bin gemin_k8s -- config validate --no-file-checks {{dir}}/node2.yaml

# The main job (root): build the image (cached), boot it as two QEMU VMs, wait for the cluster in DIR (made if missing).
lab dir="lab-cluster":
    cargo build -p geminik8s-agent -p geminik8s-vm-tests
    target/debug/gemini-lab qemu up --config-dir {{dir}}

# The QEMU lab test with the killed leader's VM booted again with its disk (it rejoins) instead of replaced by a new machine (root; about 20 minutes).
qemu-rejoin:
    cargo build --workspace
    GEMINIK8S_QEMU_REJOIN=1 cargo test -p geminik8s-vm-tests --test qemu_lab -- --nocapture

# The rolling upgrade on the QEMU lab (root; about 90 minutes): a power cut while a slot is written, a broken release rolled back by its node, 1.0.0 -> 2.0.0 under writes, --rollback.
qemu-upgrade:
    cargo build --workspace
    cargo test -p geminik8s-vm-tests --test qemu_upgrade -- --ignored --nocapture

# Remove the QEMU lab: VMs, namespaces, taps, bridge, disks (logs stay in run/qemu).
lab-down:
    target/debug/gemini-lab qemu down

# The network-namespace lab (root): a cluster in DIR (made if missing), both agents started.
lab-netns dir="lab-cluster":
    cargo build -p geminik8s-agent -p geminik8s-vm-tests
    [ -f {{dir}}/cluster.yaml ] || target/debug/gemin_k8s init --name lab --node1-ip 10.77.0.11 --node2-ip 10.77.0.12 --vip 10.77.0.10 --witness gateway --witness-target 10.77.0.254 --config-dir {{dir}}
    target/debug/gemini-lab netns up --config-dir {{dir}}
    @echo "status: target/debug/gemin_k8s status --socket run/netns/node1/agent.sock; teardown: target/debug/gemini-lab netns down"

# Remove the network-namespace lab.
lab-netns-down:
    target/debug/gemini-lab netns down

# Benchmark (root): kill the leader N times per witness mode under writers on the client and both nodes;
# prints times, phases and lost writes (`just bench-failover 20 gateway,arbiter`). With the K3s stand-in
# built (or GEMINIK8S_K3S_BINARY), it also measures the kill to the first Kubernetes write through the VIP.
bench-failover kills="20" witness="none,gateway,arbiter":
    cargo build --release -p geminik8s-agent -p geminik8s-vm-tests
    k8s=""; if [ -x target/release/k3s-standin ] && command -v kube-apiserver >/dev/null; then k8s=--kubernetes; fi; \
    GEMINIK8S_K3S_BINARY="${GEMINIK8S_K3S_BINARY:-$PWD/target/release/k3s-standin}" target/release/bench-failover --kills {{kills}} --witness {{witness}} --agent-bin target/release/gemin_k8s $k8s

# Benchmark (root): N planned switchovers (`gemin_k8s failover --promote`, back and forth) per witness mode under
# writers on the client and both nodes; prints each writer's write pause, the command's own figure, whether the old
# leader needed pg_rewind, and lost writes (`just bench-switchover 20 none`). With the K3s stand-in built (or
# GEMINIK8S_K3S_BINARY), it also measures the pause of Kubernetes writes through the VIP.
bench-switchover switchovers="20" witness="none,gateway,arbiter":
    cargo build --release -p geminik8s-agent -p geminik8s-vm-tests
    k8s=""; if [ -x target/release/k3s-standin ] && command -v kube-apiserver >/dev/null; then k8s=--kubernetes; fi; \
    GEMINIK8S_K3S_BINARY="${GEMINIK8S_K3S_BINARY:-$PWD/target/release/k3s-standin}" target/release/bench-failover --switchover --switchovers {{switchovers}} --witness {{witness}} --agent-bin target/release/gemin_k8s $k8s

# Benchmark (root): a real PostgreSQL 15 set up as the agent sets it up, Kine's table filled to SIZE_GB of
# Kubernetes-like values (`just bench-backup 5`; other flags: `target/release/bench-backup --help`); `gemin_k8s backup
# create` (age) to a directory and to an s3:// bucket on s3s-fs on loopback (skipped, with the reason, without s3s-fs),
# `gemin_k8s restore` of each, continuous WAL archiving under a steady writer: prints sizes, times, MB/s and lags.
bench-backup size_gb="1":
    cargo build --release -p geminik8s-agent -p geminik8s-vm-tests
    bin="${CARGO_TARGET_DIR:-target}/release"; "$bin/bench-backup" --size-gb {{size_gb}} --agent-bin "$bin/gemin_k8s"

# The chaos suite (root): drawn faults under steady writers in each witness mode; prints the table of
# docs/reliability.md. `just chaos trials=50 witness="none gateway arbiter"`; other words go to `gemini-lab chaos`
# (e.g. --seed 7 --faults cut,kill-leader).
[positional-arguments]
chaos *args:
    #!/usr/bin/env bash
    set -euo pipefail
    trials=5 witness="none gateway arbiter" rest=()
    for a in "$@"; do
        case "$a" in
            trials=*) trials="${a#trials=}" ;;
            witness=*) witness="${a#witness=}" ;;
            *) rest+=("$a") ;;
        esac
    done
    cargo build --release -p geminik8s-agent -p geminik8s-vm-tests
    bin="${CARGO_TARGET_DIR:-target}/release"
    # shellcheck disable=SC2086 # the modes are words
    "$bin/gemini-lab" chaos --trials "$trials" --witness $witness --agent-bin "$bin/gemin_k8s" "${rest[@]}"

# Benchmark (root): build the default image, then again with every input cached (warm); prints both times and the sizes.
# A second argument takes K3s from that file where the release cannot be downloaded
# (`just bench-image image/specs/default.yaml target/debug/k3s-standin` with the K3s stand-in; sizes then differ from the real image).
bench-image spec="image/specs/default.yaml" k3s="":
    #!/usr/bin/env bash
    set -euo pipefail
    cargo build --release -p geminik8s-agent -p geminik8s-image
    out=target/bench-image
    artifacts="--artifact gemin_k8s=target/release/gemin_k8s{{ if k3s != "" { " --artifact k3s=" + k3s } else { "" } }}"
    start=$SECONDS
    target/release/gemin-image build --spec {{spec}} --out $out --replace-target --force $artifacts
    first=$((SECONDS - start))
    start=$SECONDS
    target/release/gemin-image build --spec {{spec}} --out $out --replace-target --force $artifacts
    warm=$((SECONDS - start))
    echo "first build: ${first} s; warm build (everything cached, outputs rebuilt): ${warm} s"
    ls -l $out | grep -v '^d\|^total'
    du -sh --apparent-size $out/*-rootfs.tar

# Build the node image: root filesystem and bootable images (root; Debian packages from the mirror in the spec).
# A second argument takes K3s from that file where the release cannot be downloaded
# (`just image image/specs/default.yaml target/debug/k3s-standin` for a lab image with the K3s stand-in).
image spec="image/specs/default.yaml" k3s="":
    cargo build --release -p geminik8s-agent -p geminik8s-image
    target/release/gemin-image build --spec {{spec}} --out out --artifact gemin_k8s=target/release/gemin_k8s{{ if k3s != "" { " --artifact k3s=" + k3s } else { "" } }}

# What CI runs: deps, lints, tests.
ci: deps lint test
