#!/usr/bin/env bash
# Install what vtpm-trust needs on Debian 12, once: Debian packages that are
# missing (one `apt-get update`, then install), and the .venv with
# `pip install -e .[dev]`. A second run checks and returns in about a second.
set -euo pipefail
cd "$(dirname "$0")/.."

# binary or file -> Debian package that provides it
declare -A NEED=(
  [/usr/bin/swtpm]=swtpm
  [/usr/bin/swtpm_setup]=swtpm-tools
  [/usr/bin/tpm2_quote]=tpm2-tools
  [/usr/include/tss2/tss2_esys.h]=libtss2-dev
  [/usr/bin/pkg-config]=pkg-config
  [/usr/bin/gcc]=gcc
  [/usr/include/openssl/evp.h]=libssl-dev
  [/usr/bin/openssl]=openssl
  [/usr/bin/softhsm2-util]=softhsm2
  [/usr/bin/qemu-system-x86_64]=qemu-system-x86
  [/usr/share/OVMF/OVMF_CODE_4M.fd]=ovmf
  [/bin/busybox]=busybox-static
  [/usr/bin/cpio]=cpio
  [/usr/sbin/mkfs.vfat]=dosfstools
  [/usr/bin/mcopy]=mtools
  [/usr/lib/systemd/boot/efi/systemd-bootx64.efi]=systemd-boot-efi
  [/usr/bin/sbsign]=sbsigntool
  [/usr/lib/systemd/systemd-measure]=systemd
  [/usr/bin/objcopy]=binutils
  [/usr/bin/psql]=postgresql-client
  [/usr/bin/evmctl]=ima-evm-utils
  [/usr/bin/chromium]=chromium
  [/usr/bin/chromedriver]=chromium-driver
)
missing=()
for f in "${!NEED[@]}"; do [ -e "$f" ] || missing+=("${NEED[$f]}"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
  echo "setup: vtpm-trust needs Python 3.11 ($PY is $("$PY" --version 2>&1))" >&2
  exit 1
fi
# venv for the .venv; Python.h for the C parts (verifier/eventlog/_native.c, verifier/ima/_native.c)
if ! "$PY" -c 'import venv, ensurepip, os, sysconfig
assert os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h"))' 2>/dev/null; then
  apt-get install -y -qq --no-install-recommends python3-venv python3-dev >/dev/null
fi
STAMP=.venv/.installed
if [ ! -x .venv/bin/python ] || [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ] \
  || [ setup.py -nt "$STAMP" ] || [ verifier/eventlog/_native.c -nt "$STAMP" ] \
  || [ verifier/ima/_native.c -nt "$STAMP" ] \
  || ! ls verifier/eventlog/_native.*.so >/dev/null 2>&1 \
  || ! ls verifier/ima/_native.*.so >/dev/null 2>&1; then
  echo "setup: creating .venv and installing vtpm-trust[dev]"
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  .venv/bin/pip install -q --upgrade pip 2>/dev/null
  .venv/bin/pip install -q -e '.[dev]' 2> >(grep -v '^WARNING: Location' >&2)
  touch "$STAMP"
fi

# PostgreSQL is part of the test suite; start the local cluster if it is down.
if command -v pg_ctlcluster >/dev/null && ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
fi
