#!/usr/bin/env bash
# Install the Debian packages of a real Slurm (controller + node daemon + client) and munge. Run as root.
# --no-install-recommends keeps it to 9 packages (43 with recommends); the image's policy-rc.d stops postinst
# from starting daemons, which start.sh does itself (there is no systemd here).
set -euo pipefail
if [ "$(id -u)" -ne 0 ]; then
    echo "cluster/install.sh: run as root (it installs Debian packages)" >&2
    exit 1
fi
if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
