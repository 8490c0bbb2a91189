# Sourced by tests/check, tests/demo, tests/matrix and tests/bench/run: installs what is
# missing and leaves $VENV ready.
# Debian/Ubuntu: docker.io (dockerd), busybox-static (a static /bin/busybox for runnable
# fixture images), python3-venv, systemd (systemd-analyze), openssl and iproute2 (ss),
# debootstrap, e2fsprogs (mkfs.ext4); then a virtualenv with gcd and its test tools.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
    echo "run as root (sudo): the tests and the demo start a private dockerd" >&2
    exit 2
fi

missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
# ldd fails on a static binary: that is the busybox a FROM-scratch image can run.
if [ ! -x /bin/busybox ] || ldd /bin/busybox >/dev/null 2>&1; then missing+=(busybox-static); fi
python3 -c "import ensurepip, venv" 2>/dev/null || missing+=(python3-venv)
# systemd-analyze checks the units (a minimal image or container may lack systemd).
command -v systemd-analyze >/dev/null || missing+=(systemd)
# openssl makes the certificates of the test engine's TLS listener (tcp:// with --tlsverify).
command -v openssl >/dev/null || missing+=(openssl)
# ss counts the test process's connections to the engine (sock_diag shows each one's peer).
command -v ss >/dev/null || missing+=(iproute2)
# debootstrap makes the clean Debian root the package test installs gcd's .deb into.
command -v debootstrap >/dev/null || missing+=(debootstrap)
# The disk-pressure tests make small ext4 loop filesystems (a minimal Debian 13 lacks it).
command -v mkfs.ext4 >/dev/null || missing+=(e2fsprogs)
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

VENV=${GCD_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[test]"
# promtool (lints /metrics, unit-tests the example alert rules) and the Prometheus server
# (tests/integration/test_prometheus.py runs it on a loopback port): taken out of Debian's
# packages without installing them, so no Prometheus service is ever started on this machine.
# Debian 13 ships promtool as a package of its own; Debian 12 inside prometheus.
if [ ! -x "$VENV/bin/promtool" ] || [ ! -x "$VENV/bin/prometheus" ]; then
    deb_dir=$(mktemp -d)
    fetch() { (cd "$deb_dir" && apt-get download -qq "$1" >/dev/null 2>&1); }
    fetch prometheus || {
        apt-get update -qq
        fetch prometheus
    }
    fetch promtool || true  # Debian 12: inside prometheus
    for deb in "$deb_dir"/*.deb; do
        dpkg-deb -x "$deb" "$deb_dir/x"
    done
    install -m 0755 "$deb_dir/x/usr/bin/promtool" "$VENV/bin/promtool"
    install -m 0755 "$deb_dir/x/usr/bin/prometheus" "$VENV/bin/prometheus"
    rm -rf "$deb_dir"
fi

export VENV
