"""The trained embedded model (deepport/models/tiny/fp8) and the train-tiny recipe behind it."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import deepport
from deepport import models, train
from deepport.core.generate import generate
from deepport.core.speculative import generate_mtp
from deepport.train_data import Corpus

PROMPTS = ["import os\nimport sys\n\n\ndef main():\n", "class Node:\n    def __init__(self, value):\n",
           "    for key, value in sorted(items):\n"]
# Held-out style Python, written for this test (not in the training corpus verbatim).
SNIPPET = '''def read_lines(path):
    """Return the lines of a file without trailing newlines."""
    result = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            result.append(line.rstrip("\\n"))
    return result


class Counter:
    def __init__(self):
        self.count = 0

    def increment(self, n=1):
        self.count += n
        return self.count
'''

shipped = pytest.mark.skipif(models.trained_default() is None, reason="trained model not shipped (deepport train-tiny)")


def _pattern_corpus(seed=0) -> Corpus:
    """A learnable token stream: a seeded random period-23 pattern over a 64-token alphabet, repeated."""
    g = torch.Generator().manual_seed(seed)
    period = torch.randint(2, 64, (23,), generator=g)
    stream = period.repeat(400)
    return Corpus(stream[:8000], stream[8000:], 1, 1, "pattern")


def test_training_smoke_loss_falls_and_mtp_is_trained():
    torch.manual_seed(0)
    t, history = train.train(train.MICRO, 30, 4, 32, lr=3e-3, warmup=5, seed=0, log_every=5,
                             data=_pattern_corpus(), log=lambda s: None)
    first, last = history["steps"][0], history["steps"][-1]
    assert last["step"] == 30
    assert last["loss"] < first["loss"] - 1.0, (first, last)
    assert last["mtp_loss"] < first["mtp_loss"] - 1.0, (first, last)
    assert len(last["max_over_mean_load"]) == train.MICRO.n_layers - train.MICRO.n_dense_layers + 1  # + MTP's MoE


def test_resume_from_state_reproduces_the_uninterrupted_run(tmp_path):
    kw = dict(lr=3e-3, warmup=2, seed=0, log_every=1, data=_pattern_corpus(1), log=lambda s: None)
    _, straight = train.train(train.MICRO, 6, 2, 16, **kw)
    state = tmp_path / "state.pt"
    train.train(train.MICRO, 6, 2, 16, max_minutes=0, state_path=state, save_every=1, **kw)  # stops after step 1
    logs = []
    _, resumed = train.train(train.MICRO, 6, 2, 16, state_path=state, save_every=100, **{**kw, "log": logs.append})
    assert logs[0].endswith("at step 1")  # it did resume (a fresh run would give the same losses too)
    assert [r["loss"] for r in resumed["steps"]] == [r["loss"] for r in straight["steps"]]
    assert [r["mtp_loss"] for r in resumed["steps"]] == [r["mtp_loss"] for r in straight["steps"]]


def test_gradients_reach_every_trained_part():
    t = train.build(train.MICRO, seed=1)
    x = torch.randint(2, 1024, (2, 17), generator=torch.Generator().manual_seed(1))
    main, mtp = train.losses(t, x)
    (main + 0.3 * mtp).backward()
    for name in ("embed.weight", "layers.0.attn.wkv_b.weight", "layers.1.ffn.gate.weight",
                 "layers.1.ffn.experts.w1", "layers.1.ffn.shared_experts.w2.weight", "mtp.0.eh_proj.weight",
                 "mtp.0.block.ffn.experts.w2", "head.weight"):
        grad = dict(t.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert not dict(t.named_parameters())["layers.1.ffn.gate.bias"].requires_grad


def test_bias_update_moves_against_load():
    t = train.build(train.MICRO, seed=2)
    x = torch.randint(2, 1024, (4, 33), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        train.losses(t, x)
    before = [m.gate.bias.clone() for m in train.moe_layers(t)]
    load = train.update_bias(t, gamma=0.01)
    for b0, m, l in zip(before, train.moe_layers(t), load):
        delta = m.gate.bias - b0
        busy, idle = l.argmax(), l.argmin()
        assert l[busy] > l.mean() > l[idle]
        assert delta[busy] == pytest.approx(-0.01) and delta[idle] == pytest.approx(0.01)
        torch.testing.assert_close(delta, 0.01 * torch.sign(l.mean() - l))


def test_export_round_trip_matches_trained_weights(tmp_path):
    t = train.build(train.MICRO, seed=3)
    out = train.export(t, tmp_path / "m", models.TOKENIZER, {"seed": 3})
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["weight_block_size"] == [128, 128]
    x = torch.randint(2, 1024, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = t.logits(t(x))
    for dtype in ("fp8", "bf16"):
        got = deepport.load(out, backend="cpu_ref", dtype=dtype).logits(x)
        cos = torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0)
        assert cos > 0.99, (dtype, cos)


@shipped
def test_default_model_is_the_trained_one_and_small():
    d = models.resolve(None, fp8=True)
    assert d == models.TINY_DIR / "fp8"
    size = sum(f.stat().st_size for f in d.iterdir())
    assert size < 15e6, size
    record = json.loads((d / "training.json").read_text())
    assert record["heldout_fp32"]["perplexity"] == pytest.approx(math.exp(record["heldout_fp32"]["loss"]), rel=1e-6)
    assert "stopped_early_at" not in record


@shipped
@pytest.mark.parametrize("dtype", ["fp8", "bf16"])
def test_embedded_model_predicts_python(dtype):
    """Cross-entropy on unseen Python well below the uniform ln(1024) = 6.93 nats, for main and MTP heads."""
    m = deepport.load(None, backend="cpu_ref", dtype=dtype)
    ids = torch.tensor([m.encode(SNIPPET)])
    t = m.transformer
    with torch.no_grad():
        h = t(ids[:, :-1])
        main = torch.nn.functional.cross_entropy(t.logits(h)[0], ids[0, 1:])
        mtp = torch.nn.functional.cross_entropy(t.logits(t.mtp_forward(h[:, :-1], ids[:, 1:-1]))[0], ids[0, 2:])
    assert main < 3.0, main
    assert mtp < 4.0, mtp


@shipped
@pytest.mark.parametrize("dtype", ["fp8", "bf16"])
def test_embedded_greedy_speculative_equals_plain_and_rolls_back(dtype):
    m = deepport.load(None, backend="cpu_ref", dtype=dtype)
    t = m.transformer
    ids = [m.encode(p) for p in PROMPTS]
    plain = generate(t, ids, 24)
    spec = generate_mtp(t, ids, 24)
    assert spec.tokens == plain.tokens
    assert spec.stats["acceptance_rate"] > 0.3, spec.stats  # a trained head; an untrained one is near 0
    assert 0 < spec.stats["accepted"] < spec.stats["drafted"] or spec.stats["acceptance_rate"] == 1.0
    for r in range(len(ids)):
        # the speculative cache holds every committed token but the last; compare that common prefix
        n = min(plain.cache.lens[r], spec.cache.lens[r])
        assert n >= len(ids[r]) + 22
        for layer in range(t.args.n_layers):
            kv_a, pe_a = plain.cache.contents(layer, r)
            kv_b, pe_b = spec.cache.contents(layer, r)
            torch.testing.assert_close(kv_b[:n], kv_a[:n], rtol=2e-2, atol=2e-2)
            torch.testing.assert_close(pe_b[:n], pe_a[:n], rtol=2e-2, atol=2e-2)


@shipped
def test_cli_generate_without_model_uses_the_trained_model():
    prompt = "class Parser:\n    def parse(self, text):\n        "
    r = subprocess.run([sys.executable, "-m", "deepport", "generate", "--backend", "cpu_ref", "--dtype", "bf16",
                        "--prompt", prompt, "--max-new-tokens", "48", "--json"], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert Path(out["model"]) == models.TINY_DIR / "fp8"
    assert re.search(r"\n {4,}\S", out["text"]), out["text"]  # it keeps writing the indented method body


@shipped
def test_shipped_checkpoint_matches_transformers(tmp_path):
    """The shipped directory is a real DeepSeek-V3 checkpoint: transformers' own model gives the same logits."""
    transformers = pytest.importorskip("transformers")
    from deepport.core.checkpoint import convert

    d = convert(models.TINY_DIR / "fp8", tmp_path / "fp32", "fp32")  # transformers' fp8 path wants a GPU
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(d, torch_dtype=torch.float32).eval()
    ours = deepport.load(None, backend="cpu_ref", dtype="fp32")
    ids = torch.tensor([ours.encode(SNIPPET[:200])])
    with torch.no_grad():
        want = hf(ids).logits.float()
    got = ours.logits(ids)
    assert ((got - want).abs().max() / want.abs().max()) < 1e-4
