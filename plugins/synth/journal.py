"""The synth stage's journal: one JSON line per finished unit, so a killed or stopped run resumes after the last
complete unit (no duplicate, no gap).

    {"unit": "p17", "rows": [...], "rejected": [{"reason": "verify: ...", "row": {...}}], "usage": {...}}

Lines are appended and flushed (and fsynced) as units finish; a line cut short by a kill is ignored on read,
and the next append starts on a fresh line, so that unit is simply made again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class Journal:
    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> list[dict[str, Any]]:
        """The complete records, in the order they were written; the first record of a unit wins (a unit is
        never journaled twice by one run, but a torn write followed by a retry could leave two)."""
        if not self.path.is_file():
            return []
        out: list[dict[str, Any]] = []
        seen: set[str] = set()
        with self.path.open(encoding="utf-8") as fh:
            for line in fh:
                if not line.endswith("\n"):
                    break  # the last line, cut by a kill: that unit is made again
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(rec, dict) or not isinstance(rec.get("unit"), str) or rec["unit"] in seen:
                    continue
                seen.add(rec["unit"])
                rec.setdefault("rows", [])
                rec.setdefault("rejected", [])
                rec.setdefault("usage", {})
                out.append(rec)
        return out

    def append(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(record, ensure_ascii=False, default=str) + "\n"
        with self.path.open("a+b") as fh:
            # A torn last line (a kill mid-write) would swallow this record's start: begin a fresh line.
            fh.seek(0, os.SEEK_END)
            if fh.tell() > 0:
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":
                    fh.write(b"\n")
            fh.write(line.encode("utf-8"))
            fh.flush()
            os.fsync(fh.fileno())
