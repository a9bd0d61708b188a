"""Launch a kernel with caller-given configs: one config runs directly, several autotune (hardware only)."""
from __future__ import annotations

import json

import triton

from deepport.kernels.tuning import split_config

_autotuned: dict = {}


def _autotuner(kernel, configs: list[dict], key: tuple, do_bench):
    ident = (id(kernel), json.dumps(configs, sort_keys=True), key, do_bench)
    if ident not in _autotuned:
        cfgs = []
        for c in configs:
            constexprs, options = split_config(c)
            std = {k: options.pop(k) for k in ("num_warps", "num_stages", "num_ctas") if k in options}
            cfgs.append(triton.Config({**constexprs, **options}, **std))  # AMD knobs travel with the kwargs
        kw = {"do_bench": do_bench} if do_bench is not None else {}
        _autotuned[ident] = triton.autotune(cfgs, key=list(key), **kw)(kernel)
    return _autotuned[ident]


def launch(kernel, grid, configs: list[dict], args: dict, key: tuple = (), do_bench=None) -> None:
    """kernel[grid](**args) with the config's constexprs/options; grid is a callable of the chosen constexprs."""
    if len(configs) == 1:
        constexprs, options = split_config(configs[0])
        kernel[lambda meta: grid({**meta, **constexprs})](**args, **constexprs, **options)
    else:
        _autotuner(kernel, configs, tuple(key), do_bench)[grid](**args)
