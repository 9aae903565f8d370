"""Every attention backend agrees with dense SDPA on packed layouts of all tasks and on random layouts."""

import random

import pytest
import torch

from lance_core.config import model_preset
from lance_core.model import AttentionLayout, TokenInputs, attention, build_model, packed_attention
from lance_core.model import lance as lance_module
from lance_core.model.attention import describe_backend, prepare_attention, resolve_backend
from lance_core.packing import pack_samples
from lance_core.synthetic import synthetic_mix


@pytest.fixture
def layout(tokenizer, tiny_cfg):
    samples = synthetic_mix(tokenizer, tiny_cfg, per_task=1)
    return AttentionLayout.from_batch(pack_samples(samples, tiny_cfg, pad_to=_padded_length(samples)))


def _padded_length(samples, block: int = 128) -> int:
    """A pack length that leaves padding and a partly filled last flex block."""
    return (sum(s.num_tokens for s in samples) // block + 1) * block + block // 2


def random_layout(seed: int, samples: int = 5) -> AttentionLayout:
    """Samples of 1-4 spans of random modes and lengths (1-40 tokens), so span and sample edges fall
    anywhere inside flex blocks and noise spans may be followed by other spans."""
    rng = random.Random(seed)
    sample, span, bidir, noise = [], [], [], []
    span_no = 0
    for index in range(samples):
        for _ in range(rng.randint(1, 4)):
            mode = rng.choice(("causal", "full", "noise"))
            size = rng.randint(1, 40)
            sample += [index] * size
            span += [span_no] * size
            bidir += [mode != "causal"] * size
            noise += [mode == "noise"] * size
            span_no += 1
    return AttentionLayout(torch.tensor(sample), torch.tensor(span), torch.tensor(bidir), torch.tensor(noise))


def _run(layout, backend, q, k, v, backward, block_size=128):
    backend, prepared = prepare_attention(layout, backend, block_size)
    out = packed_attention(q, k, v, layout, backend, prepared)
    if not backward:
        return out.detach(), None
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    return out.detach(), grads


def _qkv(n, grad):
    """GQA: 4 query heads share 2 key-value heads."""
    torch.manual_seed(0)
    return [torch.randn(h, n, 16, requires_grad=grad) for h in (4, 2, 2)]


def test_per_sample_matches_dense_forward_and_backward(layout):
    q, k, v = _qkv(len(layout), True)
    dense, dense_grads = _run(layout, "sdpa", q, k, v, True)
    ours, our_grads = _run(layout, "per_sample", q, k, v, True)
    assert torch.allclose(ours, dense, atol=1e-5)
    for a, b in zip(our_grads, dense_grads):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_sample_matches_dense_on_random_layouts(seed):
    layout = random_layout(seed)
    q, k, v = _qkv(len(layout), True)
    dense, dense_grads = _run(layout, "sdpa", q, k, v, True)
    ours, our_grads = _run(layout, "per_sample", q, k, v, True)
    assert torch.allclose(ours, dense, atol=1e-5)
    for a, b in zip(our_grads, dense_grads):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.slow
def test_flex_matches_dense_on_random_layout():
    """Block size 16: cheap to compile, and most sample and span edges fall inside a block."""
    backward = torch.cuda.is_available()  # torch's flex attention has no CPU backward
    layout = random_layout(seed=0, samples=8)
    q, k, v = _qkv(len(layout), backward)
    dense, dense_grads = _run(layout, "sdpa", q, k, v, backward)
    flex, flex_grads = _run(layout, "flex", q, k, v, backward, block_size=16)
    assert torch.allclose(flex, dense, atol=1e-5)
    for a, b in zip(flex_grads or [], dense_grads or []):
        assert torch.allclose(a, b, atol=5e-5)


@pytest.mark.slow
def test_flex_matches_dense(layout):
    backward = torch.cuda.is_available()  # torch's flex attention has no CPU backward
    q, k, v = _qkv(len(layout), backward)
    dense, dense_grads = _run(layout, "sdpa", q, k, v, backward)
    flex, flex_grads = _run(layout, "flex", q, k, v, backward)
    assert torch.allclose(flex, dense, atol=2e-5)
    for a, b in zip(flex_grads or [], dense_grads or []):
        assert torch.allclose(a, b, atol=5e-5)


@pytest.mark.slow
def test_model_outputs_agree_across_backends(tokenizer, tiny_cfg):
    samples = synthetic_mix(tokenizer, tiny_cfg, per_task=1)
    batch = pack_samples(samples, tiny_cfg, pad_to=_padded_length(samples))
    reference = build_model(model_preset("tiny", attention_backend="sdpa")).eval()
    real = batch.task_index >= 0
    with torch.no_grad():
        expected = reference.backbone(TokenInputs.from_batch(batch))[0][real]
    for backend in ("per_sample", "flex"):
        model = build_model(model_preset("tiny", attention_backend=backend)).eval()
        model.load_state_dict(reference.state_dict())
        with torch.no_grad():
            got = model.backbone(TokenInputs.from_batch(batch))[0][real]
        assert torch.allclose(got, expected, atol=1e-4), backend


CUDA, CPU = torch.device("cuda"), torch.device("cpu")


@pytest.fixture
def flash_installed(monkeypatch):
    """flash-attn importable (a stand-in: nothing runs it) and the backend log not yet written."""
    monkeypatch.setattr(attention, "flash_attn_func", lambda *args, **kwargs: None)
    monkeypatch.setattr(attention, "_announced", set())


def test_auto_picks_flash_only_for_half_precision_on_cuda(flash_installed):
    assert describe_backend("auto", CUDA, torch.bfloat16)[0] == "flash"
    assert describe_backend("auto", CUDA, torch.float16)[0] == "flash"
    backend, reason = describe_backend("auto", CUDA, torch.float32)
    assert backend == "flex" and "float32" in reason
    assert describe_backend("auto", CPU, torch.bfloat16)[0] == "per_sample"


def test_auto_without_flash_attn_picks_flex_on_cuda(monkeypatch):
    monkeypatch.setattr(attention, "flash_attn_func", None)
    backend, reason = describe_backend("auto", CUDA, torch.bfloat16)
    assert backend == "flex" and "not installed" in reason


def test_explicit_flash_that_cannot_run_is_a_clear_error(flash_installed, monkeypatch):
    assert describe_backend("flash", CUDA, torch.bfloat16) == ("flash", "requested")
    with pytest.raises(RuntimeError, match=r"float16/bfloat16 only.*float32.*attention_backend: flex"):
        resolve_backend("flash", CUDA, torch.float32)
    with pytest.raises(RuntimeError, match=r"needs a CUDA device.*runs on cpu.*per_sample"):
        resolve_backend("flash", CPU, torch.bfloat16)
    monkeypatch.setattr(attention, "flash_attn_func", None)
    with pytest.raises(RuntimeError, match=r"flash-attn package"):
        resolve_backend("flash", CUDA, torch.bfloat16)


def test_backend_choice_is_logged_once_per_setting(flash_installed, lance_log):
    for _ in range(3):
        assert resolve_backend("auto", CUDA, torch.float32) == "flex"
    assert resolve_backend("auto", CUDA, torch.bfloat16) == "flash"
    lines = lance_log.getvalue().splitlines()
    assert len(lines) == 2
    assert "attention backend flex (attention_backend=auto, cuda, float32)" in lines[0]
    assert "attention backend flash (attention_backend=auto, cuda, bfloat16)" in lines[1]


def test_model_resolves_its_backend_for_the_hidden_dtype(monkeypatch, tokenizer, tiny_cfg):
    seen = []

    def record(name, device, dtype):
        seen.append((name, device.type, dtype))
        return resolve_backend(name, device, dtype)

    monkeypatch.setattr(lance_module, "resolve_backend", record)
    batch = pack_samples(synthetic_mix(tokenizer, tiny_cfg, per_task=1), tiny_cfg)
    model = build_model(model_preset("tiny"), dtype=torch.float64).eval()
    with torch.no_grad():
        model.backbone(TokenInputs.from_batch(batch, vae_values=batch.vae_latents.double()))
    assert seen == [("auto", "cpu", torch.float64)]
