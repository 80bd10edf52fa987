"""Attention backends: numerical agreement, the flash guard and fallback, `auto`, and how a
backend is chosen (--attention flag > $SCDKIT_ATTENTION > registry > sdpa)."""

from __future__ import annotations

import sys
import types
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from scdkit.backends import choose_attention_backend, resolve_attention_backend, use_attention_backend
from scdkit.errors import BackendUnavailable, PluginError, RegistryError
from scdkit.nn.attention import (ENV_VAR, block_causal_mask, chunked_attention, eager_attention, flash_attention,
                                 sdpa_attention, set_attention_backend)
from scdkit.plugins.encoders.causal_transformer import CausalTransformerEncoder
from scdkit.registry import load_registry
from scdkit.testing import TINY_FRAME
from tests.test_registry import GOOD

ATOL = 1e-5
CPU32 = (torch.device("cpu"), torch.float32)


def qkv(nq: int, nk: int, batch: int = 2, heads: int = 3, dim: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, heads, n, dim, generator=g) for n in (nq, nk, nk))


def window_mask(q_frames: int, k_frames: int, tokens: int, q_offset: int, window: int):
    """Block-causal and at most ``window`` frames back: late queries have fully masked leading key blocks."""
    mask = block_causal_mask(q_frames, k_frames, tokens, q_offset)
    q_frame = torch.arange(q_frames).repeat_interleave(tokens) + q_offset
    k_frame = torch.arange(k_frames).repeat_interleave(tokens)
    return mask & (k_frame[None, :] > q_frame[:, None] - window)


MASKS = {
    "none": lambda: None,
    "block-causal": lambda: block_causal_mask(5, 5, 4),                   # 20 queries, 20 keys
    "block-causal-offset": lambda: block_causal_mask(2, 5, 4, q_offset=3),  # prefill of 2 frames after 3 cached
    "window": lambda: window_mask(5, 5, 4, q_offset=0, window=2),           # leading key chunks fully masked
}


@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("backend", [eager_attention] + [partial(chunked_attention, chunk_size=c) for c in (1, 3, 7, 16, 20, 64)],
                         ids=["eager"] + [f"chunked-{c}" for c in (1, 3, 7, 16, 20, 64)])
def test_backend_matches_sdpa(backend, mask_name):
    mask = MASKS[mask_name]()
    nq, nk = (20, 20) if mask is None else mask.shape
    q, k, v = qkv(nq, nk)
    torch.testing.assert_close(backend(q, k, v, mask), sdpa_attention(q, k, v, mask), atol=ATOL, rtol=0)


def test_chunked_with_every_query_masked_out_of_the_first_chunks():
    q, k, v = qkv(6, 40)
    mask = torch.zeros(6, 40, dtype=torch.bool)
    mask[:, 25:] = True  # chunks of 8: the first three are fully masked for every query
    expected = sdpa_attention(q, k[:, :, 25:], v[:, :, 25:])
    torch.testing.assert_close(chunked_attention(q, k, v, mask, chunk_size=8), expected, atol=ATOL, rtol=0)


class LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.largest = max([self.largest] + [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)])
        return out


def test_chunked_never_builds_the_full_score_matrix():
    nq, nk, chunk = 64, 1 << 19, 1 << 12  # the full fp32 score matrix would be 128 MiB; a chunk's is 1 MiB
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, nq, 4, generator=g)
    k = torch.zeros(1, 1, nk, 4)  # equal scores: every query averages all values
    v = torch.randn(1, 1, nk, 4, generator=g)
    with LargestTensor() as probe:
        out = chunked_attention(q, k, v, chunk_size=chunk)
    assert probe.largest <= max(nq * chunk, nk * 4), f"an op produced {probe.largest} elements"
    torch.testing.assert_close(out, v.mean(dim=2, keepdim=True).expand_as(out), atol=1e-5, rtol=0)


# -- flash: guard, layout adapter, mask fallback (flash-attn itself cannot run here) -----------

@pytest.fixture
def fake_flash(monkeypatch):
    """A stand-in ``flash_attn`` module computing flash-attn's [b n h e] layout with SDPA; records its calls."""
    calls = []

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
        calls.append((q.shape, k.shape, causal))
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal)
        return out.transpose(1, 2)

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_func=flash_attn_func))
    return calls


def test_flash_adapts_the_layout(fake_flash):
    q, k, v = qkv(4, 12, heads=3)
    torch.testing.assert_close(flash_attention(q, k, v), sdpa_attention(q, k, v), atol=ATOL, rtol=0)
    assert fake_flash == [(torch.Size([2, 4, 3, 8]), torch.Size([2, 12, 3, 8]), False)]


def test_flash_falls_back_to_sdpa_for_a_block_causal_mask(fake_flash):
    mask = block_causal_mask(3, 3, 4)
    q, k, v = qkv(12, 12)
    torch.testing.assert_close(flash_attention(q, k, v, mask), sdpa_attention(q, k, v, mask), atol=ATOL, rtol=0)
    assert fake_flash == []  # token-causal flash would be wrong here: it must not be called


def test_explicit_flash_on_cpu_names_the_reasons_and_the_install_hint():
    with pytest.raises(BackendUnavailable) as err:
        resolve_attention_backend("flash", *CPU32)
    message = str(err.value)
    assert "\n" not in message
    assert "'flash'" in message and "needs a CUDA device (got cpu)" in message
    assert "needs fp16 or bf16 (got float32)" in message and "pip install 'scdkit[flash]'" in message


def test_flash_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # import raises ModuleNotFoundError(name="flash_attn")
    with pytest.raises(BackendUnavailable, match="flash-attn is not installed"):
        resolve_attention_backend("flash", torch.device("cuda"), torch.bfloat16)


@pytest.mark.parametrize("source, error", [
    ('raise OSError("libcudart.so.12: cannot open shared object file")',
     "OSError: libcudart.so.12: cannot open shared object file"),
    ("import flash_attn_2_cuda", "ModuleNotFoundError: No module named 'flash_attn_2_cuda'"),  # extension missing
])
def test_flash_installed_but_failing_to_import_is_reported_with_its_error(source, error, tmp_path, monkeypatch):
    package = tmp_path / "flash_attn"
    package.mkdir()
    (package / "__init__.py").write_text(source + "\n")
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(BackendUnavailable) as err:
        resolve_attention_backend("flash", torch.device("cuda"), torch.float16)
    assert f"flash-attn is installed but failed to import: {error}" in str(err.value)
    assert "needs" not in str(err.value)  # CUDA + fp16 were fine: the import is the only reason
    _, message = resolve_attention_backend("auto", torch.device("cuda"), torch.float16)
    assert "auto picked sdpa" in message and error in message


def test_flash_usable_when_importable_on_cuda_half(fake_flash):
    backend, message = resolve_attention_backend("flash", torch.device("cuda"), torch.bfloat16)
    assert backend.fn is flash_attention and message == "attention backend: flash"
    backend, message = resolve_attention_backend("auto", torch.device("cuda"), torch.float16)
    assert backend.name == "flash" and "auto picked flash" in message
    with pytest.raises(BackendUnavailable, match=r"needs fp16 or bf16 \(got float32\)"):
        resolve_attention_backend("flash", torch.device("cuda"), torch.float32)


def test_auto_on_cpu_picks_sdpa_and_says_why():
    backend, message = resolve_attention_backend("auto", *CPU32)
    assert backend.name == "sdpa"
    assert "auto picked sdpa for cpu/float32" in message and "flash skipped" in message and "needs a CUDA" in message


def test_unknown_backend_suggests_close_matches():
    with pytest.raises(PluginError, match=r"unknown attention backend 'chunkd'; did you mean 'chunked'"):
        resolve_attention_backend("chunkd", *CPU32)
    with pytest.raises(PluginError, match="did you mean 'auto'"):
        resolve_attention_backend("autp", *CPU32)


# -- a whole encoder under each backend -------------------------------------------------------

def tiny_encoder() -> CausalTransformerEncoder:
    encoder = CausalTransformerEncoder(CausalTransformerEncoder.example_config(), TINY_FRAME).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # adaLN-Zero starts with every attention branch gated off: open them
        for p in encoder.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return encoder


def run_paths(encoder, patches):
    """(full forward, one frame per step, a 2-frame step then 1-frame steps)."""
    full = encoder(patches)
    state = encoder.new_state(patches.shape[0], patches.shape[1])
    single = torch.cat([encoder.step(state, patches[:, i:i + 1])[0] for i in range(patches.shape[1])], dim=1)
    state = encoder.new_state(patches.shape[0], patches.shape[1])
    mixed = torch.cat([encoder.step(state, patches[:, :2])[0]]
                      + [encoder.step(state, patches[:, i:i + 1])[0] for i in range(2, patches.shape[1])], dim=1)
    return full, single, mixed


@pytest.mark.parametrize("name", ["eager", "chunked", "flash"])
@torch.no_grad()
def test_encoder_outputs_are_equal_under_every_backend(name, fake_flash):
    encoder = tiny_encoder()
    patches = torch.randn(2, 4, TINY_FRAME.tokens, TINY_FRAME.patch_dim)
    reference = run_paths(encoder, patches)
    if name == "flash":  # the fake flash-attn runs on CPU; set the function directly (resolution would refuse CPU)
        set_attention_backend(encoder, flash_attention)
    elif name == "chunked":  # blocks smaller than the 64 keys, so the online-softmax merge is exercised
        assert use_attention_backend(encoder, name) == f"attention backend: {name}"
        set_attention_backend(encoder, partial(chunked_attention, chunk_size=16))
    else:
        assert use_attention_backend(encoder, name) == f"attention backend: {name}"
    for ref, out, path in zip(reference, run_paths(encoder, patches), ("full", "single-frame steps", "mixed steps")):
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=0, msg=lambda m, path=path: f"{name}, {path}: {m}")
    if name == "flash":  # one unmasked call per layer per single-frame step (4 + 2 of them), masked ones fell back
        assert len(fake_flash) == encoder.config.layers * 6


@torch.no_grad()
def test_encoder_equality_has_teeth():
    """The comparison above would notice a backend that ignores the mask."""
    encoder = tiny_encoder()
    patches = torch.randn(1, 3, TINY_FRAME.tokens, TINY_FRAME.patch_dim)
    reference = encoder(patches)
    set_attention_backend(encoder, lambda q, k, v, mask=None: sdpa_attention(q, k, v))
    assert (encoder(patches) - reference).abs().max() > 1e-3


# -- choosing a backend: flag > environment > registry > default ------------------------------

def test_precedence(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert choose_attention_backend() == ("sdpa", "the default")
    assert choose_attention_backend(setting="eager")[0] == "eager"
    monkeypatch.setenv(ENV_VAR, "chunked")
    assert choose_attention_backend(setting="eager") == ("chunked", f"${ENV_VAR}")
    assert choose_attention_backend(flag="auto", setting="eager") == ("auto", "--attention")


REGISTRY = "[scdkit]\n{setting}\n" + GOOD  # GOOD's pipeline is "p"


def attends(pipeline):
    fns = {block.attend for m in pipeline.components.values() for block in m.modules() if hasattr(block, "attend")}
    assert len(fns) == 1
    return fns.pop()


def test_registry_env_and_flag_choose_the_backend_of_a_built_pipeline(tmp_path, monkeypatch):
    path = tmp_path / "registry.toml"
    path.write_text(REGISTRY.format(setting='attention = "eager"'))
    registry = load_registry(path)
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert attends(registry.build("p", load=False)) is eager_attention
    monkeypatch.setenv(ENV_VAR, "chunked")
    assert attends(registry.build("p", load=False)) is chunked_attention
    monkeypatch.setenv(ENV_VAR, "flash")  # unusable here, but the flag wins before it is ever resolved
    assert attends(registry.build("p", load=False, attention="sdpa")) is sdpa_attention
    with pytest.raises(BackendUnavailable, match=r"needs a CUDA device.*\(requested by \$SCDKIT_ATTENTION\)"):
        registry.build("p", load=False)

    monkeypatch.delenv(ENV_VAR)
    pipeline = registry.build("p", load=False)
    message = use_attention_backend(pipeline, "auto", source="--attention")
    assert attends(pipeline) is sdpa_attention and message.startswith("attention backend: auto picked sdpa")
    # the backend is never part of the weights: switching changes no state_dict key or value
    before = {k: v.clone() for k, v in pipeline.components["encoder"].state_dict().items()}
    use_attention_backend(pipeline, "chunked")
    after = pipeline.components["encoder"].state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_registry_rejects_an_unknown_backend_with_a_suggestion(tmp_path):
    path = tmp_path / "registry.toml"
    path.write_text(REGISTRY.format(setting='attention = "chunkd"'))
    with pytest.raises(RegistryError) as err:
        load_registry(path)
    assert any("[scdkit].attention: unknown attention backend 'chunkd'; did you mean 'chunked'" in p
               for p in err.value.problems)


def test_cli_attention_flag(tmp_path, monkeypatch, capsys):
    from scdkit.cli import main

    monkeypatch.delenv(ENV_VAR, raising=False)
    path = tmp_path / "registry.toml"
    path.write_text(REGISTRY.format(setting=""))
    gif = tmp_path / "out.gif"
    args = ["generate", "--registry", str(path), "--context", "1", "--frames", "1", "--clips", "1", "--steps", "1",
            "--gif", str(gif)]
    assert main([*args, "--attention", "flash"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "cannot run here" in err and "pip install 'scdkit[flash]'" in err
    assert not gif.exists()
    assert main([*args, "--attention", "eager"]) == 0
    assert "attention backend: eager" in capsys.readouterr().err  # status on stderr: --json output stays clean
    monkeypatch.setenv(ENV_VAR, "flash")  # unusable here; the flag must win before it is ever resolved
    assert main([*args, "--attention", "eager"]) == 0
    assert "attention backend: eager (from --attention)" in capsys.readouterr().err
