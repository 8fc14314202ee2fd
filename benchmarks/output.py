"""Where the benchmarks leave their results: one JSON file each, its folder created on the way."""

import json
import os


def write_json(result: dict, path: str) -> None:
    """Writes `result` to `path` (indented JSON) and says where."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")
