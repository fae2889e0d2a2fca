#!/usr/bin/env bash
# `ray up` -> smoke sweep on the cluster -> `ray down`, on this machine, with Ray's local provider
# (tests/cluster/local_cluster.yaml: head on 127.0.0.1, one worker with a fake GPU on 127.0.0.2).
#
#   sudo bash tests/cluster/ray_up_smoke.sh [WORKDIR]      (run by tests/test_multinode.py with DISTLAP_RAY_UP=1)
#
# Needs root: it installs openssh-server and rsync (apt-get) if missing. Everything after that runs in
# fresh network, PID and mount namespaces: the SSH server and every Ray process listen on a private
# loopback only; `ray stop` (which `ray up` and `ray down` run) sees only the processes of this
# cluster, never another Ray on the machine; /root and /tmp/ray are private folders there, so nothing
# the launcher writes (~/ray_bootstrap_*, the cluster state) touches the real ones; and whatever
# would be left over dies with the namespace when the script ends.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CONFIG="$ROOT/tests/cluster/local_cluster.yaml"
MOUNT=/tmp/distlap-local-cluster        # file_mounts target in local_cluster.yaml

if [[ "${1:-}" != "--inside" ]]; then
    if [[ $# -ge 1 ]]; then mkdir -p "$1" && WORK="$(cd "$1" && pwd)"; else WORK="$(mktemp -d /tmp/distlap-rayup-XXXXXX)"; fi
    if ! command -v sshd >/dev/null && [[ ! -x /usr/sbin/sshd ]] || ! command -v rsync >/dev/null; then
        echo "== installing openssh-server and rsync"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server rsync >/dev/null
    fi
    PYTHON_PREFIX="$(python -c 'import sys; print(sys.prefix)')"
    exec unshare --net --pid --mount --fork --mount-proc --kill-child \
        env PYTHON_PREFIX="$PYTHON_PREFIX" bash "${BASH_SOURCE[0]}" --inside "$WORK"
fi

# --- inside the namespaces ---------------------------------------------------------------------
WORK="$2"
echo "== work folder $WORK"
ip link set lo up

# Private /root (keeping the Python installation visible if it lives there), /tmp/ray and mount folder.
mkdir -p "$WORK/home" "$WORK/ray-tmp" "$WORK/mount" /tmp/ray "$MOUNT" /run/sshd
if [[ "$PYTHON_PREFIX" == /root/* ]]; then
    mkdir -p "$WORK/python"
    mount --bind "$PYTHON_PREFIX" "$WORK/python"
fi
mount --bind "$WORK/home" /root
chmod 700 /root
if [[ "$PYTHON_PREFIX" == /root/* ]]; then
    mkdir -p "$PYTHON_PREFIX"
    mount --bind "$WORK/python" "$PYTHON_PREFIX"
fi
mount --bind "$WORK/ray-tmp" /tmp/ray
mount --bind "$WORK/mount" "$MOUNT"
# Login shells on the "nodes" (Ray runs every command through `bash --login -c -i`) find this Python.
echo "export PATH=$PYTHON_PREFIX/bin:\$PATH" > /root/.bashrc
echo ". ~/.bashrc" > /root/.profile
export HOME=/root PATH="$PYTHON_PREFIX/bin:$PATH"

# An SSH server on 127.0.0.1 and 127.0.0.2 that admits one generated key.
mkdir -p /root/.ssh "$WORK/ssh" && chmod 700 /root/.ssh
ssh-keygen -q -t ed25519 -N '' -f /root/.ssh/distlap_local_cluster   # auth.ssh_private_key
ssh-keygen -q -t ed25519 -N '' -f "$WORK/ssh/host_key"
cp /root/.ssh/distlap_local_cluster.pub /root/.ssh/authorized_keys && chmod 600 /root/.ssh/authorized_keys
cat > "$WORK/ssh/sshd_config" <<EOF
ListenAddress 127.0.0.1
ListenAddress 127.0.0.2
HostKey $WORK/ssh/host_key
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PidFile $WORK/ssh/sshd.pid
EOF
/usr/sbin/sshd -f "$WORK/ssh/sshd_config" -E "$WORK/ssh/sshd.log"
echo "== sshd on 127.0.0.1:22 and 127.0.0.2:22 (private network namespace)"

cd "$ROOT"   # file_mounts: the project is "."
echo "== ray up"
ray up -y --no-config-cache "$CONFIG"

echo "== waiting for the worker node (the autoscaler on the head starts it over SSH)"
for _ in $(seq 60); do
    status_text="$(ray exec "$CONFIG" "ray status" 2>&1 || true)"   # (not a pipe into grep -q: pipefail)
    if grep -qE "[0-9.]+/1\.0 GPU" <<<"$status_text"; then break; fi
    sleep 5
done
ray exec "$CONFIG" "ray status"

echo "== smoke sweep, submitted to the head"
status=0
ray exec "$CONFIG" "cd $MOUNT/distlap && PYTHONPATH=$MOUNT/distlap python sweeps/layerwise.py --smoke-test \
    --address auto --output $MOUNT/runs/smoke resources.gpus_per_trial=0.5 trial.laplace.predictive=nn resources.eval_tasks=1 \
    resources.gpus_per_eval_task=0.5" || status=$?

echo "== where the trials ran"
ray exec "$CONFIG" "python -c \"
import json, pathlib
for f in sorted(pathlib.Path('$MOUNT/runs/smoke/ray_results').glob('*/*/result.json')):
    rows = [json.loads(line) for line in f.read_text().splitlines()]
    print(f.parent.name, 'node_ip', sorted({r['node_ip'] for r in rows}), 'objective', rows[-1].get('bayes/val/nll'))
\"" || status=1

echo "== ray down"
ray down -y "$CONFIG"
if pgrep -x raylet >/dev/null || pgrep -x gcs_server >/dev/null; then
    echo "Ray processes left after ray down:"; pgrep -a -x raylet; pgrep -a -x gcs_server; exit 1
fi
echo "== no Ray process left; smoke sweep exit status $status"
exit $status
