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


def deb_files(index, planned_lines):
    """Files of a flat repository's index for the packages apt planned to install.

    planned_lines are "NAME VERSION" lines (what `apt-get install --simulate` printed as
    "Inst NAME [OLD] (VERSION ...)" on the node, against this very index). A planned package that
    the index lacks means the plan and the index disagree: that is an error, not a smaller install.

    ``index | deb_files(planned_lines)`` -> sorted file names, relative to the repository.
    """
    files = {}
    for record in deb_records(index):
        name = record["Filename"]
        files[(record["Package"], record.get("Version"))] = name[2:] if name.startswith("./") else name
    chosen = set()
    for line in planned_lines or []:
        parts = str(line).split()
        if not parts:
            continue
        if len(parts) != 2:
            raise ValueError(f"deb_files: expected 'NAME VERSION', got {line!r}")
        name, version = parts[0].split(":")[0], parts[1]
        if (name, version) not in files:
            raise ValueError(f"deb_files: apt planned {name} {version}, which the controller's index does not hold")
        chosen.add(files[(name, version)])
    return sorted(chosen)


class FilterModule:
    def filters(self):
        return {"deb_files": deb_files}
