#!/usr/bin/env bash
# Colin27 for tests/test_colin27.py: the Debian package mricron-data, whose templates
# are the MNI single-subject T1w at 1 mm (ch2.nii.gz) and 0.5 mm (ch2better.nii.gz).
# A no-op when they are there; installs the package with apt as root; otherwise says
# what to do (the test then fails saying the same).
set -euo pipefail
TEMPLATES=/usr/share/mricron/templates
if [ -f "$TEMPLATES/ch2.nii.gz" ] && [ -f "$TEMPLATES/ch2better.nii.gz" ]; then
    exit 0
fi
if dpkg -s mricron-data >/dev/null 2>&1; then
    echo "install_test_data: mricron-data is installed but $TEMPLATES lacks ch2*.nii.gz" >&2
    exit 1
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
    echo "install_test_data: install the Debian package mricron-data as root" \
        "(tests/test_colin27.py segments its Colin27 templates)" >&2
    exit 1
fi
echo "install_test_data: installing mricron-data"
DEBIAN_FRONTEND=noninteractive apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mricron-data >/dev/null
ls "$TEMPLATES/ch2.nii.gz" "$TEMPLATES/ch2better.nii.gz"
