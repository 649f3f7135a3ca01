#!/usr/bin/env bash
# Stop the localhost Slurm cluster. Jobs are cancelled first: `scontrol shutdown` alone leaves running jobs'
# slurmstepd and their processes behind as orphans. `--purge` also wipes state, so job ids start at 1 again.
set -uo pipefail
pids=$(cat /run/slurmctld.pid /run/slurmd-n1.pid /run/slurmd-n2.pid 2>/dev/null)
if command -v scancel >/dev/null && sinfo >/dev/null 2>&1; then
    scancel --full --user=root 2>/dev/null
    for _ in $(seq 150); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.2; done
    scontrol shutdown >/dev/null 2>&1
fi
for pid in $pids; do
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
done
pgrep -x munged >/dev/null && munged -s >/dev/null 2>&1
if [ "${1:-}" = "--purge" ]; then
    rm -rf /var/spool/slurmctld /var/spool/slurmd /var/log/slurm/*
fi
echo "cluster: stopped"
