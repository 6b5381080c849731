# shellcheck shell=bash
# Sourced by the Makefile's recipes and the lab scripts: points podman at a containers.conf kept
# in the project's state folder, so nothing under /etc is edited. Why each setting:
# crun fails here (cgroups in hybrid mode), there is no systemd on the host, and root lacks
# CAP_SYS_RESOURCE so podman's default ulimits must not exceed the hard limits.
_repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$_repo/.state/podman"
_conf=$_repo/.state/podman/containers.conf
_nofile=$(ulimit -Hn); _nproc=$(ulimit -Hu)
[[ $_nproc == unlimited || $_nproc -gt 32768 ]] && _nproc=32768
[[ $_nofile == unlimited || $_nofile -gt 1048576 ]] && _nofile=1048576
_want="[engine]
runtime = \"runc\"
cgroup_manager = \"cgroupfs\"
events_logger = \"file\"

[containers]
default_ulimits = [\"nofile=$_nofile:$_nofile\", \"nproc=$_nproc:$_nproc\"]
"
[[ -f $_conf && "$(cat "$_conf")" == "$_want" ]] || printf '%s' "$_want" >"$_conf"
export CONTAINERS_CONF=$_conf
unset _repo _conf _nofile _nproc _want
