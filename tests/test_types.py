"""The typed core passes mypy at the level ``mypy.ini`` states (a type error there fails the suite)."""
import subprocess
import sys
from pathlib import Path

from conftest import import_or_missing

ROOT = Path(__file__).resolve().parents[1]


def test_the_typed_core_passes_mypy(tmp_path):
    import_or_missing("mypy", "mypy is not installed (make test installs it)")
    proc = subprocess.run([sys.executable, "-m", "mypy", "--config-file", "mypy.ini", "--cache-dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.startswith("Success"), proc.stdout[-5000:] + proc.stderr[-2000:]
