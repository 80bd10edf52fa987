"""The scheduler contract from a plugin author's side: schedulers a researcher would write (DDIM,
ancestral DDPM, a multistep solver) pass ``check_scheduler`` and run in a real pipeline, and the kit
rejects schedulers that break the contract. Then the built-in ``ddpm`` and ``ddim`` (``scdkit.diffusion``);
tests/test_diffusers_adapter.py compares them with diffusers."""

import pydantic
import pytest
import torch
from pydantic import PositiveFloat, PositiveInt

from scdkit.diffusion import DdpmConfig, alpha_bar, split, target
from scdkit.interfaces import ComponentConfig, NoiseScheduler, SamplingState
from scdkit.plugins.schedulers.ddim import DDIM as BuiltinDDIM
from scdkit.plugins.schedulers.ddim import DDIMConfig as BuiltinDDIMConfig
from scdkit.plugins.schedulers.ddpm import DDPM
from scdkit.plugins.schedulers.flow_match_euler import FlowMatchEuler, FlowMatchEulerConfig
from scdkit.registry import load_registry
from scdkit.testing import _randomise, check_scheduler, check_scheduler_seeded
from tests.test_registry import GOOD


class DDIMConfig(ComponentConfig):
    steps: PositiveInt = 4
    train_steps: PositiveInt = 1000
    beta_start: PositiveFloat = 1e-4
    beta_end: PositiveFloat = 0.02


class DDIM(NoiseScheduler):
    """Epsilon prediction on the linear-beta DDPM schedule, deterministic DDIM sampling (eta = 0).

    Timestep k in 0..T (0 clean, alpha_bar_k = prod_{i<=k} (1 - beta_i)) is decoder time k / T."""

    plugin_name = "test-ddim"
    config_class = DDIMConfig
    prediction_type = "epsilon"

    def __init__(self, config: DDIMConfig):
        super().__init__(config)
        betas = torch.linspace(config.beta_start, config.beta_end, config.train_steps, dtype=torch.float64)
        alpha_bar = torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - betas, 0)])
        self.table = torch.stack([alpha_bar.sqrt(), (1 - alpha_bar).sqrt()]).float()  # [2, T+1]: alpha, sigma

    @property
    def steps(self) -> int:
        return self.config.steps

    def alpha_sigma(self, t):
        """Linear interpolation between timesteps: exact at every k / T."""
        T = self.config.train_steps
        pos = t.float().clamp(0, 1) * T
        lo = pos.floor().clamp(max=T - 1)
        frac, lo = pos - lo, lo.long()
        table = self.table.to(t.device)
        alpha, sigma = table[:, lo] * (1 - frac) + table[:, lo + 1] * frac
        return alpha, sigma

    def sample_timesteps(self, shape, generator=None, device=None):
        T = self.config.train_steps
        return torch.randint(1, T + 1, shape, generator=generator, device=device) / T

    def training_target(self, x0, noise, t):
        return noise

    def begin(self, steps=None, device=None) -> SamplingState:
        steps, T = self.check_steps(steps, self.config.steps), self.config.train_steps
        if steps > T:
            raise ValueError(f"at most {T} sampling steps, got {steps}")
        return SamplingState([T * (steps - i) // steps / T for i in range(steps + 1)], torch.device(device or "cpu"))

    def _scales(self, state, x):
        (alpha, alpha_next), (sigma, sigma_next) = self.alpha_sigma(
            torch.tensor([state.t, state.t_next], device=x.device))
        return alpha, alpha_next, sigma, sigma_next

    def step(self, state, prediction, x, generator=None):
        alpha, alpha_next, sigma, sigma_next = self._scales(state, x)
        x0 = (x - sigma * prediction) / alpha
        state.index += 1
        return alpha_next * x0 + sigma_next * prediction


class AncestralDDPM(DDIM):
    """The same schedule, sampled from the DDPM posterior q(x_next | x_t, x0_hat) with fresh noise."""

    plugin_name = "test-ddpm-ancestral"

    def step(self, state, prediction, x, generator=None):
        alpha, alpha_next, sigma, sigma_next = self._scales(state, x)
        x0 = (x - sigma * prediction) / alpha
        ratio = alpha / alpha_next                   # sqrt(alpha_bar_t / alpha_bar_next)
        beta = 1 - ratio**2                          # the beta of the (possibly skipped) step
        mean = (alpha_next * beta * x0 + ratio * sigma_next**2 * x) / sigma**2
        state.index += 1
        if state.index == state.steps:               # no noise at the final step
            return mean
        std = (beta * sigma_next**2 / sigma**2).sqrt()
        return mean + std * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


class AdamsBashforth2(FlowMatchEuler):
    """Second-order Adams-Bashforth (variable step) on the flow-matching velocity; the previous
    velocity lives in ``state.history``, the first step is Euler."""

    plugin_name = "test-flow-ab2"

    def step(self, state, prediction, x, generator=None):
        h, velocity = state.t_next - state.t, prediction
        if state.history:
            r = h / (state.t - state.times[state.index - 1])
            velocity = (1 + r / 2) * prediction - r / 2 * state.history[-1]
        state.history[:] = [prediction]
        state.index += 1
        return x + h * velocity


class LaxBegin(FlowMatchEuler):
    """Broken: begin(0) silently samples with the default step count."""

    def begin(self, steps=None, device=None):
        return super().begin(steps or self.config.steps, device)


class Backwards(FlowMatchEuler):
    """Broken: sampling times run from clean to noise."""

    def begin(self, steps=None, device=None):
        state = super().begin(steps, device)
        state.times.reverse()
        return state


@pytest.fixture
def tiny(tmp_path):
    """The small SCD pipeline of the registry tests, with random weights so outputs depend on inputs."""
    path = tmp_path / "registry.toml"
    path.write_text(GOOD)
    pipeline = load_registry(path).build("p", load=False)
    _randomise(pipeline, seed=0)
    return pipeline


def sample(scheduler, model, x, state, generator=None):
    for _ in range(state.steps):
        x = scheduler.step(state, model(x, state.t), x, generator)
    return x


# -- DDIM ------------------------------------------------------------------------------------------

def test_ddim_passes_the_kit():
    check_scheduler(DDIM)


def test_ddim_times_are_timesteps_over_train_steps_and_exact():
    ddim = DDIM(DDIMConfig())
    assert ddim.begin(4).times == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert ddim.begin(3).times == [1.0, 0.666, 0.333, 0.0]
    assert ddim.begin(1).times == [1.0, 0.0]
    with pytest.raises(ValueError):
        ddim.begin(1001)
    alpha_bar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    times = ddim.begin(7).times
    alpha, sigma = ddim.alpha_sigma(torch.tensor(times))
    k = [round(t * 1000) for t in times[:-1]]
    torch.testing.assert_close(alpha[:-1].double(), alpha_bar[[i - 1 for i in k]].sqrt(), rtol=1e-6, atol=0)
    torch.testing.assert_close(sigma[:-1].double(), (1 - alpha_bar[[i - 1 for i in k]]).sqrt(), rtol=1e-6, atol=0)
    assert (alpha[-1].item(), sigma[-1].item()) == (1.0, 0.0)  # the clean end
    # times on another device and of any shape (the loss noises the context with times [b f])
    alpha, sigma = ddim.alpha_sigma(torch.rand(2, 3, device="meta"))
    assert alpha.device.type == sigma.device.type == "meta" and alpha.shape == sigma.shape == (2, 3)


def test_ddim_trains_and_generates_in_a_pipeline(tiny, monkeypatch):
    tiny.scheduler = DDIM(DDIMConfig(steps=3))
    loss = tiny.loss(torch.rand(2, 3, 1, 8, 8))
    assert torch.isfinite(loss) and loss > 0
    seen, predict = [], tiny.model.predict
    monkeypatch.setattr(tiny.model, "predict", lambda state, x, t: seen.append(t) or predict(state, x, t))
    video = tiny.generate(torch.rand(1, 2, 1, 8, 8), 2, generator=torch.Generator().manual_seed(0)).video
    assert video.shape == (1, 2, 1, 8, 8) and bool(torch.isfinite(video).all())
    assert seen == [1.0, 0.666, 0.333] * 2  # the decoder is handed timestep / train_steps


# -- ancestral DDPM --------------------------------------------------------------------------------

def test_ancestral_passes_the_kit():
    check_scheduler(AncestralDDPM)


def test_ancestral_draws_noise_from_the_generator_but_not_at_the_last_step():
    scheduler = AncestralDDPM(DDIMConfig())
    x, eps = torch.randn(2, 16, 4), torch.randn(2, 16, 4)

    def one_step(seed, index):
        state = scheduler.begin(4)
        state.index = index
        g = torch.Generator().manual_seed(seed)
        out = scheduler.step(state, eps, x, g)
        return out, g.get_state()

    a, b, c = one_step(1, 0), one_step(1, 0), one_step(2, 0)
    assert torch.equal(a[0], b[0]) and not torch.allclose(a[0], c[0])
    last_1, last_2 = one_step(1, 3), one_step(2, 3)
    assert torch.equal(last_1[0], last_2[0])
    assert torch.equal(last_1[1], torch.Generator().manual_seed(1).get_state()), "the last step drew noise"


def test_ancestral_step_keeps_the_forward_marginal():
    """Given the true x0 and noise, one step lands on q(x_next | x0) = N(alpha_next·x0, sigma_next²),
    correlated with the current noise by the posterior's weight on x_t."""
    scheduler = AncestralDDPM(DDIMConfig())
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(200_000, generator=g), torch.randn(200_000, generator=g)
    for index in (0, 2):
        state = scheduler.begin(5)
        state.index = index
        (alpha, alpha_next), (sigma, sigma_next) = scheduler.alpha_sigma(torch.tensor([state.t, state.t_next]))
        x_next = scheduler.step(state, noise, alpha * x0 + sigma * noise, g)
        z = (x_next - alpha_next * x0) / sigma_next
        corr = torch.corrcoef(torch.stack([z, x0, noise]))[0]
        assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01 and abs(corr[1]) < 0.01, (index, z.mean(), z.std())
        assert abs(corr[2] - alpha / alpha_next * sigma_next / sigma) < 0.01, (index, corr[2])


def test_ancestral_seeds_in_a_pipeline(tiny):
    tiny.scheduler = AncestralDDPM(DDIMConfig())
    context = torch.rand(1, 2, 1, 8, 8)

    def run(seed):
        return tiny.generate(context, 2, generator=torch.Generator().manual_seed(seed)).video

    first, again, other = run(1), run(1), run(2)
    assert first.shape == (1, 2, 1, 8, 8)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


# -- a multistep solver ----------------------------------------------------------------------------

def test_multistep_passes_the_kit():
    check_scheduler(AdamsBashforth2)
    check_scheduler(AdamsBashforth2, FlowMatchEulerConfig(steps=6, shift=3.0))  # uneven steps


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_multistep_is_second_order(shift):
    """On dx/dt = x (x(0) = x(1)/e) halving the step divides the error by ~4, Euler's by ~2."""
    x1 = torch.ones(1, dtype=torch.float64)

    def error(cls, steps):
        scheduler = cls(FlowMatchEulerConfig(shift=shift))
        return (sample(scheduler, lambda x, t: x, x1, scheduler.begin(steps)) - x1 / torch.e).abs().item()

    ab_ratio = error(AdamsBashforth2, 16) / error(AdamsBashforth2, 32)
    euler_ratio = error(FlowMatchEuler, 16) / error(FlowMatchEuler, 32)
    assert 3.5 < ab_ratio < 4.5 and 1.5 < euler_ratio < 2.5, (ab_ratio, euler_ratio)
    assert error(AdamsBashforth2, 16) < error(FlowMatchEuler, 16) / 5


def test_multistep_is_exact_for_a_velocity_linear_in_time():
    """After its Euler start, variable-step AB2 integrates v = t exactly, on an uneven grid too."""
    scheduler = AdamsBashforth2(FlowMatchEulerConfig(shift=3.0))
    state = scheduler.begin(5)
    t1 = state.times[1]
    x = sample(scheduler, lambda x, t: torch.full_like(x, t), torch.zeros(1, dtype=torch.float64), state)
    assert abs(x.item() - ((t1 - 1) - t1**2 / 2)) < 1e-12  # Euler from 1 to t1, then the integral to 0


def test_multistep_runs_interleave():
    """All solver memory is in the state: two runs stepped alternately equal each run alone."""
    scheduler = AdamsBashforth2(FlowMatchEulerConfig(shift=3.0))

    def model(x, t):
        return torch.sin(3 * x) + t

    g = torch.Generator().manual_seed(0)
    xa, xb = torch.randn(2, 16, 4, generator=g), torch.randn(2, 16, 4, generator=g)
    alone_a = sample(scheduler, model, xa, scheduler.begin(6))
    alone_b = sample(scheduler, model, xb, scheduler.begin(6))
    sa, sb = scheduler.begin(6), scheduler.begin(6)
    for _ in range(6):
        xa = scheduler.step(sa, model(xa, sa.t), xa)
        xb = scheduler.step(sb, model(xb, sb.t), xb)
    assert torch.equal(xa, alone_a) and torch.equal(xb, alone_b)
    assert not torch.allclose(alone_a, alone_b)


# -- the kit rejects broken schedulers -------------------------------------------------------------

def test_kit_rejects_begin_zero_as_default():
    with pytest.raises(AssertionError, match=r"begin\(0\)"):
        check_scheduler(LaxBegin)


def test_kit_rejects_times_running_the_wrong_way():
    with pytest.raises(AssertionError, match="from noise to clean"):
        check_scheduler(Backwards)


class GlobalNoise(AncestralDDPM):
    """Broken: draws its noise from the global random state, not from the generator it is given."""

    def step(self, state, prediction, x, generator=None):
        return super().step(state, prediction, x, None)


def test_kit_rejects_noise_from_the_global_random_state():
    with pytest.raises(AssertionError, match="generator passed to step"):
        check_scheduler_seeded(GlobalNoise(DDIMConfig()))
    check_scheduler_seeded(AncestralDDPM(DDIMConfig()))


# -- the built-in ddpm and ddim --------------------------------------------------------------------

BUILTIN_CONFIGS = [(DDPM, DdpmConfig(prediction=p, betas=b)) for p in ("epsilon", "v") for b in ("linear", "cosine")] \
    + [(BuiltinDDIM, BuiltinDDIMConfig(prediction="v", betas="cosine", eta=eta)) for eta in (0.0, 0.5, 1.0)] \
    + [(BuiltinDDIM, BuiltinDDIMConfig(prediction="epsilon", betas="linear", train_timesteps=100, steps=100))]


@pytest.mark.parametrize("cls, config", BUILTIN_CONFIGS, ids=lambda v: getattr(v, "plugin_name", None) or repr(v))
def test_builtin_ddpm_family_passes_the_kit(cls, config):
    check_scheduler(cls, config)


def test_builtin_ddpm_family_times_are_trailing_timesteps_over_train_timesteps():
    assert DDPM(DdpmConfig()).begin(4).times == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert DDPM(DdpmConfig()).begin(3).times == [1.0, 0.667, 0.333, 0.0]  # round(1000·2/3) = 667
    assert BuiltinDDIM(BuiltinDDIMConfig(train_timesteps=10)).begin(10).times == [k / 10 for k in range(10, -1, -1)]
    with pytest.raises(ValueError, match="at most train_timesteps = 10"):
        BuiltinDDIM(BuiltinDDIMConfig(train_timesteps=10, steps=10)).begin(11)
    with pytest.raises(pydantic.ValidationError, match="at most train_timesteps = 10"):
        BuiltinDDIMConfig(train_timesteps=10, steps=11)


def test_beta_schedules():
    """linear: Ho et al.'s 1e-4..0.02 at T = 1000, scaled by 1000 / T; cosine: Nichol & Dhariwal's f(t) / f(0)."""
    linear = alpha_bar("linear", 1000)
    assert linear[0] == 1 and abs(linear[1] - (1 - 1e-4)) < 1e-12
    assert abs(linear[2] - (1 - 1e-4) * (1 - 1e-4 - 0.0199 / 999)) < 1e-12
    assert 0.3 < alpha_bar("linear", 100)[-1] / linear[-1] < 3  # T = 100 ends near the same noise
    cosine = alpha_bar("cosine", 1000)
    f = torch.cos((torch.arange(1001, dtype=torch.float64) / 1000 + 0.008) / 1.008 * torch.pi / 2) ** 2
    torch.testing.assert_close(cosine[:990], (f / f[0])[:990], rtol=1e-9, atol=0)
    betas = 1 - cosine[1:] / cosine[:-1]
    assert betas.max() <= 0.999 + 1e-12 and cosine[-1] > 0  # capped: never all noise


@pytest.mark.parametrize("prediction", ["epsilon", "v", "sample"])
def test_prediction_conversions_invert_the_training_target(prediction):
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 8, generator=g, dtype=torch.float64), torch.randn(3, 8, generator=g, dtype=torch.float64)
    for abar in (0.999, 0.5, 1e-4):
        alpha, sigma = abar**0.5, (1 - abar) ** 0.5
        x = alpha * x0 + sigma * noise
        trained = target(prediction, x0, noise, torch.tensor(alpha), torch.tensor(sigma))
        got = split(prediction, trained, x, alpha, sigma)
        torch.testing.assert_close(got[0], x0)
        torch.testing.assert_close(got[1], noise)
    v = target("v", x0, noise, torch.full((3,), 0.6, dtype=torch.float64), torch.full((3,), 0.8, dtype=torch.float64))
    torch.testing.assert_close(v, 0.6 * noise - 0.8 * x0)  # Salimans & Ho


def test_ddim_with_eta_one_is_ancestral_ddpm():
    """DDIM's eta = 1 has the DDPM posterior's mean and variance: one generator, the same samples."""
    x, w = torch.randn(2, 16, 4, generator=torch.Generator().manual_seed(0)), torch.randn(2, 16, 4)
    for prediction in ("epsilon", "v"):
        ddpm = DDPM(DdpmConfig(prediction=prediction, betas="cosine", steps=12))
        ddim = BuiltinDDIM(BuiltinDDIMConfig(prediction=prediction, betas="cosine", steps=12, eta=1.0))
        model = lambda x, t: 0.9 * x + 0.2 * t * w  # noqa: E731
        a = sample(ddpm, model, x, ddpm.begin(), torch.Generator().manual_seed(1))
        b = sample(ddim, model, x, ddim.begin(), torch.Generator().manual_seed(1))
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        deterministic = BuiltinDDIM(BuiltinDDIMConfig(prediction=prediction, betas="cosine", steps=12))
        g = torch.Generator().manual_seed(1)
        sample(deterministic, model, x, deterministic.begin(), g)
        assert torch.equal(g.get_state(), torch.Generator().manual_seed(1).get_state()), "eta = 0 drew noise"


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_builtin_ddpm_step_keeps_the_forward_marginal(prediction):
    """Given the true x0 and noise, one step lands on q(x_next | x0) = N(alpha_next·x0, sigma_next²)."""
    scheduler = DDPM(DdpmConfig(prediction=prediction, betas="cosine"))
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(200_000, generator=g), torch.randn(200_000, generator=g)
    state = scheduler.begin(5)
    state.index = 1
    t = torch.tensor([state.t, state.t_next])
    (alpha, alpha_next), (sigma, sigma_next) = scheduler.alpha_sigma(t)
    exact = scheduler.training_target(x0, noise, t[:1].expand(200_000))
    x_next = scheduler.step(state, exact, alpha * x0 + sigma * noise, g)
    z = (x_next - alpha_next * x0) / sigma_next
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01 and abs(torch.corrcoef(torch.stack([z, x0]))[0, 1]) < 0.01


def test_flow_match_euler_diffusers_grid():
    """Evenly from 1 to s(1/1000), shifted, then 0 (test_diffusers_adapter.py compares it with diffusers)."""
    def times(steps, shift=1.0, grid="diffusers"):
        return FlowMatchEuler(FlowMatchEulerConfig(shift=shift, grid=grid)).begin(steps).times

    assert times(1) == [1.0, 0.0] and times(2) == pytest.approx([1.0, 0.001, 0.0], abs=1e-12)
    assert times(4) == pytest.approx([1.0, 0.667, 0.334, 0.001, 0.0], abs=1e-12)
    assert times(4, grid="uniform") == [1.0, 0.75, 0.5, 0.25, 0.0]  # the default, unchanged
    low = 3 * 0.001 / (1 + 2 * 0.001)
    assert times(2, shift=3.0)[1] == pytest.approx(3 * low / (1 + 2 * low))  # the low end shifted twice
    check_scheduler(FlowMatchEuler, FlowMatchEulerConfig(grid="diffusers", shift=3.0))


def test_noise_family_is_read_off_alpha_sigma():
    class VarianceExploding(FlowMatchEuler):
        def alpha_sigma(self, t):
            return torch.ones_like(t), 80 * t

    assert FlowMatchEuler(FlowMatchEulerConfig()).noise_family == "flow-matching"
    assert DDPM(DdpmConfig(betas="cosine")).noise_family == BuiltinDDIM(BuiltinDDIMConfig()).noise_family == "ddpm"
    assert DDIM(DDIMConfig()).noise_family == "ddpm"  # the plugin author's DDIM above, without declaring it
    assert VarianceExploding(FlowMatchEulerConfig()).noise_family == "other"


def test_builtin_ddpm_seeds_in_a_pipeline(tiny, monkeypatch):
    tiny.scheduler = DDPM(DdpmConfig(prediction="v", steps=4))
    loss = tiny.loss(torch.rand(2, 3, 1, 8, 8))
    assert torch.isfinite(loss) and loss > 0
    seen, predict = [], tiny.model.predict
    monkeypatch.setattr(tiny.model, "predict", lambda state, x, t: seen.append(t) or predict(state, x, t))
    context = torch.rand(1, 2, 1, 8, 8)
    first, again, other = (tiny.generate(context, 2, generator=torch.Generator().manual_seed(seed)).video
                           for seed in (1, 1, 2))
    assert seen[:4] == [1.0, 0.75, 0.5, 0.25]  # the decoder is handed timestep / train_timesteps
    assert torch.equal(first, again) and not torch.equal(first, other)
