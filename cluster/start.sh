#!/usr/bin/env bash
# Start a real Slurm cluster on localhost (slurmctld + slurmd n1 + slurmd n2) and wait until it accepts jobs.
# Installs the packages first if needed. Run as root. Idempotent: a cluster that is already up is left alone.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
timeout_s="${SLURM_START_TIMEOUT_S:-60}"

if [ "$(id -u)" -ne 0 ]; then
    echo "cluster/start.sh: run as root (it starts munged, slurmctld and two slurmd)" >&2
    exit 1
fi
if sinfo -h -o '%T %D' 2>/dev/null | grep -qx 'idle 2'; then
    echo "cluster: already up"; exit 0
fi
bash "$here/install.sh"

# munge authenticates every Slurm RPC; its postinst creates the key, but a purged system may lack one.
if [ ! -s /etc/munge/munge.key ]; then
    mungekey -c && chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
fi
install -d -o munge -g munge -m 0755 /run/munge
pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged
munge -n | unmunge >/dev/null

install -d /etc/slurm /var/spool/slurmctld /var/spool/slurmd/n1 /var/spool/slurmd/n2 /var/log/slurm
cp "$here/slurm.conf" /etc/slurm/slurm.conf
# Node names must resolve: with an unresolvable MASTER_ADDR=n1, torch's TCPStore retries for ~3 minutes.
grep -q '^127.0.0.1 n1 n2$' /etc/hosts || echo '127.0.0.1 n1 n2' >> /etc/hosts

pgrep -x slurmctld >/dev/null || slurmctld
for node in n1 n2; do
    pgrep -f "slurmd -N $node" >/dev/null || slurmd -N "$node"
done

deadline=$(( $(date +%s) + timeout_s ))
until sinfo -h -o '%T %D' 2>/dev/null | grep -qx 'idle 2'; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
        echo "cluster: not idle after ${timeout_s} s; sinfo says: $(sinfo -h -o '%N %T' 2>&1)" >&2
        echo "cluster: see /var/log/slurm/slurmctld.log and /var/log/slurm/slurmd-n*.log" >&2
        exit 1
    fi
    sleep 0.2
done
echo "cluster: up ($(sinfo -h -o '%P %D nodes %T'))"
