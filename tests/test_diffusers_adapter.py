"""The `diffusers` scheduler plugin, and the built-in schedulers against diffusers where the maths is the same.

Every test that needs diffusers (an optional extra: `pip install -e ".[diffusers]"`) takes the ``diffusers``
fixture and is skipped without it. The model of the comparisons is a fixed linear function of x and t: the
diffusers loop hands it our time t = (j + 1) / T for its timestep j (σ for flow matching)."""

import inspect
import subprocess
import sys

import pytest
import torch

from scdkit.diffusion import DdpmConfig
from scdkit.errors import RegistryError
from scdkit.interfaces import Recipe
from scdkit.pluginmanager import load_catalog
from scdkit.plugins.schedulers.ddim import DDIM, DDIMConfig
from scdkit.plugins.schedulers.ddpm import DDPM
from scdkit.plugins.schedulers.flow_match_euler import FlowMatchEuler, FlowMatchEulerConfig
from scdkit.registry import load_registry
from scdkit.testing import check_scheduler
from tests.test_registry import GOOD, write

T = 1000
BETAS = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
PREDICTIONS = {"epsilon": "epsilon", "v": "v_prediction"}
W = torch.randn(2, 16, 4, generator=torch.Generator().manual_seed(3))
START = torch.randn(2, 16, 4, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def diffusers():
    return pytest.importorskip("diffusers")


def model(x, t):
    """A fixed linear 'model' of x and the time t in [0, 1]."""
    return 0.8 * x + 0.3 * (t - 0.5) * W


def ours(scheduler, steps=None, seed=5, record=None, start=START):
    """Sample from ``start`` with an scdkit scheduler; ``record`` collects the times the model saw."""
    g, state, x = torch.Generator().manual_seed(seed), scheduler.begin(steps), start.clone()
    for _ in range(state.steps):
        (record if record is not None else []).append(state.t)
        x = scheduler.step(state, model(x, state.t), x, g)
    return x


def theirs(solver, time_of, seed=5, **step_options):
    """Sample from START with a diffusers scheduler after ``set_timesteps``; the model sees ``time_of(i, j)``."""
    g, x = torch.Generator().manual_seed(seed), START.clone()
    if "generator" in inspect.signature(solver.step).parameters:
        step_options["generator"] = g
    for i, j in enumerate(solver.timesteps):
        x = solver.step(model(x, time_of(i, j)), j, x, **step_options).prev_sample
    return x


def ddpm_time(i, j):
    return (int(j) + 1) / T


def assert_same(got, want, rtol=1e-5):
    """Equal up to float32 rounding of diffusers' float32 tables (relative to the samples' size)."""
    err, scale = (got - want).abs().max().item(), max(1.0, want.abs().max().item())
    assert err <= rtol * scale, f"max difference {err:.3g} at scale {scale:.3g}"


# -- ddim and ddpm against diffusers' DDIMScheduler and DDPMScheduler -----------------------------

@pytest.mark.parametrize("betas", ["linear", "cosine"])
@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_matches_diffusers(diffusers, betas, prediction, eta):
    solver = diffusers.DDIMScheduler(beta_schedule=BETAS[betas], prediction_type=PREDICTIONS[prediction],
                                     clip_sample=False, timestep_spacing="trailing")
    solver.set_timesteps(10)
    seen = []
    got = ours(DDIM(DDIMConfig(steps=10, prediction=prediction, betas=betas, eta=eta)), record=seen)
    assert seen == [ddpm_time(i, j) for i, j in enumerate(solver.timesteps)]
    assert_same(got, theirs(solver, ddpm_time, eta=eta))
    if eta > 0:  # the noise matters: another seed gives another sample
        assert not torch.allclose(got, theirs(solver, ddpm_time, seed=6, eta=eta), atol=1e-3)


@pytest.mark.parametrize("betas", ["linear", "cosine"])
@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_ddpm_matches_diffusers(diffusers, betas, prediction):
    solver = diffusers.DDPMScheduler(beta_schedule=BETAS[betas], prediction_type=PREDICTIONS[prediction],
                                     clip_sample=False, timestep_spacing="trailing")
    solver.set_timesteps(10)
    got = ours(DDPM(DdpmConfig(steps=10, prediction=prediction, betas=betas)))
    assert_same(got, theirs(solver, ddpm_time))
    assert not torch.allclose(got, theirs(solver, ddpm_time, seed=6), atol=1e-3)


@pytest.mark.parametrize("betas", ["linear", "cosine"])
def test_ddpm_family_training_noise_matches_diffusers(diffusers, betas):
    solver = diffusers.DDPMScheduler(beta_schedule=BETAS[betas], prediction_type="v_prediction")
    scheduler = DDPM(DdpmConfig(prediction="v", betas=betas))
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(5, 16, 4, generator=g), torch.randn(5, 16, 4, generator=g)
    j = torch.tensor([0, 1, 499, 998, 999])
    t = (j + 1) / T
    assert_same(scheduler.add_noise(x0, noise, t), solver.add_noise(x0, noise, j))
    assert_same(scheduler.training_target(x0, noise, t), solver.get_velocity(x0, noise, j))


# -- flow-match-euler's diffusers grid against FlowMatchEulerDiscreteScheduler -------------------

@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [1, 2, 7, 30])
def test_flow_match_euler_diffusers_grid_matches_diffusers(diffusers, shift, steps):
    solver = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    solver.set_timesteps(steps)
    scheduler = FlowMatchEuler(FlowMatchEulerConfig(shift=shift, grid="diffusers"))
    times = scheduler.begin(steps).times
    torch.testing.assert_close(torch.tensor(times, dtype=torch.float64), solver.sigmas.double(), rtol=0, atol=1e-6)
    assert_same(ours(scheduler, steps), theirs(solver, lambda i, j: solver.sigmas[i].item()))
    uniform = FlowMatchEuler(FlowMatchEulerConfig(shift=shift)).begin(steps).times
    if steps > 1:  # the grids differ where the docstring says: the last non-zero time
        assert abs(uniform[-2] - times[-2]) > 1e-3 and times[-2] < 0.01


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_match_euler_equals_the_adapter_on_the_diffusers_grid(diffusers, shift):
    adapter = wrapped("FlowMatchEulerDiscreteScheduler", {"shift": shift}, steps=12)
    builtin = FlowMatchEuler(FlowMatchEulerConfig(shift=shift, steps=12, grid="diffusers"))
    assert adapter.prediction_type == builtin.prediction_type == "velocity"
    assert adapter.noise_family == builtin.noise_family == "flow-matching"
    torch.testing.assert_close(torch.tensor(adapter.begin().times), torch.tensor(builtin.begin().times),
                               rtol=0, atol=1e-6)
    assert_same(ours(adapter), ours(builtin))


# -- the adapter --------------------------------------------------------------------------------

def wrapped(class_name, config=None, steps=10):
    cls = load_catalog(entry_points=False).get("schedulers", "diffusers")
    return cls(cls.config_class(class_name=class_name, steps=steps, config=config or {}))


FITTING = [
    ("FlowMatchEulerDiscreteScheduler", {}),
    ("FlowMatchEulerDiscreteScheduler", {"shift": 3.0}),
    ("DPMSolverMultistepScheduler", {}),
    ("DPMSolverMultistepScheduler", {"prediction_type": "v_prediction", "beta_schedule": "squaredcos_cap_v2"}),
    ("UniPCMultistepScheduler", {}),
    ("UniPCMultistepScheduler", {"prediction_type": "v_prediction"}),
    ("DDIMScheduler", {"clip_sample": False, "timestep_spacing": "trailing"}),
    ("DDPMScheduler", {"clip_sample": False, "prediction_type": "v_prediction"}),
]


@pytest.mark.parametrize("class_name, config", FITTING)
def test_adapter_passes_the_kit(diffusers, class_name, config):
    cls = load_catalog(entry_points=False).get("schedulers", "diffusers")
    check_scheduler(cls, cls.config_class(class_name=class_name, steps=10, config=config))


@pytest.mark.parametrize("class_name, prediction", [("DPMSolverMultistepScheduler", "epsilon"),
                                                    ("DPMSolverMultistepScheduler", "v_prediction"),
                                                    ("UniPCMultistepScheduler", "epsilon"),
                                                    ("UniPCMultistepScheduler", "v_prediction")])
def test_adapter_steps_as_diffusers_with_times_mapped(diffusers, class_name, prediction):
    """The model sees t = (j + 1) / T and the prediction types map; the result is diffusers' own, bit for bit."""
    scheduler = wrapped(class_name, {"prediction_type": prediction})
    assert scheduler.prediction_type == {"epsilon": "epsilon", "v_prediction": "v"}[prediction]
    assert scheduler.noise_family == "ddpm"
    solver = getattr(diffusers, class_name)(prediction_type=prediction)
    solver.set_timesteps(10)
    seen = []
    got = ours(scheduler, record=seen)
    assert seen == [ddpm_time(i, j) for i, j in enumerate(solver.timesteps)] and seen[0] == 1.0
    assert torch.equal(got, theirs(solver, ddpm_time))


def test_adapter_multistep_memory_lives_in_the_state(diffusers):
    """Two runs stepped in turn equal each run alone, and the plugin's own diffusers scheduler is never stepped."""
    scheduler = wrapped("UniPCMultistepScheduler", {"prediction_type": "v_prediction"})
    starts = [START, 2 * START]
    alone = [ours(scheduler, start=x) for x in starts]
    states, xs = [scheduler.begin(), scheduler.begin()], [x.clone() for x in starts]
    for _ in range(states[0].steps):
        for i, state in enumerate(states):
            xs[i] = scheduler.step(state, model(xs[i], state.t), xs[i])
    assert torch.equal(xs[0], alone[0]) and torch.equal(xs[1], alone[1])
    assert not torch.allclose(alone[0], alone[1])
    assert scheduler.wrapped.solver.step_index is None and states[0].solver is not states[1].solver


def test_adapter_trains_on_the_wrapped_schedule(diffusers):
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 16, 4, generator=g), torch.randn(4, 16, 4, generator=g)
    options = {"prediction_type": "v_prediction", "beta_schedule": "squaredcos_cap_v2"}
    dpm, solver = wrapped("DPMSolverMultistepScheduler", options), diffusers.DPMSolverMultistepScheduler(**options)
    j = torch.tensor([0, 10, 500, 999])
    alpha, sigma = solver.alphas_cumprod[j].sqrt()[:, None, None], (1 - solver.alphas_cumprod[j]).sqrt()[:, None, None]
    assert_same(dpm.add_noise(x0, noise, (j + 1) / T), alpha * x0 + sigma * noise)
    assert_same(dpm.training_target(x0, noise, (j + 1) / T), alpha * noise - sigma * x0)
    t = dpm.sample_timesteps((1000,), generator=g)
    assert torch.allclose(t * T, (t * T).round(), atol=1e-3) and t.min() >= 1 / T and t.max() <= 1  # some k / T

    flow = wrapped("FlowMatchEulerDiscreteScheduler", {"shift": 3.0})
    solver = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    solver.set_timesteps(10)
    sigma = solver.sigmas[3]
    assert_same(flow.add_noise(x0, noise, sigma.expand(4)), solver.scale_noise(x0, solver.timesteps[3:4], noise))
    assert torch.equal(flow.training_target(x0, noise, sigma.expand(4)), noise - x0)
    t = flow.sample_timesteps((1000,), generator=g)
    train_sigmas = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0).sigmas
    assert torch.isin(t, train_sigmas).all() and len(t.unique()) > 500  # its training sigmas, shift included


REFUSED = [
    ("EulerDiscreteScheduler", {}, "config", "samples a scaled x"),
    ("HeunDiscreteScheduler", {}, "config", "one evaluation per step"),
    ("DEISMultistepScheduler", {}, "config", "does not end at the clean sample"),
    ("DPMSolverMultistepScheduler", {"prediction_type": "flow_prediction", "use_flow_sigmas": True}, "config",
     "prediction_type 'flow_prediction' is not supported"),
    ("DPMSolverMultistepScheduler", {"not_an_option": 1}, "config", "unexpected keyword argument 'not_an_option'"),
    ("DPMSolverMultistepSchedular", {}, "class_name", "did you mean 'DPMSolverMultistepScheduler'"),
]


@pytest.mark.parametrize("class_name, config, key, message", REFUSED)
def test_registry_refuses_what_does_not_fit_in_one_line(diffusers, tmp_path, class_name, config, key, message):
    options = ", ".join(f"{k} = {str(v).lower() if isinstance(v, bool) else repr(v)}" for k, v in config.items())
    text = GOOD + f'\n[schedulers.d]\nplugin = "diffusers"\nclass_name = "{class_name}"\nconfig = {{ {options} }}\n'
    path = write(tmp_path, text)
    with pytest.raises(RegistryError) as info:
        load_registry(path)
    [line] = info.value.problems
    assert line.startswith(f"{path}: [schedulers.d].{key}: ") and message in line, line
    assert "\n" not in line


BRIEF = '''
[schedulers.dpm]
plugin = "diffusers"
class_name = "DPMSolverMultistepScheduler"
steps = 3
config = { prediction_type = "v_prediction", beta_schedule = "squaredcos_cap_v2" }
'''


def test_a_pipeline_trains_and_samples_with_a_diffusers_scheduler(diffusers, tmp_path):
    registry = load_registry(write(tmp_path, GOOD.replace('scheduler = "flow"', 'scheduler = "dpm"') + BRIEF))
    pipeline = registry.build("p", load=False)
    assert pipeline.scheduler.prediction_type == "v"
    loss = pipeline.loss(torch.rand(2, 3, 1, 8, 8), Recipe(), torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and loss > 0
    context = torch.rand(1, 2, 1, 8, 8)
    first, again = (pipeline.generate(context, 2, generator=torch.Generator().manual_seed(1)).video for _ in range(2))
    assert first.shape == (1, 2, 1, 8, 8) and torch.equal(first, again)


def test_validate_dry_builds_a_diffusers_scheduler_on_the_meta_device(diffusers, tmp_path):
    from scdkit.registry import validate

    registry = load_registry(write(tmp_path, GOOD.replace('scheduler = "flow"', 'scheduler = "dpm"') + BRIEF))
    validate(registry)
    assert registry.dry_build("p").scheduler.noise_family == "ddpm"


# -- without diffusers --------------------------------------------------------------------------

def test_without_diffusers_the_plugin_is_listed_and_a_table_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` now fails as if not installed
    catalog = load_catalog(entry_points=False)
    assert "diffusers" in catalog.names("schedulers") and not catalog.broken
    path = write(tmp_path, GOOD + BRIEF)
    with pytest.raises(RegistryError) as info:
        load_registry(path, catalog)
    [line] = info.value.problems
    assert line.startswith(f"{path}: [schedulers.dpm].class_name: the diffusers plugin needs diffusers, which is "
                           "not installed: pip install 'scdkit[diffusers]'"), line
    load_registry(write(tmp_path, GOOD), catalog).build("p", load=False)  # the other schedulers are unaffected


def test_listing_plugins_does_not_import_diffusers():
    """`scdkit plugins` stays fast: loading the catalog leaves diffusers unimported (a fresh interpreter)."""
    code = ("import sys; from scdkit.pluginmanager import load_catalog; catalog = load_catalog(); "
            "assert 'diffusers' in catalog.names('schedulers'); assert 'diffusers' not in sys.modules, 'imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
