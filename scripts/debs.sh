#!/bin/sh
# Install the Debian packages named as arguments when some are missing (as root; otherwise say what to run).
# python3-venv is always needed to create the virtual environment on Debian.
set -e
missing=""
for pkg in python3-venv "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing="$missing $pkg"
done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" != 0 ]; then
    echo "missing Debian packages:$missing  (run as root: apt-get install$missing)" >&2
    exit 0
fi
echo "installing Debian packages:$missing"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# ceph's postinst scripts complain without systemd; the packages still install (measured).
apt-get install -y -qq --no-install-recommends $missing >/dev/null
