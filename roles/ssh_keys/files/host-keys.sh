#!/usr/bin/env bash
# Runs on a node, as root. Makes the node's SSH host keys what a hardened sshd offers: an
# ed25519 key, and an RSA key of BITS bits (a key of any other size is replaced by a new one;
# the ecdsa key is left alone, the hardened sshd does not offer it). Then prints the node's SSH
# facts as one JSON object, for the ssh roles:
#   changed           whether a host key was (or, with --check, would be) generated
#   generated         the key types generated
#   host_keys         "TYPE BASE64" of every host public key, what known_hosts records
#   host_key_files    the private host key files present
#   rsa_bits          the RSA host key's size
#   openssh           the OpenSSH version and the algorithm names it knows (`ssh -Q`: the server
#                     package depends on the client package of the same version), and whether
#                     sshd and ssh do the strict key exchange (the Terrapin countermeasure)
#   addresses         the node's own addresses (`hostname -I`): where its connections come from
#
#   host-keys.sh [--check] [--rsa-bits BITS]      (BITS 0: keep the RSA key whatever its size)
set -euo pipefail
check=false rsa_bits=0
while (($#)); do
  case $1 in
    --check) check=true; shift ;;
    --rsa-bits) rsa_bits=${2:?--rsa-bits needs a number}; shift 2 ;;
    *) echo "usage: $0 [--check] [--rsa-bits BITS]" >&2; exit 2 ;;
  esac
done
[[ $rsa_bits =~ ^[0-9]+$ ]] || { echo "host-keys: --rsa-bits must be a number, got '$rsa_bits'" >&2; exit 2; }
dir=/etc/ssh
generated=()

key_bits() { ssh-keygen -l -f "$1" 2>/dev/null | awk '{ print $1 }'; }

# A new key is written beside the old one and moved over it, private key first: sshd never
# reads a half-written key.
new_host_key() {  # TYPE [BITS]
  local type=$1 path=$dir/ssh_host_$1_key tmp
  generated+=("$type")
  $check && return
  tmp=$(mktemp "$dir/.ssh_host_${type}_key.XXXXXX")
  rm -f "$tmp"
  ssh-keygen -q -t "$type" ${2:+-b "$2"} -N '' -C "root@$(hostname)" -f "$tmp"
  chmod 0600 "$tmp"
  chmod 0644 "$tmp.pub"
  mv -f "$tmp" "$path"
  mv -f "$tmp.pub" "$path.pub"
}

[[ -s $dir/ssh_host_ed25519_key && -s $dir/ssh_host_ed25519_key.pub ]] || new_host_key ed25519
if ((rsa_bits > 0)); then
  if [[ ! -s $dir/ssh_host_rsa_key || $(key_bits "$dir/ssh_host_rsa_key.pub") != "$rsa_bits" ]]; then
    new_host_key rsa "$rsa_bits"
  fi
fi

# JSON of names, keys and addresses: none of them holds a quote or a backslash.
json_list() {  # WORD... -> ["WORD", ...]
  local sep='' word
  printf '['
  for word in "$@"; do printf '%s"%s"' "$sep" "${word//[\"\\]/}"; sep=', '; done
  printf ']'
}
query() { ssh -Q "$1" 2>/dev/null | tr '\n' ' ' || true; }
# shellcheck disable=SC2046 # word splitting of ssh -Q's one-name-a-line output is the point
{
  keys=() files=()
  for pub in "$dir"/ssh_host_*_key.pub; do
    [[ -s $pub ]] || continue
    read -r type blob _ <"$pub" && keys+=("$type $blob")
    [[ -s ${pub%.pub} ]] && files+=("${pub%.pub}")
  done
  strict_server=false strict_client=false
  for binary in /usr/sbin/sshd /usr/lib/openssh/sshd-session /usr/libexec/openssh/sshd-session; do
    [[ -f $binary ]] && grep -aqF 'kex-strict-s-v00@openssh.com' "$binary" && strict_server=true
  done
  grep -aqF 'kex-strict-c-v00@openssh.com' "$(command -v ssh)" && strict_client=true
  version=$(ssh -V 2>&1 | head -n 1)
  bits=$(key_bits "$dir/ssh_host_rsa_key.pub" || true)
  read -ra addresses <<<"$(hostname -I 2>/dev/null || true)"
  printf '{"changed": %s, "generated": %s, "host_keys": %s, "host_key_files": %s, "rsa_bits": %s,\n' \
    "$( ((${#generated[@]})) && echo true || echo false)" "$(json_list "${generated[@]}")" \
    "$(json_list "${keys[@]}")" "$(json_list "${files[@]}")" "${bits:-null}"
  printf ' "openssh": {"version": "%s", "kex": %s, "ciphers": %s, "macs": %s, "key_algorithms": %s,\n' \
    "${version//[\"\\]/}" "$(json_list $(query kex))" "$(json_list $(query cipher))" "$(json_list $(query mac))" \
    "$(json_list $(query key-sig))"
  printf '  "strict_kex": {"server": %s, "client": %s}},\n' "$strict_server" "$strict_client"
  printf ' "addresses": %s}\n' "$(json_list "${addresses[@]}")"
}
