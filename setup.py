"""Build hook (the metadata is in pyproject.toml): copies the top-level docs/ into the wheel as deepport/docs/.

Error messages and --help name files such as docs/robustness.md; from an installed wheel they are found
under `deepport --version`'s docs directory. Editable installs read the checkout's docs/ directly."""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


class BuildPyWithDocs(build_py):
    def run(self):
        super().run()
        docs = HERE / "docs"
        if getattr(self, "editable_mode", False) or not docs.is_dir():
            return
        target = Path(self.build_lib) / "deepport" / "docs"
        for src in sorted(docs.rglob("*.md")):
            dst = target / src.relative_to(docs)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)


setup(cmdclass={"build_py": BuildPyWithDocs})
