#!/usr/bin/env bash
# Install what `make test` and `make demo` need: Debian packages (only the missing ones) and a
# virtual environment in .venv with the package installed editable with its test extra.
#
# Package install scripts would start system services (Redis, RabbitMQ, Mosquitto, PostgreSQL)
# on their default ports. The tests start their own instances on free loopback ports, so a
# policy-rc.d that forbids service starts is in place for the duration of the install.
set -euo pipefail

cd "$(dirname "$0")/.."

APT_PACKAGES=(
    make
    python3-venv
    softhsm2
    opensc
    redis-server
    rabbitmq-server
    mosquitto
    postgresql
    # TPM 2.0: the simulator, tools, resource manager, OpenSSL provider and PKCS#11 module.
    swtpm
    swtpm-tools
    tpm2-tools
    tpm2-abrmd
    libtss2-tcti-tabrmd0
    tpm2-openssl
    libtpm2-pkcs11-1
    libtpm2-pkcs11-tools
    python3-tpm2-pkcs11-tools
    dbus
    # tpm2-pytss (the tpm extra) has no wheels and builds against these.
    libtss2-dev
    gcc
    pkg-config
    python3-dev
)
VENV=${VENV:-.venv}

if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
else
    SUDO=(sudo)
fi

missing_packages() {
    local package status
    for package in "${APT_PACKAGES[@]}"; do
        status=$(dpkg-query -W -f='${Status}' "$package" 2>/dev/null || true)
        if [ "$status" != "install ok installed" ]; then
            echo "$package"
        fi
    done
}

install_packages() {
    local missing
    mapfile -t missing < <(missing_packages)
    if [ "${#missing[@]}" -eq 0 ]; then
        return
    fi
    echo "setup: installing Debian packages: ${missing[*]}" >&2

    local policy=/usr/sbin/policy-rc.d created_policy=no
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\n# Written by device-sdk scripts/setup.sh during apt-get install.\nexit 101\n' \
            | "${SUDO[@]}" tee "$policy" >/dev/null
        "${SUDO[@]}" chmod 0755 "$policy"
        created_policy=yes
    fi

    local status=0
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q || status=$?
    if [ "$status" -eq 0 ]; then
        "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -q --no-install-recommends "${missing[@]}" || status=$?
    fi

    if [ "$created_policy" = yes ]; then
        "${SUDO[@]}" rm -f "$policy"
    fi
    if [ "$status" -ne 0 ]; then
        echo "setup: apt-get failed with status $status while installing: ${missing[*]}" >&2
        exit "$status"
    fi
}

install_venv() {
    if [ ! -x "$VENV/bin/python" ]; then
        echo "setup: creating $VENV" >&2
        python3 -m venv "$VENV"
    fi

    # Reinstall only when the project metadata changed since the last successful install.
    local stamp="$VENV/.device-sdk-installed"
    if [ -e "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then
        return
    fi
    echo "setup: installing device-sdk[test] into $VENV" >&2
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -e '.[test]'
    touch "$stamp"
}

install_packages
install_venv
