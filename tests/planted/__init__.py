"""Planted-fault backends, installed as a throwaway distribution so they reach deepport through the real
entry-point path (importlib.metadata -> pluggy -> registry.discover), in-process and in subprocesses."""
from pathlib import Path

HERE = Path(__file__).parent
DIST = "deepport_planted"


def install(site: Path) -> Path:
    """Write `site/deepport_planted.py` (a copy of faults.py) and its dist-info; put `site` on sys.path/PYTHONPATH."""
    site.mkdir(parents=True, exist_ok=True)
    (site / f"{DIST}.py").write_text((HERE / "faults.py").read_text())
    info = site / f"{DIST}-0.1.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {DIST}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[deepport]\nplanted = {DIST}\n")
    return site
