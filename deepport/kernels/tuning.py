"""Tuning data per backend and arch: lists of launch configs per op, read from a backend's tuning.json."""
from __future__ import annotations

import json
from pathlib import Path

from deepport.core import settings
from deepport.core.errors import ConfigError

LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "waves_per_eu", "matrix_instr_nonkdim", "kpack")


def split_config(config: dict) -> tuple[dict, dict]:
    """Split one config into (constexprs, launch options): UPPER keys are constexprs, the rest options."""
    unknown = [k for k in config if not k.isupper() and k not in LAUNCH_OPTIONS]
    if unknown:
        raise ConfigError(f"tuning config {config} has unknown keys {unknown}; constexprs are UPPER case, "
                          f"launch options are {', '.join(LAUNCH_OPTIONS)}")
    return ({k: v for k, v in config.items() if k.isupper()},
            {k: v for k, v in config.items() if not k.isupper()})


class Tuning:
    """Configs per op: the file's "default" section, overridden op by op by the section of the arch."""

    def __init__(self, table: dict, arch: str | None, source: str = "<dict>"):
        self.arch, self.source = arch, source
        self.ops: dict[str, list[dict]] = {k: list(v) for k, v in table.get("default", {}).items()}
        for section, ops in table.items():
            if section != "default" and arch and arch.startswith(section):
                self.ops.update({k: list(v) for k, v in ops.items()})
        for op, configs in self.ops.items():
            if not configs:
                raise ConfigError(f"{source}: op {op!r} has an empty config list; give at least one config")
            for c in configs:
                split_config(c)
                if arch and arch.startswith("gfx95") and c.get("kpack", 1) != 1:
                    raise ConfigError(f"{source}: {op} config {c} sets kpack={c['kpack']}, but gfx950 requires "
                                      f"kpack=1; remove it from the gfx950 section")

    @classmethod
    def load(cls, path: str | Path, arch: str | None) -> "Tuning":
        path = Path(path)
        try:
            table = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read tuning file {path}: {e}; fix or restore it") from e
        return cls(table, arch, str(path))

    def configs(self, op: str) -> list[dict]:
        """The candidate configs for `op`; under TRITON_INTERPRET=1 only the first, without hardware knobs."""
        configs = self.ops.get(op)
        if not configs:
            raise ConfigError(f"{self.source} has no configs for op {op!r} (arch {self.arch}); add a "
                              f"\"{op}\" list to its \"default\" section")
        if settings.triton_interpret():
            return [{k: v for k, v in configs[0].items() if k.isupper() or k == "num_warps"}]
        return configs
