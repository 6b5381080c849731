#!/usr/bin/env bash
# `make bench-gpu-node-lab`: bench/gpu_node_e2e.sh --lab end to end in a podman container that lacks
# what the GPU node lacks, on CPU ranks with the lab's tiny model; only CUDA, NCCL and nvidia-smi stay
# untested. The container ("the node"):
# - the lab's node image with sshd, ssh, ssh-keygen, scp, sftp, rsync, pdsh, ip and systemctl deleted and
#   the libraries Debian's sshd and rsync need beyond Ubuntu's (libwrap, libnsl, libtirpc, libpopt)
#   too; dpkg still lists their packages, as on the node, where openssh-client is listed without its
#   binaries. No sshd user, no apt bindings in the system Python, root's password field "!" (locked)
# - no systemd: `sleep` is PID 1
# - this machine's .venv mounted read-only at its own path, first on PATH: the node's "python3" with
#   torch, deepspeed, transformers, accelerate, peft (as scripts/lab.sh mounts it)
# - the checkout copied in as a device call sends it: tracked and untracked files git does not ignore,
#   plus the carried .whl/ and .cache/gpu-node/
# Its output comes back to .state/gpu-node-lab/out. KEEP=1 leaves the container running; PORT22_TAKEN=1
# puts a listener on port 22 first (the script's sshd then takes 2222); BUDGET (seconds, default 1800:
# no device limit here, and a shared machine's 2 cores can be slow) replaces the device call's 560.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
source scripts/podman-env.sh
NAME=${GPU_NODE_LAB_NAME:-dsgpunode}
STATE=$ROOT/.state/gpu-node-lab
BASE=$(bash scripts/lab.sh image-name)
IMAGE_TAG=$( (sed -n '/^build_image()/,/^}/p' "$0"; echo "$BASE") | sha256sum | cut -c1-12)
IMAGE=localhost/dsmesh-gpu-node-mock:$IMAGE_TAG
log() { printf 'gpu-node-lab: %s\n' "$*" >&2; }

build_image() {
  bash scripts/lab.sh image
  podman rm -f "$NAME-build" >/dev/null 2>&1 || true
  podman run -d --name "$NAME-build" "$BASE" sleep infinity >/dev/null
  podman exec "$NAME-build" bash -ec '
    cd /usr
    rm -f sbin/sshd bin/ssh bin/ssh-keygen bin/ssh-keyscan bin/ssh-add bin/ssh-agent bin/scp bin/sftp \
      bin/rsync bin/pdsh bin/pdsh.bin bin/ip sbin/ip bin/systemctl
    rm -f lib/x86_64-linux-gnu/libwrap.so.0* lib/x86_64-linux-gnu/libnsl.so.2* lib/x86_64-linux-gnu/libtirpc.so.3* \
      lib/x86_64-linux-gnu/libpopt.so.0*
    rm -rf lib/python3/dist-packages/apt lib/python3/dist-packages/apt_pkg* lib/python3/dist-packages/aptsources
    rm -f /etc/ssh/sshd_config /etc/ssh/ssh_host_*
    userdel sshd 2>/dev/null || true
    usermod -p "!" root
    ldconfig'
  podman commit --change 'CMD=["sleep","infinity"]' "$NAME-build" "$IMAGE" >/dev/null
  podman rm -f "$NAME-build" >/dev/null
}

podman image exists "$IMAGE" || { log "building $IMAGE from $BASE"; build_image; }
podman network exists "$NAME" || podman network create "$NAME" >/dev/null
podman rm -f "$NAME" >/dev/null 2>&1 || true
podman run -d --name "$NAME" --hostname "$NAME" --network "$NAME" --shm-size 256m \
  -v "$ROOT/.venv:$ROOT/.venv:ro" "$IMAGE" >/dev/null
# shellcheck disable=SC2016 # expanded when the trap runs
trap '[[ ${KEEP:-0} == 1 ]] || podman rm -f -t 2 "$NAME" >/dev/null 2>&1 || true' EXIT

log "copying the tree as a device call sends it"
{
  git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
    [[ -e $f ]] && printf '%s\0' "$f"
  done
  printf '%s\0' .whl .cache/gpu-node
} | tar --null -T - -c | podman exec -i "$NAME" bash -c 'mkdir -p /root/repo && tar -x -C /root/repo'

if [[ ${PORT22_TAKEN:-0} == 1 ]]; then
  # something else on port 22 (a node's own sshd, say): the script's fallback to 2222
  podman exec -d "$NAME" python3 -c 'import socket, time; s = socket.socket(); s.bind(("", 22)); s.listen(); time.sleep(3600)'
  sleep 1
fi
log "running bench/gpu_node_e2e.sh --lab in $NAME"
rc=0
podman exec -e OUT=/root/out "$NAME" env PATH="$ROOT/.venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
  bash -c "cd /root/repo && bash bench/gpu_node_e2e.sh --lab --budget ${BUDGET:-1800}" || rc=$?
rm -rf "$STATE/out"
mkdir -p "$STATE"
podman cp "$NAME:/root/out" "$STATE/out" || true
log "exit $rc; output in ${STATE#"$ROOT"/}/out: $(find "$STATE/out" -type f -printf '%f ' 2>/dev/null)"
exit "$rc"
