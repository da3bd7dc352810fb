#!/bin/sh
# Install cpmgr on a host from a checkout of the repository: a virtualenv under /opt/cpmgr with
# the dependencies of requirements.lock (hash-checked), the `cpmgr` user, /etc/cpmgr with the
# example config, the systemd unit and /usr/local/bin/cpmgr. Run it as root; run it again to
# upgrade (the config is never overwritten). Then edit /etc/cpmgr/cpmgr.yaml and
# `systemctl enable --now cpmgr`.
#
#   deploy/systemd/install.sh [--prefix DIR] [--venv-only]
#     --prefix DIR   where the virtualenv goes (default /opt/cpmgr); the unit is adjusted
#     --venv-only    only the virtualenv: no user, /etc, unit or symlink (no root needed)
set -eu

prefix=/opt/cpmgr
venv_only=no
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) prefix="$2"; shift 2 ;;
        --venv-only) venv_only=yes; shift ;;
        *) echo "usage: $0 [--prefix DIR] [--venv-only]" >&2; exit 2 ;;
    esac
done
repo="$(cd "$(dirname "$0")/../.." && pwd)"
python="${PYTHON:-python3}"

say() { echo "install.sh: $*" >&2; }

say "virtualenv $prefix with the locked dependencies"
"$python" -m venv "$prefix"
"$prefix/bin/pip" install --quiet --disable-pip-version-check --require-hashes \
    -r "$repo/requirements.lock"
# The build backend is in the lock too: nothing unpinned is fetched to build cpmgr itself.
"$prefix/bin/pip" install --quiet --disable-pip-version-check --no-deps --no-build-isolation \
    "$repo"
say "installed $("$prefix/bin/cpmgr" --version)"
[ "$venv_only" = yes ] && exit 0

if ! getent passwd cpmgr >/dev/null; then
    say "creating the system user cpmgr"
    useradd --system --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin cpmgr
fi
install -d -m 0755 /etc/cpmgr
if [ ! -e /etc/cpmgr/cpmgr.yaml ]; then
    say "writing /etc/cpmgr/cpmgr.yaml from the example: edit it before starting"
    install -m 0640 -o root -g cpmgr "$repo/config/cpmgr.example.yaml" /etc/cpmgr/cpmgr.yaml
fi
sed "s|/opt/cpmgr/bin/cpmgr|$prefix/bin/cpmgr|" "$repo/deploy/systemd/cpmgr.service" \
    >/etc/systemd/system/cpmgr.service
chmod 0644 /etc/systemd/system/cpmgr.service
ln -sf "$prefix/bin/cpmgr" /usr/local/bin/cpmgr
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
fi
say "done: edit /etc/cpmgr/cpmgr.yaml, then: systemctl enable --now cpmgr"
