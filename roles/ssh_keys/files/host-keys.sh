#!/usr/bin/env bash
# Runs on a node, as root: the node's SSH keys, then its SSH facts as one JSON object.
#
# - Host keys as a hardened sshd offers them: an ed25519 key, and an RSA key of BITS bits. An RSA
#   key of another size is replaced by a new one, generated in the background at low priority
#   (about a second of CPU for 4096 bits) while the run goes on: the job moves the new key into
#   place itself, and sshd_lockdown's finish step (site.yml's last ssh play) waits for it with
#   sshd-check.sh --wait-for and reloads sshd. --wait generates it here instead. The ecdsa key is left alone: the hardened sshd does not offer it.
# - With --user NAME: NAME's key pair ~NAME/.ssh/id_TYPE (ssh-keygen; an existing pair is kept).
#
# The JSON: changed (a key was, or with --check would be, generated), generated (which), rsa_job
# (the background job's PID file while it runs, else null),
# host_keys ("TYPE BASE64" of every host public key), host_key_files (the private host keys
# present), rsa_bits, user_public_key, openssh (the version and the names `ssh -Q` lists: the
# server package depends on the client package of its version; whether sshd and ssh do the
# strict key exchange, the Terrapin countermeasure), addresses (`hostname -I`, where the node's
# connections come from).
#
#   host-keys.sh [--check] [--wait] [--rsa-bits BITS] [--user NAME --type TYPE [--bits BITS] [--comment TEXT]]
#   (--rsa-bits 0 keeps the RSA host key whatever its size)
set -euo pipefail
check=false wait=false rsa_bits=0 user='' type=ed25519 bits='' comment=''
while (($#)); do
  case $1 in
    --check) check=true; shift ;;
    --wait) wait=true; shift ;;
    --rsa-bits) rsa_bits=${2:?}; shift 2 ;;
    --user) user=${2:?}; shift 2 ;;
    --type) type=${2:?}; shift 2 ;;
    --bits) bits=${2:-}; shift 2 ;;
    --comment) comment=${2:-}; shift 2 ;;
    *) echo "usage: $0 [--check] [--wait] [--rsa-bits BITS] [--user NAME --type TYPE [--bits BITS] [--comment TEXT]]" >&2; exit 2 ;;
  esac
done
[[ $rsa_bits =~ ^[0-9]+$ ]] || { echo "host-keys: --rsa-bits must be a number, got '$rsa_bits'" >&2; exit 2; }
dir=/etc/ssh
# The background RSA job: its PID while it runs, its error (JOB.error) if it failed; the facts
# name the file while a job runs (rsa_job), which sshd-check.sh --wait-for reads.
job=/run/dsmesh-rsa-host-key.pid
job_error=$job.error
generated=()

key_bits() { ssh-keygen -l -f "$1" 2>/dev/null | awk '{ print $1 }'; }

# A new key is written beside the old one and moved over it, private key first: sshd never
# reads a half-written key.
new_host_key() {  # TYPE [BITS]
  local type=$1 path=/etc/ssh/ssh_host_$1_key tmp
  tmp=$(mktemp "/etc/ssh/.ssh_host_${type}_key.XXXXXX")
  rm -f "$tmp"
  ssh-keygen -q -t "$type" ${2:+-b "$2"} -N '' -C "root@$(hostname)" -f "$tmp"
  chmod 0600 "$tmp"
  chmod 0644 "$tmp.pub"
  mv -f "$tmp" "$path"
  mv -f "$tmp.pub" "$path.pub"
}

if [[ ! -s $dir/ssh_host_ed25519_key || ! -s $dir/ssh_host_ed25519_key.pub ]]; then
  generated+=(ed25519)
  $check || new_host_key ed25519
fi
running=false
[[ -s $job ]] && kill -0 "$(cat "$job")" 2>/dev/null && running=true
if ((rsa_bits > 0)) && ! $running; then
  if [[ ! -s $dir/ssh_host_rsa_key || $(key_bits "$dir/ssh_host_rsa_key.pub") != "$rsa_bits" ]]; then
    generated+=(rsa)
    if $check; then
      :
    elif $wait; then
      new_host_key rsa "$rsa_bits"
    else
      rm -f "$job_error"
      # Its own session, so that it outlives this script; nice, so that it takes idle CPU.
      setsid nice -n 19 bash -c "set -euo pipefail; $(declare -f new_host_key)
        echo \$\$ >$job
        trap 'rm -f $job' EXIT
        new_host_key rsa $rsa_bits 2>$job_error.tmp || { mv -f $job_error.tmp $job_error; exit 1; }
        rm -f $job_error.tmp" </dev/null >/dev/null 2>&1 &
    fi
  fi
fi

user_public_key=''
if [[ -n $user ]]; then
  home=$(getent passwd "$user" | cut -d: -f6)
  [[ -n $home ]] || { echo "host-keys: no user '$user' on $(hostname)" >&2; exit 1; }
  key=$home/.ssh/id_$type
  if [[ ! -s $key || ! -s $key.pub ]]; then
    generated+=("$user's $type key")
    if ! $check; then
      group=$(id -gn "$user")
      install -d -m 0700 -o "$user" -g "$group" "$home/.ssh"
      rm -f "$key" "$key.pub"
      ssh-keygen -q -t "$type" ${bits:+-b "$bits"} -N '' -C "$comment" -f "$key"
      chown "$user:$group" "$key" "$key.pub"
    fi
  fi
  [[ -s $key.pub ]] && read -r user_public_key <"$key.pub"
fi

# JSON of names, keys and addresses: none of them holds a quote or a backslash.
clean() { local s=${1//\\/}; printf '%s' "${s//\"/}"; }
json_list() {  # WORD... -> ["WORD", ...]
  local sep='' word
  printf '['
  for word in "$@"; do printf '%s"%s"' "$sep" "$(clean "$word")"; sep=', '; done
  printf ']'
}
query() { ssh -Q "$1" 2>/dev/null | tr '\n' ' ' || true; }
keys=() files=()
for pub in "$dir"/ssh_host_*_key.pub; do
  [[ -s $pub ]] || continue
  read -r key_type blob _ <"$pub" && keys+=("$key_type $blob")
  [[ -s ${pub%.pub} ]] && files+=("${pub%.pub}")
done
strict_server=false strict_client=false
for binary in /usr/sbin/sshd /usr/lib/openssh/sshd-session /usr/libexec/openssh/sshd-session; do
  if [[ -f $binary ]] && grep -aqF 'kex-strict-s-v00@openssh.com' "$binary"; then strict_server=true; fi
done
if grep -aqF 'kex-strict-c-v00@openssh.com' "$(command -v ssh)"; then strict_client=true; fi
version=$(ssh -V 2>&1 | head -n 1)
rsa_now=$(key_bits "$dir/ssh_host_rsa_key.pub" || true)
read -ra addresses <<<"$(hostname -I 2>/dev/null || true)"
rsa_job=null
if ! $check && ! $wait && [[ " ${generated[*]:-} " == *" rsa "* ]] || $running; then rsa_job="\"$job\""; fi
# shellcheck disable=SC2046 # ssh -Q prints one name a line: split into words on purpose
printf '{"changed": %s, "generated": %s, "rsa_job": %s, "host_keys": %s, "host_key_files": %s, "rsa_bits": %s, "user_public_key": "%s", "openssh": {"version": "%s", "kex": %s, "ciphers": %s, "macs": %s, "key_algorithms": %s, "strict_kex": {"server": %s, "client": %s}}, "addresses": %s}\n' \
  "$( ((${#generated[@]})) && echo true || echo false)" "$(json_list ${generated[@]+"${generated[@]}"})" "$rsa_job" \
  "$(json_list ${keys[@]+"${keys[@]}"})" "$(json_list ${files[@]+"${files[@]}"})" "${rsa_now:-null}" \
  "$(clean "$user_public_key")" "$(clean "$version")" "$(json_list $(query kex))" "$(json_list $(query cipher))" \
  "$(json_list $(query mac))" "$(json_list $(query key-sig))" "$strict_server" "$strict_client" \
  "$(json_list ${addresses[@]+"${addresses[@]}"})"
