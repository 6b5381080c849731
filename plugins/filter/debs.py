"""Filters for installing .deb files that the controller downloaded (the pdsh role)."""


def deb_records(index):
    """The records of an apt Packages index (text), as {field: value} dicts (first lines only)."""
    records = []
    for block in str(index).split("\n\n"):
        fields = {}
        for line in block.splitlines():
            if line[:1] not in ("", " ", "\t") and ":" in line:
                name, _, value = line.partition(":")
                fields[name] = value.strip()
        if "Package" in fields:
            records.append(fields)
    return records


def installed_versions(lines):
    """{package: version} from dpkg-query lines "installed PACKAGE VERSION" (other states ignored;
    a multi-arch "PACKAGE:ARCH" counts as PACKAGE)."""
    versions = {}
    for line in lines or []:
        parts = str(line).split()
        if len(parts) == 3 and parts[0] == "installed":
            versions[parts[1].split(":")[0]] = parts[2]
    return versions


def debs_to_send(index, installed_lines):
    """Files of a flat repository's index that a node needs to be sent: every package it does not
    have at the index's version. apt on the node then takes from them what an install needs (a
    package held at another version is upgraded only where a dependency demands it), so sending
    a file the install turns out not to need is harmless, and leaving one out could make it fail.

    ``index | debs_to_send(installed_lines)`` -> sorted file names, relative to the repository.
    """
    have = installed_versions(installed_lines)
    files = set()
    for record in deb_records(index):
        if have.get(record["Package"]) != record.get("Version"):
            files.add(record["Filename"][2:] if record["Filename"].startswith("./") else record["Filename"])
    return sorted(files)


class FilterModule:
    def filters(self):
        return {"debs_to_send": debs_to_send}
