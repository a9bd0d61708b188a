"""`deepport train-tiny`: train the embedded default model through deepport's own graph on cpu_ref (autograd).

DeepSeek-V3's recipe at toy scale: MLA, 1 dense + MoE layers with a shared expert, sigmoid routing with the
auxiliary-loss-free bias update (e_score_correction_bias nudged by +-gamma against each expert's load after
every step), and the MTP loss (weight lambda) on the t+2 target. Corpus: the Python standard library's own
sources (deepport/train_data.py). Writes an HF directory with FP8 weights + 128x128 block scales.
See docs/models/tiny.md for the recorded run.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from deepport.core.config import ModelArgs, preset
from deepport.core.errors import DeepportError

DEFAULT_OUT = Path(__file__).parent / "models" / "tiny" / "fp8"
# The shipped architecture: the "tiny" preset's widths with one dense and five MoE layers (every GEMM K a
# multiple of 128, so every fp8 linear quantises in whole 128x128 blocks along K). Six main layers keep the
# one-block MTP module cheap next to a main forward, which is what speculative decoding's speed-up needs.
TINY_TRAINED = replace(preset("tiny"), n_layers=6, n_dense_layers=1)
MICRO = replace(preset("tiny"), n_layers=2, n_dense_layers=1, n_routed_experts=8, n_activated_experts=2,
                n_expert_groups=2, n_limited_groups=1, moe_inter_dim=128)


def build(args: ModelArgs, seed: int):
    """A trainable fp32 Transformer bound to cpu_ref, initialised from `seed`; gate biases get no gradient."""
    from deepport.core import registry
    from deepport.core.model import Transformer

    table = registry.bind(registry.get_backend("cpu_ref"), fallback="error")
    t = Transformer(args, table, dtype=torch.float32, fp8=None, device="cpu")
    g = torch.Generator().manual_seed(seed)
    out_proj = (".wo.weight", ".w2.weight", ".w2")
    for name, p in t.named_parameters():
        if name.endswith("gate.bias"):
            p.data.zero_()
            continue
        if p.dim() == 1:
            p.data.fill_(1.0)
        else:
            std = 0.02 / math.sqrt(2 * (args.n_layers + 1)) if name.endswith(out_proj) else 0.02
            p.data.copy_(torch.randn(p.shape, generator=g) * std)
        p.requires_grad_(True)
    return t


def moe_layers(t) -> list:
    """Every MoE in the graph: the main layers' and the MTP block's."""
    from deepport.core.model import MoE

    return [m for m in t.modules() if isinstance(m, MoE)]


def expert_load(t) -> torch.Tensor:
    """Tokens routed to each expert in the last forward, [n_moe_layers, E] (float)."""
    n = t.args.n_routed_experts
    return torch.stack([torch.bincount(m.last_topk_ids.flatten(), minlength=n).float() for m in moe_layers(t)])


@torch.no_grad()
def update_bias(t, gamma: float) -> torch.Tensor:
    """Auxiliary-loss-free balancing: bias_i += gamma * sign(mean load - load_i); returns the loads used."""
    load = expert_load(t)
    for m, l in zip(moe_layers(t), load):
        m.gate.bias += gamma * torch.sign(l.mean() - l)
    return load


def losses(t, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Main next-token loss and MTP (t+2) loss for token windows x [B, S+1]."""
    h = t(x[:, :-1])  # h: [B, S, D] post-norm
    v = t.args.vocab_size
    main = F.cross_entropy(t.logits(h).reshape(-1, v), x[:, 1:].reshape(-1))
    u = t.mtp_forward(h[:, :-1], x[:, 1:-1])  # position i: h_i and t_{i+1} -> t_{i+2}
    mtp = F.cross_entropy(t.logits(u).reshape(-1, v), x[:, 2:].reshape(-1))
    return main, mtp


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of lr."""
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = (step - warmup) / max(steps - warmup, 1)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def _optimizer(t, lr: float, weight_decay: float):
    params = [p for p in t.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    keep = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95))


@torch.no_grad()
def evaluate(t, windows: torch.Tensor, batch: int = 8) -> dict:
    """Held-out main/MTP loss, perplexity and max/mean expert load per MoE layer."""
    main = mtp = 0.0
    n = 0
    load = None
    for i in range(0, len(windows), batch):
        x = windows[i:i + batch]
        a, b = losses(t, x)
        main += a.item() * len(x)
        mtp += b.item() * len(x)
        n += len(x)
        l = expert_load(t)
        load = l if load is None else load + l
    balance = (load.max(-1).values / load.mean(-1)).tolist()
    return {"loss": main / n, "perplexity": math.exp(main / n), "mtp_loss": mtp / n,
            "max_over_mean_load": [round(b, 3) for b in balance]}


def train(args: ModelArgs, steps: int, batch: int, seq_len: int, lr: float = 3e-3, warmup: int = 50,
          weight_decay: float = 0.1, mtp_lambda: float = 0.3, gamma: float = 0.005, seed: int = 0,
          max_minutes: float | None = None, log_every: int = 10, data=None, log=print, state_path=None,
          save_every: int = 100) -> tuple:
    """Train; returns (model, history). `data` is a deepport.train_data.Corpus (default: the stdlib corpus)."""
    from deepport import train_data, train_state

    torch.manual_seed(seed)
    corpus = data if data is not None else train_data.stdlib_corpus()
    t = build(args, seed)
    opt = _optimizer(t, lr, weight_decay)
    start, history = 0, {"steps": [], "args": {}}
    if state_path is not None and Path(state_path).is_file():
        start, history = train_state.load(state_path, t, opt)  # safetensors + JSON: never unpickles
        log(f"resumed from {state_path} at step {start}")
    t.train()
    t0 = time.perf_counter() - history.get("seconds", 0.0)
    load_sum = None
    for step in range(start, steps):
        x = corpus.train_batch(step, batch, seq_len + 1, seed)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        main, mtp = losses(t, x)
        loss = main + mtp_lambda * mtp
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in t.parameters() if p.requires_grad], 1.0)
        opt.step()
        load = update_bias(t, gamma)
        load_sum = load if load_sum is None else load_sum + load
        done = step + 1
        if done % log_every == 0 or done == steps:
            bal = (load_sum.max(-1).values / load_sum.mean(-1)).tolist()
            rec = {"step": done, "loss": round(main.item(), 4), "mtp_loss": round(mtp.item(), 4),
                   "lr": round(lr_at(step, steps, lr, warmup), 6), "max_over_mean_load": [round(b, 3) for b in bal],
                   "seconds": round(time.perf_counter() - t0, 1)}
            history["steps"].append(rec)
            load_sum = None
            log(json.dumps(rec))
        history["seconds"] = time.perf_counter() - t0
        if state_path is not None and (done % save_every == 0):
            train_state.save(state_path, t, opt, done, history)
        if max_minutes is not None and history["seconds"] > 60 * max_minutes and done < steps:
            log(f"stopping at step {done} of {steps}: --max-minutes {max_minutes} reached "
                f"(the shipped weights are then NOT those of the recorded command)")
            history["stopped_early_at"] = done
            break
    history["steps_done"] = history["steps"][-1]["step"] if history["steps"] else start
    t.eval()
    return t, history


def export(t, out: Path, tokenizer: Path, record: dict | None = None) -> Path:
    """Write the trained model as an HF DeepSeek-V3 directory: fp8 e4m3fn linears + weight_scale_inv, bf16 rest."""
    from deepport.core.checkpoint import hf_specs, save
    from deepport.core.config import to_hf_config
    from deepport.core.formats import E4M3FN, quantize_weight

    args = t.args
    params = dict(t.named_parameters())
    tensors = {}
    for name, spec in hf_specs(args).items():
        w = params[spec.target].detach()
        if spec.expert is not None:
            w = w[spec.expert]
        if name.endswith("e_score_correction_bias"):
            tensors[name] = w.float().contiguous()
        elif spec.fp8:
            tensors[name], tensors[name + "_scale_inv"] = quantize_weight(w.float(), E4M3FN)
        else:
            tensors[name] = w.to(torch.bfloat16).contiguous()
    cfg = to_hf_config(args, fp8=True)
    save(tensors, cfg, out, tokenizer=tokenizer)
    if record is not None:
        (out / "training.json").write_text(json.dumps(record, indent=1))
    return out


def cmd_train_tiny(a) -> int:
    from deepport import train_data
    from deepport.core import output_dir
    from deepport.models import TOKENIZER

    if a.micro and not a.evaluate and Path(a.output).resolve() == DEFAULT_OUT.resolve():
        raise DeepportError(f"--micro would overwrite the shipped model in {DEFAULT_OUT}; pass --output DIR")
    if not a.evaluate:  # refused before the run, not after it (the default is the shipped model: --force)
        output_dir.check(a.output, force=a.force, what="train-tiny --output")
    torch.set_num_threads(a.threads)
    args = MICRO if a.micro else TINY_TRAINED
    corpus = train_data.stdlib_corpus(TOKENIZER, heldout_every=a.heldout_every)
    print(f"# corpus: {corpus.describe()}", file=sys.stderr, flush=True)
    if a.evaluate:
        return _evaluate_checkpoint(a, corpus)
    state = Path(a.state) if a.state else None
    t, history = train(args, a.steps, a.batch, a.seq_len, lr=a.lr, warmup=a.warmup, mtp_lambda=a.mtp_lambda,
                       gamma=a.gamma, seed=a.seed, max_minutes=a.max_minutes, data=corpus, state_path=state,
                       log=lambda s: print(s, flush=True))
    heldout = evaluate(t, corpus.heldout_windows(a.eval_windows, a.seq_len + 1, a.seed))
    print(json.dumps({"heldout_fp32": heldout}), flush=True)
    n_params = sum(p.numel() for p in t.parameters())
    record = {"command": " ".join(["deepport", "train-tiny"] + sys.argv[2:]), "seed": a.seed,
              "python": sys.version.split()[0], "torch": torch.__version__, "corpus": corpus.describe(),
              "params": n_params, "config": asdict(args), "heldout_fp32": heldout,
              "final_train": history["steps"][-1] if history["steps"] else None,
              "steps_done": history["steps_done"], "wall_seconds": round(history["seconds"], 1),
              "history": history["steps"]}
    if history.get("stopped_early_at"):
        record["stopped_early_at"] = history["stopped_early_at"]
    with output_dir.staged_dir(a.output, force=a.force, what="train-tiny --output") as tmp:
        export(t, tmp, TOKENIZER, record)
    out = Path(a.output)
    print(f"wrote {out} ({n_params / 1e6:.2f}M parameters)", flush=True)
    return 0


def _evaluate_checkpoint(a, corpus) -> int:
    """Held-out numbers of a written checkpoint as deepport loads it (fp8 and bf16 on cpu_ref)."""
    import deepport

    windows = corpus.heldout_windows(a.eval_windows, a.seq_len + 1, a.seed)
    out = {}
    for dtype in ("fp8", "bf16"):
        m = deepport.load(a.evaluate, backend="cpu_ref", dtype=dtype)
        out[dtype] = evaluate(m.transformer, windows)
    print(json.dumps({"checkpoint": str(a.evaluate), "heldout": out}, indent=1))
    return 0


def register(sub) -> None:
    from deepport import cli_checks

    p = sub.add_parser("train-tiny", help="train the embedded tiny model on the stdlib sources (cpu_ref, autograd)")
    p.add_argument("--output", default=str(DEFAULT_OUT),
                   help="new or empty directory (default: the shipped model, which needs --force)")
    p.add_argument("--force", action="store_true",
                   help="replace a non-empty --output as a whole (old files removed, never merged)")
    p.add_argument("--steps", type=cli_checks.positive_int, default=1500, help="optimizer steps")
    p.add_argument("--batch", type=cli_checks.positive_int, default=8, help="token windows per step")
    p.add_argument("--seq-len", type=cli_checks.positive_int, default=128, help="tokens per window")
    p.add_argument("--lr", type=cli_checks.positive_float, default=3e-3, help="peak learning rate (AdamW)")
    p.add_argument("--warmup", type=cli_checks.non_negative_int, default=50, help="linear warm-up steps before the cosine decay")
    p.add_argument("--mtp-lambda", type=cli_checks.non_negative_float, default=0.3, help="weight of the MTP (t+2) loss")
    p.add_argument("--gamma", type=cli_checks.non_negative_float, default=0.005, help="bias update speed (aux-loss-free balancing)")
    p.add_argument("--seed", type=cli_checks.seed, default=0, help="initialisation and data-order seed")
    p.add_argument("--heldout-every", type=cli_checks.positive_int, default=20, help="every n-th stdlib file is held out")
    p.add_argument("--eval-windows", type=cli_checks.positive_int, default=64, help="held-out windows evaluated")
    p.add_argument("--threads", type=cli_checks.positive_int, default=1, help="torch threads (1 is fastest on a shared, oversubscribed machine)")
    p.add_argument("--max-minutes", type=cli_checks.positive_float, default=None, help="safety stop (then the weights differ)")
    p.add_argument("--state", default=None, help="checkpoint file for periodic saves and resuming")
    p.add_argument("--micro", action="store_true", help="a 2-layer micro config (smoke tests)")
    p.add_argument("--evaluate", default=None, metavar="DIR", help="only report held-out numbers of checkpoint DIR")
    p.set_defaults(fn=cmd_train_tiny)
