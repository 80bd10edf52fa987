"""The kit catches what it claims to: each mutant is a small, realistic bug in a built-in plugin (most of
them passed the kit before v2), and the named check rejects it with a message about the broken contract,
while the unmutated built-in passes the same check. Then `scdkit check`'s function on registries."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from scdkit import testing
from scdkit.check import check_component
from scdkit.errors import UsageError
from scdkit.interfaces import CondSpec, Conditioning, ConditioningSpec, expand_like
from scdkit.plugins.decoders.dit_frame import DiTFrameDecoder
from scdkit.plugins.encoders.causal_transformer import CausalTransformerEncoder
from scdkit.plugins.models.causal_dit import CausalDiT
from scdkit.plugins.schedulers.flow_match_euler import FlowMatchEuler
from scdkit.registry import load_registry
from tests.test_registry import GOOD

FRAME = testing.TINY_FRAME
COND = CondSpec(dim=24, tokens=FRAME.tokens)


def built(cls, config=None, *extra):
    module = cls(config or cls.example_config(), FRAME, *extra).eval()
    testing._randomise(module)
    return module


def named_check(checks: testing.Checks, prefix: str):
    [check] = [run for name, run in checks if name.startswith(prefix)]
    return check


# -- encoders ----------------------------------------------------------------------------------

class LateLeak(CausalTransformerEncoder):
    """From frame 6 on, frame k's output mixes in frame k+1's (a shifted index in a late-frame path)."""

    def forward(self, patches, conditioning=None):
        out = super().forward(patches, conditioning)
        return torch.cat([out[:, :6], out[:, 6:-1] + 0.1 * out[:, 7:], out[:, -1:]], dim=1) if out.shape[1] > 7 else out


class LateStepPositions(CausalTransformerEncoder):
    """step() reads positions from a table made for 7 frames: from frame 7 on it reuses the last one."""

    def run_blocks(self, patches, first_frame, mask, caches=None, conditioning=None):
        if caches is not None:
            first_frame = min(first_frame, 6)
        return super().run_blocks(patches, first_frame, mask, caches, conditioning)


class CacheOnSelf(CausalTransformerEncoder):
    """Keeps the streaming state on the encoder: a second new_state() takes over the first stream's."""

    def new_state(self, batch, max_frames):
        self.stream = super().new_state(batch, max_frames)
        return self.stream

    def step(self, state, patches, conditioning=None):
        return super().step(self.stream, patches, conditioning)


class ClassLevelCache(CausalTransformerEncoder):
    """Per-stream frame counts, but one class-level list of KV caches shared by every stream."""

    shared_caches: list = []

    def new_state(self, batch, max_frames):
        state = super().new_state(batch, max_frames)
        ClassLevelCache.shared_caches[:] = state.caches
        return state

    def step(self, state, patches, conditioning=None):
        state.caches = ClassLevelCache.shared_caches
        return super().step(state, patches, conditioning)


class BatchMeanEncoder(CausalTransformerEncoder):
    """Centres the tokens on the batch mean (a batch-norm that forgot its items are separate clips)."""

    def embed_frames(self, patches, conditioning):
        x = super().embed_frames(patches, conditioning)
        return x - 0.5 * x.mean(dim=0, keepdim=True)


class FirstItemActions(CausalTransformerEncoder):
    """Gives every clip the actions of clip 0."""

    def embed_frames(self, patches, conditioning):
        actions = conditioning.actions[:1].expand_as(conditioning.actions)
        return super().embed_frames(patches, Conditioning(conditioning.labels, actions))


class PlainTensorScale(CausalTransformerEncoder):
    """A learned output scale kept as a plain tensor attribute: not a parameter, so never saved."""

    def __init__(self, config, frame):
        super().__init__(config, frame)
        self.scale = 1 + 0.1 * torch.randn(config.width)

    def forward(self, patches, conditioning=None):
        return super().forward(patches, conditioning) * self.scale

    def step(self, state, patches, conditioning=None):
        out, state = super().step(state, patches, conditioning)
        return out * self.scale, state


ACTIONS = CausalTransformerEncoder.config_class(width=32, layers=2, heads=2, actions=3)


def test_late_causality_leak_is_caught():
    testing.check_encoder_causality(built(CausalTransformerEncoder), FRAME)
    with pytest.raises(AssertionError, match=r"changing frame 7 changed outputs of earlier frames \(first frame 6"):
        testing.check_encoder_causality(built(LateLeak), FRAME)
    with pytest.raises(AssertionError, match="cached step vs full forward .* frame 6 of 16 is the first to differ"):
        testing.check_encoder_cached_matches_full(built(LateLeak), FRAME)


def test_step_path_that_diverges_late_is_caught():
    testing.check_encoder_cached_matches_full(built(CausalTransformerEncoder), FRAME)
    testing.check_encoder_causality(built(LateStepPositions), FRAME)  # forward is fine: only streaming is off
    with pytest.raises(AssertionError, match="cached step vs full forward .* frame 7 of 16 is the first to differ"):
        testing.check_encoder_cached_matches_full(built(LateStepPositions), FRAME)


@pytest.mark.parametrize("mutant", [CacheOnSelf, ClassLevelCache])
def test_streams_sharing_state_are_caught(mutant):
    testing.check_encoder_streams_are_independent(built(CausalTransformerEncoder), FRAME)
    encoder = built(mutant)
    testing.check_encoder_cached_matches_full(encoder, FRAME)  # one stream at a time is fine
    with pytest.raises(AssertionError, match="stream (A|A or B) stepped in turn with another stream .* state must own"):
        testing.check_encoder_streams_are_independent(encoder, FRAME)


@pytest.mark.parametrize("mutant,config", [(BatchMeanEncoder, None), (FirstItemActions, ACTIONS)])
def test_encoders_mixing_batch_items_are_caught(mutant, config):
    testing.check_encoder_batch_independence(built(CausalTransformerEncoder, config), FRAME)
    encoder = built(mutant, config)
    testing.check_encoder_causality(encoder, FRAME, frames=5)
    with pytest.raises(AssertionError, match=r"\.forward mixes batch items: item [012] of a batch of 3"):
        testing.check_encoder_batch_independence(encoder, FRAME)


def test_encoder_step_mixing_batch_items_is_caught():
    class StepOnlyMean(CausalTransformerEncoder):
        def step(self, state, patches, conditioning=None):
            out, state = super().step(state, patches, conditioning)
            return out - 0.1 * out.mean(dim=0, keepdim=True), state

    with pytest.raises(AssertionError, match=r"\.step mixes batch items"):
        testing.check_encoder_batch_independence(built(StepOnlyMean), FRAME)


def test_state_lost_on_save_and_load_is_caught():
    round_trip = named_check(testing.encoder_checks(CausalTransformerEncoder), "save/load")
    round_trip()
    with pytest.raises(AssertionError, match="outputs after save and load differ .* plain tensor attribute"):
        named_check(testing.encoder_checks(PlainTensorScale), "save/load")()


# -- decoders ----------------------------------------------------------------------------------

class FirstTokenOnly(DiTFrameDecoder):
    """Reads only the first conditioning token (as if the encoder emitted one summary token)."""

    def condition(self, cond):
        return super().condition(cond[:, :1].expand_as(cond))


class FirstItemLabels(DiTFrameDecoder):
    def time_terms(self, t, conditioning=None):
        labels = conditioning.labels[:1].expand_as(conditioning.labels)
        return super().time_terms(t, Conditioning(labels, conditioning.actions))


class FirstItemTime(DiTFrameDecoder):
    def time_terms(self, t, conditioning=None):
        return super().time_terms(t[:1].expand_as(t), conditioning)


class FirstItemCond(DiTFrameDecoder):
    def condition(self, cond):
        return super().condition(cond[:1].expand_as(cond))


class BatchMeanDecoder(DiTFrameDecoder):
    def forward(self, x_t, t, cond, conditioning=None):
        out = super().forward(x_t, t, cond, conditioning)
        return out + 0.1 * out.mean(dim=0, keepdim=True)


class RandomFeatures(DiTFrameDecoder):
    """A random input projection drawn at init and registered persistent=False to keep checkpoints small:
    a reloaded decoder draws another one."""

    def __init__(self, config, frame, cond):
        super().__init__(config, frame, cond)
        self.register_buffer("mix", torch.eye(frame.patch_dim) + 0.1 * torch.randn(frame.patch_dim, frame.patch_dim),
                             persistent=False)

    def forward(self, x_t, t, cond, conditioning=None):
        return super().forward(x_t @ self.mix, t, cond, conditioning)


LABELS = DiTFrameDecoder.config_class(width=32, layers=2, heads=2, classes=5)


def test_decoder_reading_one_conditioning_token_is_caught():
    testing.check_decoder_uses_every_cond_token(built(DiTFrameDecoder, None, COND), FRAME)
    decoder = built(FirstTokenOnly, None, COND)
    testing.check_decoder_shapes_and_conditioning(decoder, FRAME)  # changing every token at once is noticed
    with pytest.raises(AssertionError, match="decoder ignores conditioning token 1 of 16"):
        testing.check_decoder_uses_every_cond_token(decoder, FRAME)


@pytest.mark.parametrize("mutant,config", [(FirstItemLabels, LABELS), (FirstItemTime, None), (FirstItemCond, None),
                                           (BatchMeanDecoder, None)])
def test_decoders_mixing_batch_items_are_caught(mutant, config):
    testing.check_decoder_batch_independence(built(DiTFrameDecoder, config, COND), FRAME)
    with pytest.raises(AssertionError, match=f"{mutant.__name__} mixes batch items: item [012] of a batch of 3"):
        testing.check_decoder_batch_independence(built(mutant, config, COND), FRAME)


def test_decoder_state_lost_on_save_and_load_is_caught():
    named_check(testing.decoder_checks(DiTFrameDecoder), "save/load")()
    with pytest.raises(AssertionError, match="RandomFeatures: outputs after save and load differ"):
        named_check(testing.decoder_checks(RandomFeatures), "save/load")()


class ResetOnLoad(DiTFrameDecoder):
    """A calibrated input shift kept in a persistent buffer (zeros at init) that load_state_dict resets
    instead of restoring: only a calibrated, non-zero value shows it."""

    def __init__(self, config, frame, cond):
        super().__init__(config, frame, cond)
        self.register_buffer("shift", torch.zeros(frame.patch_dim))

    def forward(self, x_t, t, cond, conditioning=None):
        return super().forward(x_t + self.shift, t, cond, conditioning)

    def load_state_dict(self, state_dict, strict=True, assign=False):
        result = super().load_state_dict(state_dict, strict, assign)
        self.shift.zero_()
        return result


def test_persistent_buffers_are_randomised_before_saving():
    with pytest.raises(AssertionError, match="round trip changed shift"):
        named_check(testing.decoder_checks(ResetOnLoad), "save/load")()


# -- schedulers --------------------------------------------------------------------------------

class MeanTime(FlowMatchEuler):
    def add_noise(self, x0, noise, t):
        alpha, sigma = self.alpha_sigma(t.mean())
        return alpha * x0 + sigma * noise


class FirstTime(FlowMatchEuler):
    def add_noise(self, x0, noise, t):
        alpha, sigma = self.alpha_sigma(t.flatten()[0])
        return alpha * x0 + sigma * noise


class TimeAsRow(FlowMatchEuler):
    """Reshapes t as [1, b] before broadcasting: items' times land on the next axis."""

    def add_noise(self, x0, noise, t):
        alpha, sigma = (expand_like(s.reshape(1, -1), x0) for s in self.alpha_sigma(t))
        return alpha * x0 + sigma * noise


class ClipTimesOnly(FlowMatchEuler):
    """Written for t [b] and x0 [b n p] only: per-frame times [b f] broadcast over the patch axis."""

    def add_noise(self, x0, noise, t):
        alpha, sigma = self.alpha_sigma(t)
        return alpha[:, None, None] * x0 + sigma[:, None, None] * noise


class ClipMeanTime(FlowMatchEuler):
    """One noise level per clip: per-frame times [b f] are averaged over the frames."""

    def add_noise(self, x0, noise, t):
        return super().add_noise(x0, noise, t.mean(dim=1, keepdim=True).expand_as(t) if t.dim() > 1 else t)


class MeanLossWeight(FlowMatchEuler):
    """A min-SNR-style weight computed once for the batch, from the mean time."""

    def loss_weight(self, t):
        mean = t.mean()
        return ((1 - mean) / mean).sqrt().expand_as(t)


@pytest.mark.parametrize("mutant,function", [(MeanTime, "add_noise"), (FirstTime, "add_noise"),
                                             (TimeAsRow, "add_noise"), (ClipTimesOnly, "add_noise"),
                                             (ClipMeanTime, "add_noise"), (MeanLossWeight, "training_loss")])
def test_schedulers_broadcasting_times_wrongly_are_caught(mutant, function):
    testing.check_scheduler_per_item_times(FlowMatchEuler(FlowMatchEuler.example_config()))
    with pytest.raises(AssertionError, match=rf"{function} with per-(clip|frame) times .* differs from that item alone"):
        testing.check_scheduler_per_item_times(mutant(mutant.example_config()))


def test_scheduler_that_fails_on_per_frame_times_is_a_contract_failure():
    class Hardcoded3d(FlowMatchEuler):
        def add_noise(self, x0, noise, t):
            return (1 - t.view(-1, 1, 1)) * x0 + t.view(-1, 1, 1) * noise

    with pytest.raises(AssertionError, match=r"fails on per-frame times t \[b f\] with x0 \[b f n p\]: RuntimeError"):
        testing.check_scheduler_per_item_times(Hardcoded3d(Hardcoded3d.example_config()))


# -- monolithic models -------------------------------------------------------------------------

class LateLeakModel(CausalDiT):
    """From frame 6 on, the prediction of frame k mixes in noisy frame k+1."""

    def forward(self, clean, noisy, t):
        leaked = noisy.clone()
        leaked[:, 6:-1] += 0.1 * noisy[:, 7:]
        return super().forward(clean, leaked, t)


class StateOnSelfModel(CausalDiT):
    def new_state(self, batch, max_frames):
        self.stream = super().new_state(batch, max_frames)
        return self.stream

    def observe(self, state, patches):
        super().observe(self.stream, patches)

    def predict(self, state, x_t, t):
        return super().predict(self.stream, x_t, t)


class BatchMixing(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        y = self.inner(x)
        return y - 0.5 * y.mean(dim=0, keepdim=True)


class BatchMeanModel(CausalDiT):
    def __init__(self, config, frame):
        super().__init__(config, frame)
        self.embed = BatchMixing(self.embed)


def test_model_late_leak_is_caught():
    testing.check_model_causality(built(CausalDiT), FRAME)
    with pytest.raises(AssertionError, match=r"noisy frame 7 changed predictions of earlier frames \(first frame 6"):
        testing.check_model_causality(built(LateLeakModel), FRAME)


def test_model_streams_sharing_state_are_caught():
    testing.check_model_streams_are_independent(built(CausalDiT), FRAME)
    model = built(StateOnSelfModel)
    testing.check_model_cached_matches_full(model, FRAME)
    with pytest.raises(AssertionError, match="stream (A|A or B) used in turn with another stream"):
        testing.check_model_streams_are_independent(model, FRAME)


def test_model_mixing_batch_items_is_caught():
    testing.check_model_batch_independence(built(CausalDiT), FRAME)
    model = built(BatchMeanModel)
    testing.check_model_cached_matches_full(model, FRAME)
    with pytest.raises(AssertionError, match=r"BatchMeanModel\.forward mixes batch items"):
        testing.check_model_batch_independence(model, FRAME)


class ConditionedDiT(CausalDiT):
    """causal-dit with class labels on the noisy frames and actions on the clean ones, so the kit's model
    checks run their conditioning paths."""

    plugin_name = "conditioned-dit"

    def __init__(self, config, frame):
        super().__init__(config, frame)
        self.label = nn.Embedding(5, frame.patch_dim)
        self.action = nn.Linear(3, frame.patch_dim)

    @property
    def accepts(self):
        return ConditioningSpec(classes=5, actions=3)

    def forward(self, clean, noisy, t, conditioning=None):
        return super().forward(clean + self.action(conditioning.actions)[:, :, None],
                               noisy + self.label(conditioning.labels)[:, None, None], t)

    def observe(self, state, patches, conditioning=None):
        super().observe(state, patches + self.action(conditioning.actions)[:, :, None])

    def predict(self, state, x_t, t, conditioning=None):
        return super().predict(state, x_t + self.label(conditioning.labels)[:, None], t)


class FirstItemLabelsModel(ConditionedDiT):
    def forward(self, clean, noisy, t, conditioning=None):
        labels = conditioning.labels[:1].expand_as(conditioning.labels)
        return super().forward(clean, noisy, t, Conditioning(labels, conditioning.actions))


def test_model_conditioning_paths_are_checked():
    model = built(ConditionedDiT)
    testing.check_model_cached_matches_full(model, FRAME, frames=6)
    testing.check_model_causality(model, FRAME, frames=6)
    testing.check_model_batch_independence(model, FRAME)
    with pytest.raises(AssertionError, match=r"FirstItemLabelsModel\.forward mixes batch items: item 1"):
        testing.check_model_batch_independence(built(FirstItemLabelsModel), FRAME)


def test_long_clip_covers_twice_every_window():
    assert testing.long_clip(CausalTransformerEncoder.example_config()) == testing.LONG_CLIP
    from scdkit.plugins.encoders.flash_long_context import FlashLongContextConfig
    from scdkit.plugins.encoders.memory_efficient import MemoryEfficientConfig
    assert testing.long_clip(FlashLongContextConfig(width=32, heads=2, window=16, sinks=1)) == 36
    assert testing.long_clip(MemoryEfficientConfig(width=32, heads=2, recent_frames=4, compressed_frames=12)) == 34
    assert testing.spread(16, 4) == [0, 5, 10, 15] and testing.spread(5, 7) == [0, 1, 2, 3, 4]


# -- `scdkit check NAME`: the kit on a component as a registry configures it -------------------

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["causal-s", "dit-s", "flow"])
def test_check_passes_the_shipped_registry(name):
    results = check_component(load_registry(REPO / "registry.toml"), name)
    assert all(r.passed for r in results), [r for r in results if not r.passed]
    build = results[0]
    assert build.check == "build" and name in build.message
    if name != "flow":
        assert "for pipeline 'scd-digits', 32x32 patch 4" in build.message  # the configured frame, not the kit's


MUTANT_REGISTRY = GOOD.replace('"causal-transformer"', '"tests.test_conformance_mutants:BatchMeanEncoder"') \
    .replace('"dit-frame"', '"tests.test_conformance_mutants:FirstTokenOnly"')


def test_check_reports_a_broken_component_from_an_import_path(tmp_path):
    path = tmp_path / "registry.toml"
    path.write_text("[scdkit]\nallow_import_paths = true\n" + MUTANT_REGISTRY)
    registry = load_registry(path)
    results = {r.check: r for r in check_component(registry, "enc")}
    assert not results["batch items independent"].passed
    assert "BatchMeanEncoder.forward mixes batch items" in results["batch items independent"].message
    assert all(r.passed for name, r in results.items() if name != "batch items independent"), results
    results = {r.check: r for r in check_component(registry, "dec")}  # built for the encoder's contract
    assert [name for name, r in results.items() if not r.passed] == ["every conditioning token used"]
    assert "ignores conditioning token 1 of 16" in results["every conditioning token used"].message


def test_check_names_unknown_and_ambiguous_components(tmp_path):
    with pytest.raises(UsageError, match="no component 'causal-z'; did you mean 'causal-s'"):
        check_component(load_registry(REPO / "registry.toml"), "causal-z")
    path = tmp_path / "registry.toml"
    path.write_text(GOOD.replace("[decoders.dec]", "[decoders.enc]").replace('decoder = "dec"', 'decoder = "enc"'))
    registry = load_registry(path)
    with pytest.raises(UsageError, match="'enc' names 2 components; say which: encoders.enc, decoders.enc"):
        check_component(registry, "enc")
    assert check_component(registry, "decoders.enc")[0].message.startswith("decoders.enc (dit-frame) for pipeline 'p'")


def test_check_command_exits_1_on_a_broken_contract(tmp_path, capsys):
    from scdkit.cli import main

    path = tmp_path / "registry.toml"
    path.write_text("[scdkit]\nallow_import_paths = true\n" + MUTANT_REGISTRY)
    assert main(["check", "dec", "--registry", str(path), "--json"]) == 1
    failed = [r["check"] for r in json.loads(capsys.readouterr().out) if not r["passed"]]
    assert failed == ["every conditioning token used"]
    assert main(["check", "flow", "--registry", str(REPO / "registry.toml")]) == 0
    assert "FAIL" not in capsys.readouterr().out
