#!/usr/bin/env bash
# Issue 15: the job stages of site.yml against THIS machine as a one-node cluster, in one device call.
# Run from the repo root, as root, with the carried files (`make bench-gpu-node-carry` gathers them):
#   .whl/             the training wheels (deepspeed 0.19.8 py3-none-any, pydantic, ...), as for bench/gpu.sh
#   .cache/gpu-node/  Debian 12 .debs, the controller's wheels, its collections (bench/gpu_node_carry.sh)
#
#   bash bench/gpu_node_e2e.sh         make bench-gpu-node: the H200, a Qwen2.5-0.5B shape on DeepSpeed
#   bash bench/gpu_node_e2e.sh --lab   CPU ranks, the lab's tiny model (make bench-gpu-node-lab runs it in
#                                      a container that lacks what the GPU node lacks)
#
# This part sets the node up; bench/gpu_node_e2e.py then runs the playbooks through dsmesh's API over a
# real sshd and writes logs and JSON to $OUT. What the node lacks, and where each piece goes (the probes
# in bench/results/h200_*_probe.txt say what runs there):
# - ssh, ssh-keygen, sftp-server, sshd, rsync: Debian 12's, unpacked into a private root ($TOOLS).
#   Ubuntu has packages of these names (dpkg lists openssh-client there, without its binaries), so
#   none of Debian's files may go over Ubuntu's. ssh, ssh-keygen and sftp-server need only libraries
#   Ubuntu has, and go on every session's PATH as links. sshd needs libwrap0 -> libnsl2 -> libtirpc3 and
#   rsync libpopt0, which Ubuntu does not have installed: LD_LIBRARY_PATH names the private root's
#   libraries for those two programs alone (sshd builds each session's environment afresh, so it
#   reaches no session and no rank).
# - pdsh, libgenders0, genders: no Ubuntu package installs these files, and pdsh's wrapper runs
#   /usr/bin/pdsh.bin by that path: unpacked into /.
# - sshd on port 22 (2222 if 22 is taken) with its privilege-separation user and an ed25519 host key, root's key authorized
#   and the host key in root's known_hosts (strict checking stays on, as the preflight demands). Every
#   Ansible task and every rank runs in one of its sessions, so the sessions get this machine's PATH and
#   LD_LIBRARY_PATH (where the image puts nvidia-smi and the driver's libraries) and its NCCL settings.
# - deepspeed and pydantic into the training interpreter's own environment (every process of it - ssh
#   sessions, pdsh ranks - must import deepspeed); ansible-core, ansible-runner and mitogen into
#   $CTL for the controller alone, with the collections site.yml names and this checkout as dsmesh.cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-$REPO/out/gpu-node}
CARRY=$REPO/.cache/gpu-node
TOOLS=/opt/dsmesh-node-tools
CTL=/opt/dsmesh-controller
SSHD_CONFIG=/etc/ssh/sshd_config.dsmesh-e2e
PY=${TRAINING_PYTHON:-$(command -v python3)}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/e2e.log") 2>&1
export PYTHONUNBUFFERED=1
# ssh and rsync go into /usr/local/bin, sshd's default PATH for a root session: this shell needs it too
case ":$PATH:" in *:/usr/local/bin:*) ;; *) export PATH=/usr/local/bin:$PATH ;; esac

step() { printf '\n== %s (%ss)\n' "$*" "$SECONDS"; }
die() { echo "gpu_node_e2e: $*" >&2; exit 1; }

step "the node as found"
[[ $(id -u) == 0 ]] || die "run as root (sshd, /usr/local/bin, /var/lib/dsmesh)"
[[ -d $CARRY/debs && -d $CARRY/wheels && -d .whl ]] || die "carry .whl and .cache/gpu-node (make bench-gpu-node-carry)"
grep -E '^PRETTY_NAME=' /etc/os-release || true
echo "kernel $(uname -r), $(nproc) CPUs, python3 = $PY ($("$PY" -V 2>&1))"
for tool in sshd ssh ssh-keygen pdsh rsync ip systemctl nvidia-smi pgrep hostname; do
  printf '  %-11s %s\n' "$tool" "$(command -v "$tool" || echo '(none)')"
done
echo "PATH=$PATH"
echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=index,name,memory.total,memory.used,driver_version,compute_cap --format=csv,noheader || true
fi
# The address the other nodes would reach this one by (192.0.2.2 on eth0 on the H200 node).
ADDR=$(hostname -I 2>/dev/null | awk '{print $1}')
ADDR=${ADDR:-127.0.0.1}
echo "cluster address $ADDR (hostname $(hostname))"

step "Debian 12 packages: private root $TOOLS, pdsh into /"
mkdir -p "$TOOLS"
for deb in "$CARRY"/debs/*.deb; do
  case $(basename "$deb") in
    pdsh_* | libgenders0_* | genders_*)
      command -v pdsh >/dev/null && continue
      # into / only what lies under usr/ and etc/: nothing may replace the usrmerge links (/lib -> usr/lib)
      if dpkg-deb -c "$deb" | awk '{print $6}' | grep -qvE '^\./((usr|etc)(/.*)?)?$'; then die "$deb has files outside usr/ and etc/"; fi
      dpkg -x "$deb" / ;;
    *) dpkg -x "$deb" "$TOOLS" ;;
  esac
done
LIBS=$TOOLS/usr/lib/x86_64-linux-gnu:$TOOLS/lib/x86_64-linux-gnu
for tool in ssh ssh-keygen ssh-keyscan scp sftp; do
  command -v "$tool" >/dev/null || ln -sfn "$TOOLS/usr/bin/$tool" "/usr/local/bin/$tool"
done
if ! command -v rsync >/dev/null; then
  printf '#!/bin/sh\n# Debian 12 rsync from %s: its libpopt0 is not installed here\nLD_LIBRARY_PATH=%s exec %s "$@"\n' \
    "$TOOLS" "$LIBS" "$TOOLS/usr/bin/rsync" >/usr/local/bin/rsync
  chmod 755 /usr/local/bin/rsync
fi
ssh -V
rsync --version | sed -n 1p
pdsh -V 2>&1 | sed -n 1p

# Port 22 unless something listens there already; another port is every ssh client's through
# ~/.ssh/config (Ansible, the preflight, pdsh and DeepSpeed's runner all run ssh).
SSH_PORT=22
if (exec 3<>/dev/tcp/127.0.0.1/22) 2>/dev/null; then SSH_PORT=2222; fi
step "sshd on port $SSH_PORT"
id sshd >/dev/null 2>&1 || useradd --system --no-create-home --home-dir /run/sshd --shell /usr/sbin/nologin sshd
mkdir -p /run/sshd /etc/ssh /root/.ssh
chmod 0755 /run/sshd
chmod 0700 /root/.ssh
[[ -f /etc/ssh/ssh_host_ed25519_key ]] || ssh-keygen -q -t ed25519 -N '' -C "$(hostname)" -f /etc/ssh/ssh_host_ed25519_key
[[ -f /root/.ssh/id_ed25519 ]] || ssh-keygen -q -t ed25519 -N '' -C "root@$(hostname)" -f /root/.ssh/id_ed25519
touch /root/.ssh/authorized_keys /root/.ssh/known_hosts
chmod 0600 /root/.ssh/authorized_keys
grep -qxF "$(cat /root/.ssh/id_ed25519.pub)" /root/.ssh/authorized_keys || cat /root/.ssh/id_ed25519.pub >>/root/.ssh/authorized_keys
# The host key under every name the playbooks, the preflight and pdsh use (learnt here, not by
# accept-new: the preflight's own ssh check is strict).
names=("$ADDR" "$(hostname)" localhost 127.0.0.1)
if [[ $SSH_PORT != 22 ]]; then
  names=("${names[@]/#/[}") && names=("${names[@]/%/]:$SSH_PORT}")
  printf 'Host %s %s localhost 127.0.0.1\n  Port %s\n' "$ADDR" "$(hostname)" "$SSH_PORT" >>/root/.ssh/config
fi
echo "$(IFS=,; echo "${names[*]}") $(cut -d' ' -f1,2 /etc/ssh/ssh_host_ed25519_key.pub)" >>/root/.ssh/known_hosts
# Without PAM, sshd refuses a key login to an account whose password field starts with "!" (locked);
# "*" keeps password logins impossible and lets the key in.
if [[ $(getent shadow root | cut -d: -f2) == '!'* ]]; then usermod -p '*' root; echo "root's password field: ! -> *"; fi
session_env=()
for var in PATH LD_LIBRARY_PATH CUDA_HOME CUDA_PATH $(compgen -e | grep -E '^(NCCL_|NVSHMEM_|TORCH_SYMM_MEM_)' || true); do
  value=${!var:-}
  [[ -n $value ]] || continue
  if [[ $value =~ [[:space:]\"\'\\] ]]; then echo "not passed to sessions: $var (spaces or quotes)"; continue; fi
  session_env+=("$var=$value")
done
cat >"$SSHD_CONFIG" <<EOF
# bench/gpu_node_e2e.sh: Debian 12's sshd from $TOOLS on this node.
Port $SSH_PORT
HostKey /etc/ssh/ssh_host_ed25519_key
PidFile /run/dsmesh-sshd.pid
UsePAM no
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
AuthorizedKeysFile .ssh/authorized_keys
Subsystem sftp $TOOLS/usr/lib/openssh/sftp-server
# pdsh, the launcher and Ansible open many sessions at once
MaxStartups 64:30:128
SetEnv ${session_env[*]}
EOF
if (exec 3<>/dev/tcp/127.0.0.1/"$SSH_PORT") 2>/dev/null; then die "something already listens on port $SSH_PORT"; fi
missing=$(LD_LIBRARY_PATH=$LIBS ldd "$TOOLS/usr/sbin/sshd" | grep 'not found' || true)
[[ -z $missing ]] || die "sshd's libraries: $missing (add their Debian 12 packages to bench/gpu_node_carry.sh)"
LD_LIBRARY_PATH=$LIBS "$TOOLS/usr/sbin/sshd" -t -f "$SSHD_CONFIG"
LD_LIBRARY_PATH=$LIBS "$TOOLS/usr/sbin/sshd" -f "$SSHD_CONFIG" -E /var/log/dsmesh-sshd.log
for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/"$SSH_PORT") 2>/dev/null && break; sleep 0.2; done
ssh -o BatchMode=yes -o StrictHostKeyChecking=yes "$ADDR" 'echo "ssh ok: $(hostname), PATH=$PATH"' ||
  { tail -20 /var/log/dsmesh-sshd.log; die "no key login over ssh to $ADDR"; }
pdsh -R ssh -w "$ADDR" 'echo pdsh ok; nvidia-smi -L 2>/dev/null || echo "(no nvidia-smi in the session)"'
echo rsync-check >/tmp/dsmesh-rsync-check
rsync -a /tmp/dsmesh-rsync-check "$ADDR:/tmp/dsmesh-rsync-check.copy" && echo "rsync over ssh ok"

step "Python packages"
# The carried training wheels the interpreter does not have yet (its own packages stay as they are).
mapfile -t wheels < <("$PY" - .whl/*.whl <<'EOF'
import importlib.metadata as m, os, re, sys
for path in sys.argv[1:]:
    name = re.sub(r"[-_.]+", "-", os.path.basename(path).split("-")[0]).lower()
    try:
        m.version(name)
    except m.PackageNotFoundError:
        print(path)
EOF
)
if ((${#wheels[@]})); then
  echo "installing into $("$PY" -c 'import sys; print(sys.prefix)'): ${wheels[*]##*/}"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir "${wheels[@]}"
fi
"$PY" -c 'import importlib.metadata as m; print(*(f"{p} {m.version(p)}" for p in ("torch", "deepspeed", "transformers", "accelerate", "peft", "pydantic")), sep=", ")'
rm -rf "$CTL"
"$PY" -m pip install -q --no-index --find-links "$CARRY/wheels" --no-compile --no-cache-dir --target "$CTL" \
  ansible-core==2.19.14 ansible-runner==2.4.3 mitogen==0.3.54 rich==15.0.0
mkdir -p "$CTL/ansible_collections/dsmesh"
for collection in "$CARRY"/collections/*.tar.gz; do tar -xzf "$collection" -C "$CTL/ansible_collections"; done
ln -sfn "$REPO" "$CTL/ansible_collections/dsmesh/cluster"
# ansible-core refuses a locale that is not UTF-8; a bare device shell may have none set.
[[ -n ${LC_ALL:-}${LANG:-} ]] || export LANG=C.UTF-8
# The controller finds its packages and collections in $CTL only (not a collection of the bundle a
# machine may have: the carried ones are what the job stages must do with).
export PYTHONPATH=$CTL PATH=$CTL/bin:$PATH ANSIBLE_CONFIG=$REPO/ansible.cfg ANSIBLE_COLLECTIONS_PATH=$CTL \
  ANSIBLE_COLLECTIONS_SCAN_SYS_PATH=False ANSIBLE_FORCE_COLOR=0 ANSIBLE_NOCOLOR=1
ansible-playbook --version | sed -n 1p
ansible-galaxy collection list 2>/dev/null | grep -E '^(community|dsmesh)' || true
if command -v nvidia-smi >/dev/null; then
  # Every rank starts in an ssh session: it must see the GPU there as this shell does.
  ssh -o BatchMode=yes "$ADDR" "$PY -c 'import torch; print(\"torch in an ssh session:\", torch.cuda.is_available(), torch.cuda.device_count(), torch.version.cuda)'" |
    tee /tmp/dsmesh-session-cuda
  grep -q 'session: True' /tmp/dsmesh-session-cuda || die "torch sees no GPU in an ssh session: compare its environment with this shell's"
fi

step "the job stages (bench/gpu_node_e2e.py)"
exec "$PY" -m bench.gpu_node_e2e --out "$OUT" --address "$ADDR" --python "$PY" --controller-path "$CTL" \
  --setup-seconds "$SECONDS" "$@"
