"""metrics.jsonl (one JSON object per logged step) and the progress display."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from hylas.train.checkpoint import atomic_write_text

log = logging.getLogger("hylas")


class MetricsFile:
    """Appends one JSON line per record and flushes it, so a crash loses nothing logged."""

    def __init__(self, path: Path, keep_until_step: int | None = None):
        self.path = path
        if keep_until_step is not None and path.exists():
            # Resuming: drop what an interrupted run logged after the checkpoint we restart from.
            kept = [
                line
                for line in path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= keep_until_step
            ]
            atomic_write_text(path, "".join(line + "\n" for line in kept))
        elif keep_until_step is None and path.exists():
            path.unlink()
        self.file = open(path, "a")  # noqa: SIM115  (closed in close())

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class Progress:
    """A tqdm bar on a terminal; plain log lines otherwise (CI logs, files)."""

    def __init__(self, total: int, initial: int):
        self.bar = None
        if sys.stderr.isatty():
            self.bar = tqdm(
                total=total, initial=initial, unit="step", dynamic_ncols=True, leave=True
            )

    def update(self, step: int, total: int, record: dict[str, Any] | None) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if record:
                self.bar.set_postfix_str(_describe(record), refresh=False)
        elif record:
            log.info("step %d/%d  %s", step, total, _describe(record))

    def write(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message)
        else:
            log.info("%s", message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _describe(r: dict[str, Any]) -> str:
    return f"loss {r['loss']:.4f}  lr {r['lr']:.2e}  {r['tokens_per_s']:,.0f} tok/s"
