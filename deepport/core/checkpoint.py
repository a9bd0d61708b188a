"""Hugging Face DeepSeek-V3 checkpoints: name map, memory-mapped shard-by-shard loading, fp8 handling, writing."""
from __future__ import annotations

import dataclasses
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from deepport.core import settings, weight_checks
from deepport.core.config import ModelArgs, from_hf_config
from deepport.core.errors import CheckpointError
from deepport.core.formats import (E4M3FN, Fp8Format, Fp8Weight, dequantize_weight, fn_to_fnuz, fp8_format,
                                   is_fp8, quantize_weight)


@dataclass(frozen=True)
class Spec:
    """One checkpoint tensor: its shape, whether it is an fp8-quantisable linear weight, and where it goes."""

    shape: tuple
    fp8: bool
    target: str  # module attribute path, e.g. "layers.3.attn.wq_b.weight"
    expert: int | None = None  # index into a stacked expert tensor


_ATTN = {"q_a_proj": "wq_a", "q_b_proj": "wq_b", "q_proj": "wq", "kv_a_proj_with_mqa": "wkv_a",
         "kv_b_proj": "wkv_b", "o_proj": "wo"}
_MLP = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def hf_specs(args: ModelArgs) -> dict[str, Spec]:
    """Every tensor a DeepSeek-V3 checkpoint for `args` must hold (weights only; scales are derived)."""
    a = args
    d, h = a.dim, a.n_heads
    specs = {
        "model.embed_tokens.weight": Spec((a.vocab_size, d), False, "embed.weight"),
        "model.norm.weight": Spec((d,), False, "norm.weight"),
        "lm_head.weight": Spec((a.vocab_size, d), False, "head.weight"),
    }
    for i in range(a.n_layers + a.n_mtp_layers):
        p = f"model.layers.{i}."
        t = f"layers.{i}." if i < a.n_layers else f"mtp.{i - a.n_layers}.block."
        linear = {
            "kv_a_proj_with_mqa": (a.kv_lora_rank + a.qk_rope_head_dim, d),
            "kv_b_proj": (h * (a.qk_nope_head_dim + a.v_head_dim), a.kv_lora_rank),
            "o_proj": (d, h * a.v_head_dim),
        }
        if a.q_lora_rank:
            linear["q_a_proj"] = (a.q_lora_rank, d)
            linear["q_b_proj"] = (h * a.qk_head_dim, a.q_lora_rank)
            specs[p + "self_attn.q_a_layernorm.weight"] = Spec((a.q_lora_rank,), False, t + "attn.q_norm.weight")
        else:
            linear["q_proj"] = (h * a.qk_head_dim, d)
        for name, shape in linear.items():
            specs[p + f"self_attn.{name}.weight"] = Spec(shape, True, t + f"attn.{_ATTN[name]}.weight")
        specs[p + "self_attn.kv_a_layernorm.weight"] = Spec((a.kv_lora_rank,), False, t + "attn.kv_norm.weight")
        specs[p + "input_layernorm.weight"] = Spec((d,), False, t + "attn_norm.weight")
        specs[p + "post_attention_layernorm.weight"] = Spec((d,), False, t + "ffn_norm.weight")

        def mlp(prefix, target, inter):
            for name, shape in (("gate_proj", (inter, d)), ("up_proj", (inter, d)), ("down_proj", (d, inter))):
                specs[prefix + f"{name}.weight"] = Spec(shape, True, target + f"{_MLP[name]}.weight")

        if i < a.n_dense_layers:
            mlp(p + "mlp.", t + "ffn.", a.inter_dim)
        else:
            specs[p + "mlp.gate.weight"] = Spec((a.n_routed_experts, d), False, t + "ffn.gate.weight")
            specs[p + "mlp.gate.e_score_correction_bias"] = Spec((a.n_routed_experts,), False, t + "ffn.gate.bias")
            mlp(p + "mlp.shared_experts.", t + "ffn.shared_experts.", a.n_shared_experts * a.moe_inter_dim)
            for e in range(a.n_routed_experts):
                for name, shape in (("gate_proj", (a.moe_inter_dim, d)), ("up_proj", (a.moe_inter_dim, d)),
                                    ("down_proj", (d, a.moe_inter_dim))):
                    specs[p + f"mlp.experts.{e}.{name}.weight"] = Spec(shape, True, t + f"ffn.experts.{_MLP[name]}", e)
        if i >= a.n_layers:
            m = f"mtp.{i - a.n_layers}."
            specs[p + "enorm.weight"] = Spec((d,), False, m + "enorm.weight")
            specs[p + "hnorm.weight"] = Spec((d,), False, m + "hnorm.weight")
            specs[p + "eh_proj.weight"] = Spec((d, 2 * d), False, m + "eh_proj.weight")
            specs[p + "shared_head.norm.weight"] = Spec((d,), False, m + "norm.weight")
    return specs


# Copies of shared tensors that real checkpoints store with the MTP layer; loaders reuse the main ones.
_SHARED_COPIES = re.compile(r"model\.layers\.\d+\.(embed_tokens|shared_head\.head)\.weight$")


def _unused(name: str, args: ModelArgs) -> bool:
    """Tensors a checkpoint may hold that deepport never loads: shared copies, extra MTP depths, rotary tables."""
    base = name.removesuffix("_scale_inv")
    if _SHARED_COPIES.search(base) or base.endswith("rotary_emb.inv_freq"):
        return True
    layer = re.match(r"model\.layers\.(\d+)\.", base)
    return bool(layer) and int(layer.group(1)) >= args.n_layers + args.n_mtp_layers


def _progress(i: int, n: int, what: str) -> None:
    """A bar on a terminal; one line per shard in logs (multi-shard checkpoints only)."""
    if not settings.progress_enabled():
        return
    if not sys.stderr.isatty():
        if n > 1 and i < n:
            print(f"loading {what}: shard {i + 1}/{n}", file=sys.stderr, flush=True)
        return
    width = 30
    done = int(width * i / max(n, 1))
    sys.stderr.write(f"\rloading {what} [{'#' * done}{'.' * (width - done)}] {i}/{n} shards")
    if i == n:
        sys.stderr.write("\n")
    sys.stderr.flush()


def read_config(path: Path) -> tuple[ModelArgs, dict]:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{path} has no config.json; point --model at a Hugging Face DeepSeek-V3 directory")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({e}); re-download it") from None
    return from_hf_config(cfg), cfg


def shard_files(path: Path) -> dict[str, list[str]]:
    """{shard file: [tensor names]} from model.safetensors.index.json, or every *.safetensors file."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is unreadable ({e}); re-download it") from None
        files: dict[str, list[str]] = {}
        for name, f in weight_map.items():
            weight_checks.check_shard_path(index, f)
            files.setdefault(f, []).append(name)
        for f in files:
            if not (path / f).is_file():
                raise CheckpointError(f"{path / f} is listed in the index but missing; download the full checkpoint")
        return dict(sorted(files.items()))
    found = sorted(path.glob("*.safetensors"))
    if not found:
        raise CheckpointError(f"{path} has no *.safetensors files; point --model at a checkpoint directory")
    return {f.name: None for f in found}


def iter_tensors(path: Path, what: str = "checkpoint", select=None):
    """Yield (name, tensor) over all shards, memory-mapped, one shard open at a time, with progress.

    `select(name, shape, dtype) -> region` reads part of a tensor (a rank's shard): None skips it, a tuple
    of slices reads only those bytes of the mapped file, () reads it whole.
    """
    files = shard_files(path)
    for i, (fname, names) in enumerate(files.items()):
        _progress(i, len(files), what)
        try:
            with safe_open(str(path / fname), framework="pt", device="cpu") as f:
                for name in (names if names is not None else f.keys()):
                    if select is None:
                        yield name, f.get_tensor(name)
                        continue
                    part = f.get_slice(name)
                    region = select(name, tuple(part.get_shape()), part.get_dtype())
                    if region is not None:
                        yield name, (part[region] if region else f.get_tensor(name))
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{path / fname} is corrupt or truncated ({type(e).__name__}: {e}); "
                                  f"re-download or re-convert that file") from None
    _progress(len(files), len(files), what)


def _fp8_pairs(path: Path, select=None, what: str = "checkpoint"):
    """Yield (name, tensor, scale_inv or None), pairing fp8 weights with their scales across shards."""
    pending_w, pending_s = {}, {}
    for name, t in iter_tensors(path, what, select=select):
        if name.endswith(".weight_scale_inv"):
            base = name[: -len("_scale_inv")]
            if base in pending_w:
                yield base, pending_w.pop(base), t
            else:
                pending_s[base] = t
        elif is_fp8(t):
            if name in pending_s:
                yield name, t, pending_s.pop(name)
            else:
                pending_w[name] = t
        else:
            yield name, t, None
    if pending_w:
        raise CheckpointError(f"fp8 tensor {next(iter(pending_w))} has no weight_scale_inv "
                              f"({len(pending_w)} such); the checkpoint is incomplete")
    if pending_s:
        raise CheckpointError(f"scale {next(iter(pending_s))}_scale_inv has no weight; the checkpoint is incomplete")


def load_into(model: torch.nn.Module, path: str | Path, dtype: torch.dtype, fp8: Fp8Format | None,
              device: torch.device, shard=None, check_weights: bool = True, keep_fp8_codes: bool = False) -> None:
    """Fill a meta-device Transformer from an HF checkpoint directory.

    fp8 weights stay fp8 when `fp8` is given (re-encoded to e4m3fnuz if that is the target format) or are
    dequantised to `dtype`; BF16 checkpoints are block-quantised at load when fp8 is requested.
    `shard` (parallel.ShardPlan) makes each rank read only its slices: `shard.region(name, spec, shape,
    dtype)` picks what to read (None: another rank's expert), `shard.place(name, value, scale, spec)`
    trims the read window and renumbers local experts. `check_weights` refuses NaN/inf weights and fp8 scales
    that are not positive and finite (core/weight_checks.py). `keep_fp8_codes` (fp8 weights dequantised to
    `dtype`): their e4m3fn codes and scales are kept too, as `param.fp8_codes` (an Fp8Weight of the same
    values) on the routed experts' stacked weights and on other weights of CODES_MIN_WEIGHTS or more, see
    attach_fp8_codes; and with `dtype` fp32, bf16 linear weights of CODES_MIN_WEIGHTS or more outside the routed
    experts (an FP8 checkpoint's lm_head; a BF16 checkpoint's large projections too) keep their bf16 values
    (`param.bf16_values`, see attach_bf16; RAM: 2 bytes a weight more).
    """
    path = Path(path)
    args = model.args
    specs = hf_specs(args)
    seen, skipped, shapes = set(), set(), {}
    stacked: dict[str, torch.Tensor] = {}

    def select(name, shape, dtype):
        shapes[name] = shape
        if name.removesuffix("_scale_inv") not in specs and _unused(name, args):
            return None  # never read (V3's layer-61 copies of the embedding and head are 1.85 GB each)
        if shard is None:
            return ()
        region = shard.region(name, specs.get(name.removesuffix("_scale_inv")), shape, dtype)
        if region is None:
            skipped.add(name)
        return region

    for name, t, scale in _fp8_pairs(path, select):
        spec = specs.get(name)
        if spec is None:
            raise CheckpointError(f"unexpected tensor {name} in {path}; the checkpoint does not match config.json")
        if shapes.get(name, tuple(t.shape)) != spec.shape:
            raise CheckpointError(f"tensor {name} has shape {shapes[name]}, expected {spec.shape} from config.json; "
                                  f"the checkpoint and its config disagree")
        if scale is not None and not spec.fp8:
            raise CheckpointError(f"tensor {name} is fp8 but deepport keeps it unquantised; convert it to bf16 first")
        if check_weights:
            weight_checks.check_tensor(name, t, scale)
        seen.add(name)
        value, value_scale = _convert(name, t, scale, spec, dtype, fp8)
        if shard is not None:
            value, value_scale, spec = shard.place(name, value, value_scale, spec)
        _assign(model, spec, value, value_scale, device, stacked, args)
        if keep_fp8_codes and fp8 is None and shard is None and scale is not None and t.dtype == torch.float8_e4m3fn:
            if spec.expert is None:
                if t.numel() >= CODES_MIN_WEIGHTS:
                    mod, attr = _resolve(model, spec.target)
                    attach_fp8_codes(getattr(mod, attr), Fp8Weight(t.to(device), scale.float().to(device)))
            else:  # stacked as the experts' weights are, attached once every expert is read
                _assign(model, dataclasses.replace(spec, target=spec.target + "#codes"), t, scale.float(), device,
                        stacked, args, store=False)
        elif keep_fp8_codes and shard is None and dtype == torch.float32 and t.dtype == torch.bfloat16 \
                and spec.expert is None and t.numel() >= CODES_MIN_WEIGHTS:  # a large bf16 linear weight (lm_head)
            mod, attr = _resolve(model, spec.target)
            if hasattr(mod, "in_features"):  # a Linear's (not the embedding table, read a row per token)
                attach_bf16(getattr(mod, attr), t.to(device))
    missing = [n for n in specs if n not in seen and n not in skipped]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {len(missing)} tensors, e.g. {', '.join(missing[:3])}; "
                              f"it is incomplete or was written for another config")
    for mod in model.modules():
        for pname, p in list(mod.named_parameters(recurse=False)):
            if p.is_meta:
                raise CheckpointError(f"parameter {pname} of {type(mod).__name__} was not loaded")
    for key in [k for k in stacked if k.endswith("#codes")]:
        mod, attr = _resolve(model, key.removesuffix("#codes"))
        attach_fp8_codes(getattr(mod, attr), Fp8Weight(stacked[key], stacked[key + "_scale_inv"]))


# a weight outside the experts keeps its codes from this size (1 MiB of fp32) up: smaller ones are read faster
# dequantised (cpu: a C call costs more than the bytes it saves; docs/performance.md, "Eighth session")
CODES_MIN_WEIGHTS = 1 << 18


def attach_fp8_codes(weight: torch.Tensor, codes: Fp8Weight) -> None:
    """Keep `codes` (the fp8 form of `weight`'s values) on `weight` for kernels that read fp8 codes; fp8_codes_of
    returns them only while `weight` has not been changed in place since. An inference tensor (made under
    torch.inference_mode) tracks no changes, so it keeps none: its readers use its own values."""
    _keep(weight, "fp8_codes", codes)


def fp8_codes_of(weight) -> Fp8Weight | None:
    """The Fp8Weight attached to `weight` by load_into(keep_fp8_codes=True), None if none or `weight` has changed."""
    return _kept(weight, "fp8_codes")


def attach_bf16(weight: torch.Tensor, values: torch.Tensor) -> None:
    """Keep `values` (bf16, exactly `weight`'s fp32 values) on `weight` for kernels that read bf16 (half the bytes);
    as attach_fp8_codes: bf16_of returns them only while `weight` has not been changed in place since."""
    _keep(weight, "bf16_values", values)


def bf16_of(weight) -> torch.Tensor | None:
    """The bf16 values attached to `weight` by load_into(keep_fp8_codes=True), None if none or `weight` has changed."""
    return _kept(weight, "bf16_values")


def _keep(weight, attr: str, value) -> None:
    if not weight.is_inference():
        setattr(weight, attr, (value, weight._version))


def _kept(weight, attr: str):
    kept = getattr(weight, attr, None)
    if kept is None or weight.is_inference() or kept[1] != weight._version:
        return None
    return kept[0]


def _convert(name, t, scale, spec, dtype, fp8):
    if name.endswith("e_score_correction_bias"):
        return t.float(), None
    if not spec.fp8:
        return t.to(dtype), None
    if fp8 is not None:
        if scale is None:
            codes, s = quantize_weight(t, fp8)
            return codes, s
        if t.dtype == fp8.dtype:
            return t, scale.float()
        if t.dtype == torch.float8_e4m3fn and fp8.name == "e4m3fnuz":
            return fn_to_fnuz(t, scale.float())
        raise CheckpointError(f"tensor {name} is {t.dtype}; cannot re-encode it as {fp8.name}")
    if scale is not None:
        return dequantize_weight(t, scale, 128, dtype), None
    return t.to(dtype), None


def _resolve(model, target: str):
    obj = model
    parts = target.split(".")
    for p in parts[:-1]:
        obj = getattr(obj, p)
    return obj, parts[-1]


def _assign(model, spec: Spec, value, scale, device, stacked, args, store: bool = True) -> None:
    """Set a loaded tensor on the model (stacked experts: into row spec.expert). store=False: only into
    `stacked` (keyed by spec.target), shaped as the model's tensor at spec.target minus its suffix after '#'."""
    if not store:
        mod, attr = _resolve(model, spec.target.partition("#")[0])
        n = getattr(mod, attr).shape[0]
        for key, v in ((spec.target, value), (spec.target + "_scale_inv", scale)):
            _stack_row(stacked, key, n, spec.expert, v, device)
        return
    mod, attr = _resolve(model, spec.target)
    if spec.expert is None:
        setattr(mod, attr, torch.nn.Parameter(value.to(device), requires_grad=False))
        if scale is not None:
            mod.scale_inv = torch.nn.Parameter(scale.to(device), requires_grad=False)
        return
    n = getattr(mod, attr).shape[0]  # this rank's experts (all of them without expert parallelism)
    for suffix, v in (("", value), ("_scale_inv", scale)):
        if v is None:
            continue
        key = spec.target + suffix
        if key not in stacked:
            setattr(mod, attr + suffix, torch.nn.Parameter(_stack_row(stacked, key, n, None, v, device),
                                                          requires_grad=False))
        _stack_row(stacked, key, n, spec.expert, v, device)


def _stack_row(stacked, key: str, n: int, row: int | None, v: torch.Tensor, device) -> torch.Tensor:
    """stacked[key] ([n, *v.shape], made on first use) with v written into `row` (None: nothing written)."""
    if key not in stacked:
        stacked[key] = torch.empty((n, *v.shape), dtype=v.dtype, device=device)
    if row is not None:
        stacked[key][row] = v.to(device)
    return stacked[key]


def save(tensors: dict[str, torch.Tensor], config: dict, out: str | Path, max_shard_bytes: int = 2 << 30,
         tokenizer: str | Path | None = None) -> Path:
    """Write an HF-format directory: config.json, model.safetensors (or shards + index), tokenizer.json."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shards, cur, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if cur and size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[name] = t.contiguous()
        size += nbytes
    shards.append(cur)
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, sh in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(sh, str(out / fname), metadata={"format": "pt"})
            weight_map.update({n: fname for n in sh})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer is not None:
        (out / "tokenizer.json").write_bytes(Path(tokenizer).read_bytes())
    return out


def convert(src: str | Path, dst: str | Path, dtype: str, fp8_format_name: str = "e4m3fn", *, force: bool = False,
            **kw) -> Path:
    """Rewrite a checkpoint's dtype shard by shard into a new directory (deepport/core/convert.py)."""
    from deepport.core import convert as _convert_mod

    return _convert_mod.convert(src, dst, dtype, fp8_format_name, force=force, **kw)


def random_tensors(args: ModelArgs, seed: int, fp8: bool = False, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """Deterministic random weights under HF names (fp8: 128x128 block-quantised e4m3fn + weight_scale_inv)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, spec in hf_specs(args).items():
        if name.endswith("e_score_correction_bias"):
            out[name] = torch.randn(spec.shape, generator=g) * 0.05
            continue
        if len(spec.shape) == 1:
            w = 1.0 + 0.1 * torch.randn(spec.shape, generator=g)
        elif name.endswith("embed_tokens.weight"):
            w = torch.randn(spec.shape, generator=g)
        else:
            w = torch.randn(spec.shape, generator=g) * spec.shape[1] ** -0.5
        if fp8 and spec.fp8:
            codes, s = quantize_weight(w, E4M3FN)
            out[name], out[name + "_scale_inv"] = codes, s
        else:
            out[name] = w.to(dtype)
    return out
