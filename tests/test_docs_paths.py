"""Docs name repository-relative or placeholder paths only, never a folder of the machine
they were written on."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# An absolute folder of a machine (not a URL, not inside one).
MACHINE_PATH = re.compile(r"(?<![\w:/.])/(work|home|root|Users|tmp|mnt|srv)/[\w.-]+")


def test_docs_name_no_folder_of_a_machine():
    found = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for n, line in enumerate(doc.read_text().splitlines(), 1):
            if MACHINE_PATH.search(line):
                found.append(f"{doc.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not found, "\n".join(found)
