"""Hard-link torch, torchvision and the packages they require from one venv into a fresh one.

CI checks that the built wheel installs and runs in a fresh venv without extras. Unpacking torch's multi-GB
wheel there again takes minutes; linking the files already on disk takes seconds and changes nothing about
what the check proves: every package moai-sdk needs beyond torch's own closure is still installed by pip from
the wheel's metadata. Usage: python reuse_torch.py TARGET_SITE_PACKAGES  (run with the source venv's python).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from importlib import metadata
from pathlib import Path

ROOTS = ("torch", "torchvision")


def _parse(requirement: str) -> tuple[str, set[str], str]:
    """(name, extras, marker) of a requirement string such as ``cuda-toolkit[cufile]==13.0; sys_platform == 'linux'``."""
    spec, _, marker = requirement.partition(";")
    match = re.match(r"\s*([A-Za-z0-9_.-]+)\s*(?:\[([^\]]*)\])?", spec)
    name = match.group(1).lower().replace("_", "-")
    extras = {e.strip().lower() for e in (match.group(2) or "").split(",") if e.strip()}
    return name, extras, marker


def _wanted(marker: str, extras: set[str]) -> bool:
    """Whether a requirement applies here, given the extras asked for (``extra == "x"`` markers)."""
    asked = re.findall(r"extra\s*==\s*[\"']([^\"']+)[\"']", marker)
    if asked:
        return any(e.lower() in extras for e in asked)
    if not marker.strip():
        return True
    from packaging.markers import Marker

    return Marker(marker).evaluate({"extra": ""})


def closure(roots: tuple[str, ...]) -> list[metadata.Distribution]:
    """The installed distributions ``roots`` need, following the extras each requirement names."""
    seen: dict[str, metadata.Distribution] = {}
    todo: list[tuple[str, set[str]]] = [(r, set()) for r in roots]
    done: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, extras = todo.pop()
        if (name, frozenset(extras)) in done:
            continue
        done.add((name, frozenset(extras)))
        try:
            dist = seen.get(name) or metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an optional requirement that is not installed
        seen[name] = dist
        for req in dist.requires or []:
            dep, dep_extras, marker = _parse(req)
            if _wanted(marker, extras):
                todo.append((dep, dep_extras))
    return list(seen.values())


def main() -> int:
    target = Path(sys.argv[1])
    linked = 0
    for dist in closure(ROOTS):
        base = Path(dist.locate_file(""))
        for rel in dist.files or []:
            src = base / rel
            if ".." in rel.parts or not src.is_file():
                continue  # console scripts in bin/ and the like: not needed
            dst = target / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if dst.exists():
                continue
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)
            linked += 1
        print(f"reused {dist.metadata['Name']} {dist.version}")
    print(f"{linked} files linked into {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
