"""The launcher under an audit hook that records every open of a data file (for tests/test_data_scale.py).

    AUDIT_ROOT=DATA AUDIT_OUT=DIR python|torchrun open_audit.py [launcher arguments...]

Each rank writes ``DIR/rank<R>.json``: ``[path, read_for_a_step]`` per open of a file under
``AUDIT_ROOT`` with a data suffix, in order; ``read_for_a_step`` is true when the open happened
inside the loader's per-step read (``StepLoader._load``), i.e. not during start-up.
"""
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DATA_ROOT = os.path.realpath(os.environ["AUDIT_ROOT"])
SUFFIXES = (".jpg", ".jpeg", ".png", ".wav", ".flac")
LOADER = os.path.join("d2v2scale", "data", "loader.py")
records: list = []


def _in_step_read() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_name == "_load" and frame.f_code.co_filename.endswith(LOADER):
            return True
        frame = frame.f_back
    return False


def _hook(event: str, args: tuple) -> None:
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        try:
            path = os.fsdecode(args[0])
            inside = path.lower().endswith(SUFFIXES) and os.path.realpath(path).startswith(DATA_ROOT)
        except ValueError:  # not a path
            return
        if inside:
            records.append([path, _in_step_read()])


sys.addaudithook(_hook)
sys.path.insert(0, str(ROOT))

from d2v2scale.pretrain import main  # noqa: E402

if __name__ == "__main__":
    try:
        code = main(sys.argv[1:])
    finally:
        out = Path(os.environ["AUDIT_OUT"]) / f"rank{os.environ.get('RANK', '0')}.json"
        out.write_text(json.dumps(records))
    sys.exit(code)
