"""The pdsh role's controller-side packages: which .deb files a node is sent (plugins/filter/debs.py),
the download script's answer on a controller without apt, and the packing of a node's bundle."""
import subprocess
from pathlib import Path

import pytest

from ansible_collections.dsmesh.cluster.plugins.filter.debs import deb_files, deb_records

FILES = Path(__file__).resolve().parents[2] / "roles" / "pdsh" / "files"

INDEX = """Package: pdsh
Version: 2.34-0.2
Architecture: amd64
Depends: libc6 (>= 2.34), perl, rsh-client
Description: Efficient rsh-like utility
 a continuation line: with a colon
Filename: ./pdsh_2.34-0.2_amd64.deb

Package: perl-base
Version: 5.36.0-7+deb12u4
Architecture: amd64
Filename: ./perl-base_5.36.0-7+deb12u4_amd64.deb

Package: libaudit1
Version: 1:3.0.9-1
Architecture: amd64
Filename: ./libaudit1_3.0.9-1_amd64.deb

Package: libc6
Version: 2.36-9+deb12u14
Architecture: amd64
Filename: ./libc6_2.36-9+deb12u14_amd64.deb
"""


def test_records_keep_first_lines_and_skip_continuations():
    records = deb_records(INDEX)
    assert [r["Package"] for r in records] == ["pdsh", "perl-base", "libaudit1", "libc6"]
    assert records[0]["Depends"] == "libc6 (>= 2.34), perl, rsh-client"
    assert "a continuation line" not in records[0]
    assert records[2]["Version"] == "1:3.0.9-1"


def test_a_node_is_sent_the_files_of_apts_plan():
    # what `apt-get install --simulate pdsh` planned on a node with libc6 but an older perl-base;
    # multi-arch names count as the package
    planned = ["pdsh 2.34-0.2", "perl-base:amd64 5.36.0-7+deb12u4", ""]
    assert deb_files(INDEX, planned) == ["pdsh_2.34-0.2_amd64.deb", "perl-base_5.36.0-7+deb12u4_amd64.deb"]


def test_a_node_that_has_everything_is_sent_nothing():
    assert deb_files(INDEX, []) == []


def test_a_plan_the_index_cannot_serve_is_an_error():
    with pytest.raises(ValueError, match="apt planned perl-base 5.36.0-7\\+deb12u9, which the controller's index does not hold"):
        deb_files(INDEX, ["perl-base 5.36.0-7+deb12u9"])
    with pytest.raises(ValueError, match="expected 'NAME VERSION'"):
        deb_files(INDEX, ["Inst pdsh (2.34-0.2 [amd64])"])


def test_fetch_script_without_apt_says_which_variable_to_set(tmp_path):
    # A controller without apt (an empty PATH here): no network is touched, nothing is written.
    script = FILES / "fetch-debs.sh"
    (tmp_path / "bin").mkdir()
    proc = subprocess.run(["/bin/bash", str(script), str(tmp_path / "repo"), "pdsh"], capture_output=True, text=True,
                          env={"PATH": str(tmp_path / "bin")})
    assert proc.returncode == 3, proc.stderr
    assert "the controller has no apt-get" in proc.stderr and "pdsh_install_from: apt" in proc.stderr
    assert not (tmp_path / "repo").exists()


PACK = FILES / "pack-debs.sh"


def _pack(bundle, repo, *files):
    return subprocess.run(["/bin/bash", str(PACK), str(bundle), str(repo), *files], capture_output=True, text=True)


def _members(bundle):
    return sorted(subprocess.run(["tar", "-tf", str(bundle)], capture_output=True, text=True, check=True).stdout.split())


@pytest.fixture
def repo(tmp_path):
    repo = tmp_path / "pdsh"
    repo.mkdir()
    (repo / "Packages").write_text(INDEX)
    for name in ("pdsh_2.34-0.2_amd64.deb", "libc6_2.36-9+deb12u14_amd64.deb"):
        (repo / name).write_bytes(name.encode() * 4000)
    return repo


def test_pack_writes_the_index_and_the_files_then_keeps_a_complete_bundle(repo, tmp_path):
    bundle = tmp_path / "pdsh-abc.tar"
    first = _pack(bundle, repo, "pdsh_2.34-0.2_amd64.deb")
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == f"packed {bundle}"
    assert _members(bundle) == ["Packages", "pdsh_2.34-0.2_amd64.deb"]
    assert oct(bundle.stat().st_mode & 0o777) == "0o644"
    again = _pack(bundle, repo, "pdsh_2.34-0.2_amd64.deb")
    assert again.stdout.strip() == f"kept {bundle}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pdsh", "pdsh-abc.tar"]


def test_pack_replaces_a_partial_bundle_left_by_a_killed_run(repo, tmp_path):
    # what a run stopped while writing leaves: the first half of the tar
    bundle = tmp_path / "pdsh-abc.tar"
    assert _pack(bundle, repo, "pdsh_2.34-0.2_amd64.deb", "libc6_2.36-9+deb12u14_amd64.deb").returncode == 0
    bundle.write_bytes(bundle.read_bytes()[: bundle.stat().st_size // 2])
    proc = _pack(bundle, repo, "pdsh_2.34-0.2_amd64.deb", "libc6_2.36-9+deb12u14_amd64.deb")
    assert proc.stdout.strip() == f"packed {bundle}", proc.stderr
    assert _members(bundle) == ["Packages", "libc6_2.36-9+deb12u14_amd64.deb", "pdsh_2.34-0.2_amd64.deb"]


def test_pack_of_a_missing_file_fails_and_leaves_no_bundle(repo, tmp_path):
    bundle = tmp_path / "pdsh-abc.tar"
    proc = _pack(bundle, repo, "perl-base_5.36.0-7+deb12u4_amd64.deb")
    assert proc.returncode != 0
    assert "perl-base_5.36.0-7+deb12u4_amd64.deb" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pdsh"]


def test_concurrent_packs_each_leave_a_complete_bundle(repo, tmp_path):
    # two site.yml runs from one controller pack the same bundle at once (the test labs do)
    bundle = tmp_path / "pdsh-abc.tar"
    files = ["pdsh_2.34-0.2_amd64.deb", "libc6_2.36-9+deb12u14_amd64.deb"]
    procs = [subprocess.Popen(["/bin/bash", str(PACK), str(bundle), str(repo), *files], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert out.split()[0] in ("packed", "kept")
    assert _members(bundle) == ["Packages", *sorted(files)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pdsh", "pdsh-abc.tar"]
