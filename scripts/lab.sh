#!/usr/bin/env bash
# The local container lab: Debian 12 nodes with systemd and sshd, root password login on,
# like freshly installed servers. Everything is built locally (no registry can be reached).
#
#   scripts/lab.sh up N     build the node image if needed, run nodes 1..N, remove nodes > N,
#                           write inventory/lab/hosts.yml
#   scripts/lab.sh down     remove the nodes and the network (the image is kept)
#   scripts/lab.sh image    build the node image only
#   scripts/lab.sh image-name   print the node image's name (molecule's platforms use it)
# Re-running any of them is safe. LAB_PREFIX (default dsmesh) names the containers, network and
# state, so several labs (tests, benchmarks) can live side by side; LAB_INVENTORY says where the
# inventory goes (default inventory/lab/hosts.yml for the default lab). LAB_SUDO_USER=NAME makes
# the nodes like a usual Ubuntu server instead: root may not log in over ssh, and NAME (the
# cluster user) logs in with the password and becomes root with sudo and the same password.
# The image is built from the Debian mirror this machine's apt uses (LAB_MIRROR=URL to choose).
# LAB_SHARED_DIR=DIR mounts DIR read-write at /var/lib/dsmesh/shared on every node: a shared
# filesystem (NFS, Lustre) as the job's shared storage sees it.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
source scripts/podman-env.sh

PREFIX=${LAB_PREFIX:-dsmesh}
NETWORK=${LAB_NETWORK:-$PREFIX}
SUDO_USER_NAME=${LAB_SUDO_USER:-}
if [[ -n $SUDO_USER_NAME && ! $SUDO_USER_NAME =~ ^[a-z_][a-z0-9_-]*$ ]]; then
  echo "lab: LAB_SUDO_USER must be a user name (lower-case letters, digits, _ and -), got '$SUDO_USER_NAME'" >&2
  exit 2
fi
STATE=$ROOT/.state/lab-$PREFIX
if [[ $PREFIX == dsmesh ]]; then
  INVENTORY=${LAB_INVENTORY:-$ROOT/inventory/lab/hosts.yml}
else
  INVENTORY=${LAB_INVENTORY:-$ROOT/inventory/lab/$PREFIX.yml}
fi
# The image tag follows the recipe: editing build_image() below builds a new image.
IMAGE_TAG=$(sed -n '/^build_image()/,/^}/p' "$0" | sha256sum | cut -c1-12)
IMAGE=localhost/dsmesh-node:$IMAGE_TAG
# Lab nodes get the controller's Python environment and checkout read-only at the same paths,
# as an NFS mount would give them (DeepSpeed's runner needs identical paths on every node).
MOUNTS=(-v "$ROOT/.venv:$ROOT/.venv:ro")
if [[ -n ${LAB_SHARED_DIR:-} ]]; then
  mkdir -p "$LAB_SHARED_DIR"
  MOUNTS+=(-v "$LAB_SHARED_DIR:/var/lib/dsmesh/shared")
fi

log() { printf 'lab: %s\n' "$*" >&2; }

# The Debian mirror that serves bookworm's main component to this machine's apt (its sources.list
# and sources.list.d, in either format, read by apt itself).
debian_mirror() {
  local uri
  if [[ -n ${LAB_MIRROR:-} ]]; then
    echo "${LAB_MIRROR%/}"
    return
  fi
  # shellcheck disable=SC2016 # $(NAME) is apt's own field syntax
  uri=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE) $(COMPONENT)' 'Identifier: Packages' 2>/dev/null |
    awk '$2 == "bookworm" && $3 == "main" { print $1; exit }')
  if [[ -z $uri ]]; then
    log "this machine's apt sources have no Debian bookworm main component to build the node image from;"
    log "add one (/etc/apt/sources.list.d/) or set LAB_MIRROR to a Debian mirror's URL"
    exit 1
  fi
  echo "${uri%/}"
}

build_image() {
  local rootfs mirror
  mirror=$(debian_mirror)
  rootfs=$(mktemp -d /var/tmp/dsmesh-rootfs.XXXXXX)
  log "building $IMAGE with debootstrap from $mirror (about a minute)"
  # minbase plus what an installed server has: sshd, python3 for Ansible, systemd, rsync and perl
  # (Debian's installer puts it in with "standard system utilities", Ubuntu Server has it, and
  # pdsh's dshbak needs it); the pdsh role installs it where a node lacks it.
  debootstrap --variant=minbase \
    --include=perl,rsync,python3,python3-apt,openssh-server,openssh-client,sudo,iproute2,ca-certificates,procps,systemd,systemd-sysv,dbus \
    bookworm "$rootfs" "$mirror" >/dev/null
  # Every node must generate its own host keys at first boot, not share the image's.
  rm -f "$rootfs"/etc/ssh/ssh_host_*
  cat >"$rootfs/etc/systemd/system/lab-ssh-host-keys.service" <<'UNIT'
[Unit]
Description=Generate this node's own SSH host keys
Before=ssh.service
[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A
RemainAfterExit=yes
[Install]
RequiredBy=ssh.service
UNIT
  mkdir -p "$rootfs/etc/systemd/system/ssh.service.requires"
  ln -sf ../lab-ssh-host-keys.service "$rootfs/etc/systemd/system/ssh.service.requires/"
  # A container has no hardware, consoles or clock to manage.
  for unit in systemd-udevd.service systemd-udevd-control.socket systemd-udevd-kernel.socket \
      getty@tty1.service console-getty.service systemd-logind.service systemd-timesyncd.service \
      apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer fstrim.timer; do
    ln -sf /dev/null "$rootfs/etc/systemd/system/$unit"
  done
  : >"$rootfs/etc/machine-id"
  # A freshly installed server as the seed's users have it: root may log in with a password.
  sed -i -e 's/^#\?PermitRootLogin.*/PermitRootLogin yes/' \
         -e 's/^#\?PasswordAuthentication.*/PasswordAuthentication yes/' "$rootfs/etc/ssh/sshd_config"
  echo "deb $mirror bookworm main" >"$rootfs/etc/apt/sources.list"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb
  tar -C "$rootfs" -c . | podman import --change 'CMD=["/sbin/init"]' --change 'STOPSIGNAL=SIGRTMIN+3' - "$IMAGE" >/dev/null
  rm -rf "$rootfs"
}

ensure_image() {
  podman image exists "$IMAGE" && return
  build_image
  # Images of older recipes go, unless a container still runs one.
  podman images --format '{{.Repository}}:{{.Tag}}' | grep '^localhost/dsmesh-node:' | grep -vx "$IMAGE" |
    xargs -r podman rmi >/dev/null 2>&1 || true
}

ensure_network() {
  podman network exists "$NETWORK" || podman network create "$NETWORK" >/dev/null
}

node_name() { echo "$PREFIX-node$1"; }

existing_nodes() {
  podman ps -a --filter "label=$PREFIX.lab=1" --format '{{.Names}}' | sort -V
}

node_ip() {
  podman inspect -f "{{(index .NetworkSettings.Networks \"$NETWORK\").IPAddress}}" "$1"
}

wait_sshd() {  # $1 = node; sshd answers on port 22 (needs its fresh host keys first)
  local ip deadline=$((SECONDS + 60))
  ip=$(node_ip "$1")
  until timeout 1 bash -c "exec 3<>/dev/tcp/$ip/22" 2>/dev/null; do
    ((SECONDS < deadline)) || { log "sshd on $1 ($ip) did not come up in 60 s"; podman logs --tail 20 "$1" >&2; exit 1; }
    sleep 0.5
  done
}

start_node() {  # $1 = node; (re)creates it when missing, built from another image or for another login user
  local node=$1
  if podman container exists "$node"; then
    if [[ $(podman inspect -f '{{.ImageName}}' "$node") != "$IMAGE" ]]; then
      log "$node runs an older image: recreating it"
      podman rm -f "$node" >/dev/null
    elif [[ $(podman inspect -f "{{index .Config.Labels \"$PREFIX.sudo_user\"}}" "$node") != "$SUDO_USER_NAME" ]]; then
      log "$node was made for another login user: recreating it"
      podman rm -f "$node" >/dev/null
    else
      [[ $(podman inspect -f '{{.State.Running}}' "$node") == true ]] || podman start "$node" >/dev/null
      return
    fi
  fi
  log "starting $node"
  podman run -d --name "$node" --hostname "$node" --network "$NETWORK" --label "$PREFIX.lab=1" \
    --label "$PREFIX.sudo_user=$SUDO_USER_NAME" --systemd=always --shm-size 256m "${MOUNTS[@]}" "$IMAGE" >/dev/null
  podman exec "$node" sh -c "echo 'root:$(cat "$STATE/root_password")' | chpasswd"
  if [[ -n $SUDO_USER_NAME ]]; then
    # Debian's sudoers lets group sudo become root with the user's own password.
    podman exec "$node" sh -c "useradd --create-home --shell /bin/bash --groups sudo '$SUDO_USER_NAME' &&
      echo '$SUDO_USER_NAME:$(cat "$STATE/root_password")' | chpasswd &&
      sed -i 's/^#\?PermitRootLogin.*/PermitRootLogin no/' /etc/ssh/sshd_config"
  fi
  # The node's host key changed: forget what the controller knew under its name or address.
  for key in "$node" "$(node_ip "$node")"; do
    ssh-keygen -R "$key" -f "$STATE/known_hosts" >/dev/null 2>&1 || true
  done
}

write_inventory() {
  local nodes=("$@") node ip
  mkdir -p "$(dirname "$INVENTORY")"
  local tmp
  tmp=$(mktemp "$INVENTORY.XXXXXX")
  {
    echo "# Written by 'make lab' ($(date -u +%FT%TZ)); rewritten on every run."
    echo "all:"
    echo "  vars:"
    if [[ -n $SUDO_USER_NAME ]]; then
      echo "    # Root may not log in over ssh: $SUDO_USER_NAME logs in with its password and becomes root with sudo."
      echo "    cluster_user: $SUDO_USER_NAME"
      echo "    ansible_user: $SUDO_USER_NAME"
      echo "    ansible_password: $(cat "$STATE/root_password")"
      echo "    ansible_become_password: $(cat "$STATE/root_password")"
    else
      echo "    cluster_user: root"
      echo "    ansible_user: root"
      echo "    # The first run logs in with the root password, like the seed's users do."
      echo "    ansible_password: $(cat "$STATE/root_password")"
    fi
    echo "    ansible_ssh_private_key_file: $STATE/controller_ed25519"
    echo "    controller_public_key_file: $STATE/controller_ed25519.pub"
    echo "    # The controller reaches the nodes from the lab network's gateway: its key works from there only."
    echo "    controller_address: $(podman network inspect -f '{{range .Subnets}}{{.Gateway}}{{end}}' "$NETWORK")"
    echo "    ansible_ssh_common_args: -o UserKnownHostsFile=$STATE/known_hosts"
    echo "    lab: $PREFIX"
    echo "    # The job: the controller's .venv is mounted read-only at the same path on every node"
    echo "    # (as an NFS mount would be); a tiny Qwen2 is written on the master and synced to the others."
    echo "    training_env_mode: existing"
    echo "    training_env_python: $ROOT/.venv/bin/python"
    echo "    training_env_make_tiny_model: true"
    echo "    training_env_sync_data_from_master: true"
    echo "    training_env_model_dir: /var/lib/dsmesh/models/tiny-qwen2"
    echo "    training_env_datasets: [/var/lib/dsmesh/models/tiny-qwen2/data/train.jsonl]"
    echo "    deepspeed_job_run_name: lab"
    echo "    deepspeed_job_max_seq_length: 128"
    echo "    deepspeed_job_global_batch_size: 8"
    echo "    deepspeed_job_plan_overrides: {zero_stage: 3}"
    echo "    deepspeed_job_train_args: {max_steps: 40, save_steps: 10, logging_steps: 2, learning_rate: 0.003, warmup_steps: 2}"
    echo "    deepspeed_job_preflight_min_free_gib: 1"
    echo "    # All lab nodes share this machine's cores: one thread per rank."
    echo "    deepspeed_job_env: {DS_ACCELERATOR: cpu, OMP_NUM_THREADS: 1, DEEPSPEED_TIMEOUT: 2}"
    echo "  children:"
    echo "    cluster:"
    echo "      hosts:"
    for node in "${nodes[@]}"; do
      ip=$(node_ip "$node")
      echo "        $node:"
      echo "          ansible_host: $ip"
      echo "          cluster_address: $node"
      echo "          gpus: 1"
    done
    echo "    master:"
    echo "      hosts:"
    echo "        ${nodes[0]}:"
  } >"$tmp"
  mv "$tmp" "$INVENTORY"
}

# The controller learns each node's host key through podman, a channel it already trusts,
# so even the first ssh connection checks host keys strictly.
record_host_keys() {
  local node ip
  for node in "$@"; do
    ip=$(node_ip "$node")
    ssh-keygen -R "$ip" -f "$STATE/known_hosts" >/dev/null 2>&1 || true
    ssh-keygen -R "$node" -f "$STATE/known_hosts" >/dev/null 2>&1 || true
    podman exec "$node" sh -c 'cat /etc/ssh/ssh_host_*_key.pub' |
      awk -v h="$node,$ip" '{print h, $1, $2}' >>"$STATE/known_hosts"
  done
  rm -f "$STATE/known_hosts.old"
}

cmd_up() {
  local count=${1:-2}
  [[ $count =~ ^[1-9][0-9]*$ ]] || { log "NODES must be a positive number, got '$count'"; exit 2; }
  mkdir -p "$STATE"
  [[ -s $STATE/root_password ]] || (umask 077; head -c 12 /dev/urandom | base64 | tr -d '/+=' >"$STATE/root_password")
  [[ -f $STATE/controller_ed25519 ]] || ssh-keygen -q -t ed25519 -N '' -C "dsmesh-lab-controller" -f "$STATE/controller_ed25519"
  touch "$STATE/known_hosts"
  ensure_image
  ensure_network
  local node wanted=()
  for ((i = 1; i <= count; i++)); do wanted+=("$(node_name "$i")"); done
  for node in $(existing_nodes); do
    [[ " ${wanted[*]} " == *" $node "* ]] || { log "removing $node (beyond NODES=$count)"; podman rm -f "$node" >/dev/null; }
  done
  for node in "${wanted[@]}"; do start_node "$node"; done
  for node in "${wanted[@]}"; do wait_sshd "$node"; done
  if [[ -n $SUDO_USER_NAME ]]; then
    # sshd may have read sshd_config before start_node turned root login off.
    for node in "${wanted[@]}"; do podman exec "$node" systemctl reload ssh; done
  fi
  record_host_keys "${wanted[@]}"
  write_inventory "${wanted[@]}"
  log "$count node(s) up; inventory: ${INVENTORY#"$ROOT"/}"
}

cmd_down() {
  local nodes
  mapfile -t nodes < <(existing_nodes)
  ((${#nodes[@]} == 0)) || podman rm -f -t 2 "${nodes[@]}" >/dev/null
  if podman network exists "$NETWORK"; then podman network rm "$NETWORK" >/dev/null || true; fi
  rm -f "$INVENTORY" "$STATE/known_hosts"
  log "lab removed"
}

case ${1:-} in
  up) cmd_up "${2:-2}" ;;
  down) cmd_down ;;
  image) ensure_image ;;
  image-name) echo "$IMAGE" ;;
  *) echo "usage: $0 up N | down | image | image-name" >&2; exit 2 ;;
esac
