#!/usr/bin/env bash
# Runs on a node, as root, after the sshd drop-in is written and before sshd reloads it.
# With --wait-for PIDFILE, first waits for the background job ssh_keys' host-keys.sh started
# to make a new RSA host key (PIDFILE holds its PID while it runs, PIDFILE.error its error if it
# failed): sshd_lockdown's finish step, before sshd reloads to serve the new key.
# With --moduli FILE --moduli-min-bits BITS, then removes the Diffie-Hellman group-exchange
# moduli smaller than BITS from FILE (ssh-audit's hardening guides keep those of 3072 bits and
# more); prints "trimmed FILE" when it changed (or, with --check, would change) it.
# Then checks the whole configuration as sshd will read it (`sshd -T`, drop-ins included): every
# EXPECTED line must be among the effective settings it prints, so a configuration that is
# broken, or that does not take the drop-in (a main sshd_config setting an option before its
# Include line), is never reloaded.
#
#   sshd-check.sh [--check] [--sshd PATH] [--host NAME] [--wait-for PIDFILE] [--moduli FILE --moduli-min-bits BITS] -- EXPECTED...
set -euo pipefail
check=false sshd=/usr/sbin/sshd host=$(hostname) moduli='' min_bits=0 job=''
# Seconds to wait for the host key job (it takes one to a few seconds of CPU).
job_timeout=300
while (($#)) && [[ $1 != -- ]]; do
  case $1 in
    --check) check=true; shift ;;
    --sshd) sshd=$2; shift 2 ;;
    --host) host=$2; shift 2 ;;
    --moduli) moduli=$2; shift 2 ;;
    --wait-for) job=$2; shift 2 ;;
    --moduli-min-bits) min_bits=$2; shift 2 ;;
    *) echo "usage: $0 [--check] [--sshd PATH] [--host NAME] [--wait-for PIDFILE] [--moduli FILE --moduli-min-bits BITS] -- EXPECTED..." >&2; exit 2 ;;
  esac
done
shift || true
[[ $min_bits =~ ^[0-9]+$ ]] || { echo "sshd-check: --moduli-min-bits must be a number, got '$min_bits'" >&2; exit 2; }

if [[ -n $job ]]; then
  start=$SECONDS
  # The job ran at low priority while the run went on; now the run waits for it. It leads its
  # own process group (setsid): back to normal priority, ssh-keygen included.
  if [[ -s $job ]]; then renice -n 0 -g "$(cat "$job")" >/dev/null 2>&1 || true; fi
  while [[ -s $job ]] && kill -0 "$(cat "$job" 2>/dev/null)" 2>/dev/null; do
    if ((SECONDS - start > job_timeout)); then
      echo "$host: the new RSA host key is not ready after $job_timeout s (job $(cat "$job"))" >&2
      exit 1
    fi
    sleep 0.2
  done
  if [[ -s $job.error ]]; then
    echo "$host: making the new RSA host key failed: $(cat "$job.error")" >&2
    exit 1
  fi
fi

# The moduli file's fifth field is the size minus one (a 3072-bit modulus says 3071).
if [[ -n $moduli && $min_bits -gt 0 && -f $moduli ]]; then
  if awk -v min="$min_bits" '!/^#/ && NF >= 7 && $5 + 1 < min { found = 1; exit } END { exit !found }' "$moduli"; then
    if ! awk -v min="$min_bits" '!/^#/ && NF >= 7 && $5 + 1 >= min { found = 1; exit } END { exit !found }' "$moduli"; then
      echo "$host: $moduli holds no modulus of $min_bits bits or more; left as it is" >&2
      exit 1
    fi
    if ! $check; then
      tmp=$(mktemp "$moduli.XXXXXX")
      awk -v min="$min_bits" '/^#/ || NF < 7 || $5 + 1 >= min' "$moduli" >"$tmp"
      chmod --reference="$moduli" "$tmp"
      mv -f "$tmp" "$moduli"
    fi
    echo "trimmed $moduli"
  fi
fi

settings=$("$sshd" -T)
missing=()
for want in "$@"; do
  grep -qxF -- "$want" <<<"$settings" || missing+=("$want")
done
if ((${#missing[@]})); then
  echo "$host: sshd -T does not show: $(printf "'%s' " "${missing[@]}")Its sshd_config must" \
       "'Include /etc/ssh/sshd_config.d/*.conf' before any line setting these options." >&2
  exit 1
fi
