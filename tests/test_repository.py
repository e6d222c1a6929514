"""The repository travels: no file in it names a path of one machine (a checkout, a scratch folder, a home)."""
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MACHINE_PATH = re.compile(r"(?<![\w.$])/(?:work|home|Users|root|mnt|scratch)/[\w.-]+")


def test_no_absolute_machine_paths():
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    found = []
    for name in filter(None, tracked.decode().split("\0")):
        path = ROOT / name
        if not path.is_file() or path.suffix in {".pt", ".png", ".pdf", ".mp4", ".jpg", ".gif", ".safetensors"}:
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        found += [f"{name}: {m.group(0)}" for m in MACHINE_PATH.finditer(text)]
    assert not found, "machine paths (use a path relative to the repository, or a named placeholder):\n" + "\n".join(found)
