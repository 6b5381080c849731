#!/usr/bin/env bash
# Proves key login before anything that depends on it: each LOGIN runs `ssh ... true` with the
# key alone (BatchMode, no password or keyboard-interactive, strict host key checking). With
# --server-offer NAME=LIST (KexAlgorithms, Ciphers, MACs, HostKeyAlgorithms,
# PubkeyAcceptedAlgorithms) the login may use only what both this ssh (its effective settings
# for that destination, `ssh -G`) and LIST allow: LIST is what the server will offer once its
# new settings are in place, so a login that passes now still works after sshd reloads them.
#
#   key-login-check.sh [--parallel N] [--timeout S] [--what TEXT] [--fix TEXT] \
#       -- LABEL [--server-offer NAME=LIST]... SSH-ARGUMENT... DESTINATION [-- LABEL ...]
#
# Prints one line per login, "ok LABEL" or "refused LABEL: ssh's error", in the order given.
# Exit status 0 when every login worked; 1 otherwise, after "TEXT LABEL: error; ... FIX" on
# stderr; 2 for a bad command line. Up to N logins run at once (default 8): sshd drops
# connections beyond MaxStartups (10 by default) with kex_exchange_identification errors, which
# are retried; a refused key is not.
# Used by the sshd_lockdown role (from the controller, and from each node to its share of the
# nodes); the preflight can run it on the master the same way.
set -uo pipefail
parallel=8 timeout=10 what="key login failed:" fix=""
usage() { echo "usage: $0 [--parallel N] [--timeout S] [--what TEXT] [--fix TEXT] -- LABEL [--server-offer NAME=LIST]... SSH-ARGUMENT... [-- ...]" >&2; exit 2; }
while (($#)) && [[ $1 != -- ]]; do
  case $1 in
    --parallel) parallel=${2:-}; shift 2 || usage ;;
    --timeout) timeout=${2:-}; shift 2 || usage ;;
    --what) what=${2:-}; shift 2 || usage ;;
    --fix) fix=${2:-}; shift 2 || usage ;;
    *) usage ;;
  esac
done
[[ $parallel =~ ^[1-9][0-9]*$ && $timeout =~ ^[1-9][0-9]*$ ]] || usage

# A login carries nothing but `true`: where the key exchanges allowed include curve25519, it goes
# first (about 5 ms of CPU against 70 ms for the post-quantum sntrup761 hybrid).
cheap_kex=curve25519-sha256

# `ssh -G` prints NAME in lower case; PubkeyAcceptedAlgorithms was PubkeyAcceptedKeyTypes before 8.5.
effective() {  # NAME SSH-ARGUMENT...: this ssh's list for NAME towards that destination
  local key=${1,,} line
  shift
  while read -r name line; do
    if [[ $name == "$key" || ($key == pubkeyacceptedalgorithms && $name == pubkeyacceptedkeytypes) ]]; then
      printf '%s\n' "$line"
      return
    fi
  done < <(ssh -G "$@" 2>/dev/null)
}

# What both allow, in this ssh's order of preference.
common() {  # CLIENT-LIST SERVER-LIST (comma-separated)
  local -a mine theirs both=()
  local a b
  IFS=, read -ra mine <<<"$1"
  IFS=, read -ra theirs <<<"$2"
  for a in "${mine[@]}"; do
    for b in "${theirs[@]}"; do [[ $a == "$b" ]] && both+=("$a") && break; done
  done
  (IFS=,; printf '%s' "${both[*]}")
}

cheap_first() {  # LIST: the same list, curve25519-sha256 first when it holds it
  local -a all rest=()
  local k
  IFS=, read -ra all <<<"$1"
  for k in "${all[@]}"; do [[ $k == "$cheap_kex" ]] || rest+=("$k"); done
  if ((${#rest[@]} < ${#all[@]})); then rest=("$cheap_kex" ${rest[@]+"${rest[@]}"}); fi
  (IFS=,; printf '%s' "${rest[*]}")
}

login() {  # LABEL [--server-offer NAME=LIST]... SSH-ARGUMENT...: prints ok/refused
  local label=$1 offer name list mine both err try
  local -a offers=() options=()
  shift
  while [[ ${1:-} == --server-offer ]]; do offers+=("$2"); shift 2; done
  (($#)) || { echo "refused $label: no destination given"; return; }
  for offer in "${offers[@]}"; do
    name=${offer%%=*} list=${offer#*=}
    mine=$(effective "$name" "$@")
    both=$(common "$mine" "$list")
    if [[ -z $both ]]; then
      echo "refused $label: this ssh and the server's new settings have no $name in common (ssh: ${mine:-none}; server: $list)"
      return
    fi
    [[ $name == KexAlgorithms ]] && both=$(cheap_first "$both")
    options+=(-o "$name=$both")
  done
  for try in 1 2 3; do
    if err=$(ssh -o BatchMode=yes -o PasswordAuthentication=no -o KbdInteractiveAuthentication=no \
                 -o StrictHostKeyChecking=yes -o ConnectTimeout="$timeout" ${options[@]+"${options[@]}"} \
                 "$@" true 2>&1 </dev/null); then
      echo "ok $label"
      return
    fi
    case $err in
      *kex_exchange_identification*|*"Connection reset"*|*"Connection closed"*) sleep "$try" ;;
      *) break ;;
    esac
  done
  echo "refused $label: $(printf '%s' "${err:-ssh failed}" | tr '\n' ' ')"
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
count=0
while (($#)); do
  [[ $1 == -- ]] || usage
  shift
  group=()
  while (($#)) && [[ $1 != -- ]]; do group+=("$1"); shift; done
  ((${#group[@]} >= 2)) || usage
  count=$((count + 1))
  login "${group[@]}" >"$work/$count" &
  while (($(jobs -rp | wc -l) >= parallel)); do wait -n; done
done
wait
((count > 0)) || usage

refused=()
for ((i = 1; i <= count; i++)); do
  line=$(cat "$work/$i")
  echo "$line"
  [[ $line == ok\ * ]] || refused+=("${line#refused }")
done
if ((${#refused[@]})); then
  joined=$(printf '%s; ' "${refused[@]}")
  echo "$what ${joined%; }${fix:+ $fix}" >&2
  exit 1
fi
