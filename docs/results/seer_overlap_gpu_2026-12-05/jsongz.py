"""The one reader and writer of this folder's saved inputs (prompts.json.gz, train_ids.json.gz):
compact JSON, gzip level 9 without a timestamp (the same input gives the same bytes)."""
import gzip
import json
from pathlib import Path


def read(path) -> dict:
    """The JSON of ``path`` (gzipped when its name ends in .gz)."""
    raw = Path(path).read_bytes()
    return json.loads(gzip.decompress(raw) if str(path).endswith(".gz") else raw)


def write(path, obj) -> Path:
    """Write ``obj`` to ``path`` as gzipped compact JSON."""
    Path(path).write_bytes(gzip.compress((json.dumps(obj, separators=(",", ":")) + "\n").encode(), 9, mtime=0))
    return Path(path)
