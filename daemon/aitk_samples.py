"""ai-toolkit's own samples of a run, found beside it so the outbox can show them next to ours."""

from __future__ import annotations

import os
import re
from pathlib import Path

# ai-toolkit writes the extension as the config spells it (`format: JPG` -> `.JPG`).
_SAMPLE_FILE = re.compile(r"^(\d+)__(\d{9,})_(\d+)\.(jpg|jpeg|png|webp)$", re.IGNORECASE)


def find_samples(job_dir: Path) -> dict[tuple[int, int], Path]:
    """ai-toolkit's own samples `<job_dir>/samples/<ms>__<step:09d>_<index>.<ext>` by (step, index);
    where a step was sampled twice (resume, "sample now"), the newest set.

    Takes the run folder, not an AitkJob: samples appear after the checkpoint, so they are looked
    up when renders are written, from the job's recorded folder.
    """
    newest: dict[tuple[int, int], tuple[int, Path]] = {}
    try:
        # Regular files only: a link or FIFO planted there is no sample of ai-toolkit's.
        with os.scandir(Path(job_dir) / "samples") as entries:
            paths = [Path(e.path) for e in entries if e.is_file(follow_symlinks=False)]
    except OSError:
        return {}
    for path in paths:
        match = _SAMPLE_FILE.match(path.name)
        if match:
            key, ms = (int(match.group(2)), int(match.group(3))), int(match.group(1))
            if key not in newest or ms > newest[key][0]:
                newest[key] = (ms, path)
    return {key: path for key, (_ms, path) in newest.items()}
