"""Fitting one component under frozen others, provenance, pairing checks, and never losing a trained checkpoint.

The tiny registry of test_long_context: encoders ``causal`` (the pipeline's), ``long`` (same weights as
``causal``) and ``deeper`` (another architecture with the same contract); decoder ``dec``; the "shipped"
checkpoint in ``ckpt/`` (written without provenance, like checkpoints from before scdkit 0.3).
"""

import hashlib
import json

import pytest
import torch

from scdkit.checkpoint import read_checkpoint, read_metadata, weights_digest
from scdkit.cli import main
from scdkit.errors import CheckpointError, UsageError
from scdkit.train import TrainConfig, train
from tests.test_long_context import tiny_registry

FAST = ["--steps", "2", "--batch", "2", "--frames", "3", "--eval-every", "0", "--warmup", "1"]


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run(registry, *args):
    return main(["--threads", "1", "train", "--registry", str(registry.path), "--pipeline", "p", *FAST, *args])


def fit_deeper(registry, tmp_path, out="fit"):
    """The issue's exact form: a new encoder fitted under the frozen trained decoder."""
    code = run(registry, "--encoder", "deeper", "--init", str(tmp_path / "ckpt"), "--freeze", "decoder",
               "--out", str(tmp_path / out))
    assert code == 0
    return tmp_path / out


def test_fitting_an_encoder_under_a_frozen_decoder(tmp_path, capsys):
    registry = tiny_registry(tmp_path)
    decoder_file = tmp_path / "ckpt" / "decoder.safetensors"
    before = sha256(decoder_file)
    out = fit_deeper(registry, tmp_path)
    printed = capsys.readouterr().out
    assert "init: decoder <-" in printed and "init: not loaded: encoder" in printed and "layers" in printed
    assert sha256(decoder_file) == before  # the frozen decoder is never written back...
    assert not (out / "decoder.safetensors").exists()  # ...nor copied with a step it was never trained at
    manifest = json.loads((out / "run.json").read_text())
    decoder = registry.build("p").components["decoder"]
    assert manifest["components"] == {"encoder": "deeper", "decoder": "dec"}
    assert manifest["frozen"]["decoder"]["weights_sha256"] == weights_digest(decoder)
    assert manifest["frozen"]["decoder"]["step"] == 3
    meta = read_metadata(out / "encoder.safetensors")
    assert meta["name"] == "deeper" and meta["step"] == "2"
    assert json.loads(meta["trained_with"])["decoder"] == {"name": "dec", "plugin": "dit-frame", "step": 3,
                                                           "weights_sha256": weights_digest(decoder)}
    state, _ = read_checkpoint(out / "train_state.safetensors")
    assert state and not any(key.startswith("decoder.") for key in state)  # no weights or optimizer state
    n_encoder_params = len(list(registry.build("p", load=False, encoder="deeper").components["encoder"].parameters()))
    assert {int(key.split(".")[1]) for key in state if key.startswith("optimizer.")} == set(range(n_encoder_params))

    # the run folder alone is enough to generate: it names its encoder and points to its frozen decoder
    assert main(["--threads", "1", "generate", "--registry", str(registry.path), "--pipeline", "p", "--checkpoint",
                 str(out), "--clips", "1", "--context", "1", "--frames", "1", "--steps", "1",
                 "--gif", str(tmp_path / "g.gif")]) == 0
    built = registry.build("p", checkpoint=out)
    assert type(built.components["encoder"]).__name__ == "CausalTransformerEncoder"
    assert built.sources["decoder"].path.resolve() == decoder_file.resolve()


def test_frozen_decoder_gets_no_gradients_and_the_encoder_learns(tmp_path):
    registry = tiny_registry(tmp_path)
    pipeline = registry.build("p", load=False, encoder="deeper")
    encoder_before = {k: v.clone() for k, v in pipeline.components["encoder"].state_dict().items()}
    trainer = train(pipeline, TrainConfig(steps=2, batch=2, frames=3, eval_every=0, warmup=1), tmp_path / "out",
                    "moving-digits", names={"encoder": "deeper", "decoder": "dec"},
                    init=[f"decoder={tmp_path / 'ckpt'}"], freeze=["decoder"])
    decoder = pipeline.components["decoder"]
    assert all(p.grad is None and not p.requires_grad for p in decoder.parameters())
    assert weights_digest(decoder) == weights_digest(registry.build("p").components["decoder"])
    assert weights_digest(trainer.ema.components["decoder"]) == weights_digest(decoder)
    assert any(not torch.equal(v, encoder_before[k]) for k, v in pipeline.components["encoder"].state_dict().items())


def test_an_encoder_fitted_under_another_decoder_is_refused(tmp_path, capsys):
    registry = tiny_registry(tmp_path)
    out = fit_deeper(registry, tmp_path)
    other = registry.build("p")  # a decoder trained elsewhere: same architecture, other weights
    with torch.no_grad():
        for p in other.components["decoder"].parameters():
            p.add_(0.01)
    from scdkit.checkpoint import save_component

    save_component(other.components["decoder"], tmp_path / "other" / "decoder.safetensors", "decoder", step=9)
    for command in (["generate", "--gif", str(tmp_path / "g.gif")], ["swap-eval", "--encoders", "deeper"]):
        flag = "--checkpoint" if command[0] == "generate" else None
        args = ["--threads", "1", *command, "--registry", str(registry.path), "--pipeline", "p",
                "--clips", "1", "--context", "1", "--frames", "1", "--steps", "1"]
        if flag:  # generate: the run's encoder with the other decoder beside it
            (tmp_path / "mixed").mkdir(exist_ok=True)
            for name, source in (("encoder", out), ("decoder", tmp_path / "other")):
                (tmp_path / "mixed" / f"{name}.safetensors").write_bytes((source / f"{name}.safetensors").read_bytes())
            args += ["--encoder", "deeper", "--checkpoint", str(tmp_path / "mixed")]
        else:  # swap-eval: the pipeline's decoder is now the other one
            (tmp_path / "ckpt" / "decoder.safetensors").write_bytes((tmp_path / "other" / "decoder.safetensors").read_bytes())
            args += ["--checkpoint", f"deeper={out}"]
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("scdkit: error: encoder") and "was trained with decoder dec at step 3" in err
        assert "do not belong together" in err and "--force-pairing" in err
        assert main([*args, "--force-pairing"]) == 0
        assert "warning:" in capsys.readouterr().err


def test_swap_eval_shows_a_fitted_encoder_beside_the_trained_one(tmp_path, capsys):
    registry = tiny_registry(tmp_path)
    out = fit_deeper(registry, tmp_path)
    capsys.readouterr()
    for checkpoint in (out, out / "encoder.safetensors"):  # a run folder or a file, like generate
        assert main(["--threads", "1", "swap-eval", "--registry", str(registry.path), "--pipeline", "p",
                     "--encoders", "causal,deeper", "--checkpoint", f"deeper={checkpoint}", "--seeds", "0",
                     "--clips", "1", "--context", "1", "--frames", "1", "--steps", "1", "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        causal, deeper = report["rows"]
        assert deeper["weights"].endswith("encoder.safetensors") and deeper["step"] == 2 and causal["step"] == 3
        assert not report["warnings"]


def test_decoder_fine_tuning_under_a_frozen_encoder(tmp_path):
    registry = tiny_registry(tmp_path)
    assert run(registry, "--init", str(tmp_path / "ckpt"), "--freeze", "encoder", "--out", str(tmp_path / "ft")) == 0
    assert not (tmp_path / "ft" / "encoder.safetensors").exists()
    built = registry.build("p", checkpoint=tmp_path / "ft")  # the fine-tuned decoder pairs with the frozen encoder
    assert built.sources["decoder"].step == 2 and built.sources["encoder"].step == 3


def test_validate_follows_a_run_folder_to_its_frozen_components(tmp_path, capsys):
    """A pipeline whose checkpoint is a run that fitted its decoder under a frozen encoder validates: the encoder's
    file is the one the run's run.json names, checked like the folder's own."""
    registry = tiny_registry(tmp_path)
    assert run(registry, "--init", str(tmp_path / "ckpt"), "--freeze", "encoder", "--out", str(tmp_path / "ft")) == 0
    capsys.readouterr()
    fitted = tmp_path / "fitted.toml"
    fitted.write_text(registry.path.read_text().replace('checkpoint = "ckpt"', 'checkpoint = "ft"'))
    assert main(["validate", str(fitted)]) == 0
    assert "trained, encoder step 3, decoder step 2" in capsys.readouterr().out
    (tmp_path / "ckpt" / "encoder.safetensors").rename(tmp_path / "elsewhere.safetensors")  # the frozen file is gone
    assert main(["validate", str(fitted)]) == 2
    err = capsys.readouterr().err
    assert "[pipelines.p].checkpoint" in err and "names" in err and "as its frozen encoder: not found" in err


def test_training_never_replaces_trained_weights_by_accident(tmp_path, capsys):
    registry = tiny_registry(tmp_path)
    shipped = tmp_path / "ckpt"
    (shipped / "train_log.jsonl").write_text('{"step": 3, "loss": 1.0}\n')
    before = {path.name: sha256(path) for path in shipped.iterdir()}
    assert run(registry) == 2  # the pipeline's own folder: weights, no training state
    err = capsys.readouterr().err
    assert "holds trained weights (decoder.safetensors (step 3), encoder.safetensors (step 3))" in err
    assert "--overwrite" in err and "--out runs/NAME" in err
    # a fit that forgets --out (its default is the pipeline's own folder) is refused too
    assert run(registry, "--encoder", "deeper", "--init", str(shipped), "--freeze", "decoder") == 2
    assert run(registry, "--init", str(shipped)) == 2
    assert {path.name: sha256(path) for path in shipped.iterdir()} == before
    # asked for: training in place from its own weights; the old log is kept beside the new one
    assert run(registry, "--init", str(shipped), "--overwrite") == 0
    assert (shipped / "train_log.1.jsonl").read_text() == '{"step": 3, "loss": 1.0}\n'
    assert read_metadata(shipped / "encoder.safetensors")["step"] == "2"


def test_overwrite_starts_over_in_a_folder_with_weights(tmp_path):
    registry = tiny_registry(tmp_path)
    assert run(registry, "--overwrite") == 0
    assert read_metadata(tmp_path / "ckpt" / "decoder.safetensors")["step"] == "2"


def test_init_refuses_what_does_not_fit_and_says_why(tmp_path, capsys):
    registry = tiny_registry(tmp_path)
    ckpt = tmp_path / "ckpt"
    cases = {
        (f"encoder={ckpt / 'encoder.safetensors'}", "--encoder", "deeper"): "does not fit the encoder: config.layers",
        (str(ckpt / "decoder.safetensors"), "--freeze", "encoder"): "--freeze encoder: no trained weights to freeze",
        (f"model={ckpt}",): "'model' is not a role of this pipeline",
        (f"decoder={ckpt / 'encoder.safetensors'}",): "is a encoder checkpoint, not a decoder",
        (str(tmp_path / "nowhere"),): "does not exist",
    }
    for (init, *rest), message in cases.items():
        assert run(registry, "--init", init, *rest, "--out", str(tmp_path / "x")) == 2, init
        err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("device:")]
        assert len(err) == 1 and err[0].startswith("scdkit: error: ") and message in err[0], (init, err)
    (tmp_path / "empty").mkdir()
    assert run(registry, "--init", str(tmp_path / "empty"), "--out", str(tmp_path / "x")) == 2
    assert "no checkpoint there fits this pipeline" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # refused before anything was written


def test_resuming_a_fit_reloads_the_frozen_decoder_and_checks_it(tmp_path, capsys):
    registry = tiny_registry(tmp_path)
    out = fit_deeper(registry, tmp_path)
    assert run(registry, "--encoder", "deeper", "--out", str(out), "--steps", "3") == 0  # resumes (a later --steps wins)
    assert read_metadata(out / "encoder.safetensors")["step"] == "3"
    assert run(registry, "--encoder", "deeper", "--out", str(out), "--init", str(tmp_path / "ckpt"), "--steps", "4") == 2
    assert "holds a training state to resume" in capsys.readouterr().err
    decoder_file = tmp_path / "ckpt" / "decoder.safetensors"  # the frozen decoder changes under the run
    tensors, meta = read_checkpoint(decoder_file)
    from safetensors.torch import save_file

    save_file({k: v + 0.01 for k, v in tensors.items()}, str(decoder_file), metadata=meta)
    assert run(registry, "--encoder", "deeper", "--out", str(out), "--steps", "4") == 2
    assert "has changed since the run started" in capsys.readouterr().err


def test_freeze_encoder_after_trains_the_decoder_alone_against_the_ema_encoder(tmp_path):
    registry = tiny_registry(tmp_path)
    pipeline = registry.build("p", load=False)
    trainer = train(pipeline, TrainConfig(steps=4, batch=2, frames=3, eval_every=0, warmup=1, freeze_encoder_after=2),
                    tmp_path / "out", "moving-digits")
    encoder, ema_encoder = pipeline.components["encoder"], trainer.ema.components["encoder"]
    assert not any(p.requires_grad for p in encoder.parameters())
    assert weights_digest(encoder) == weights_digest(ema_encoder)  # frozen at its EMA weights, which are saved
    saved = read_metadata(tmp_path / "out" / "encoder.safetensors")
    assert saved["weights_sha256"] == weights_digest(ema_encoder)
    assert any(p.requires_grad for p in pipeline.components["decoder"].parameters())
    with pytest.raises(UsageError, match="freezes every component"):
        train(registry.build("p", load=False), TrainConfig(steps=1), tmp_path / "o2", "moving-digits",
              init=[str(tmp_path / "ckpt")], freeze=["encoder", "decoder"])


def test_a_torn_save_is_caught_by_the_pairing_check(tmp_path):
    """Encoder and decoder from different saves of one run do not pair (each records the other's digest); one
    run's files from different steps are named as such, even with force_pairing (tests/test_kills.py)."""
    registry = tiny_registry(tmp_path)
    assert run(registry, "--out", str(tmp_path / "a")) == 0
    older = (tmp_path / "a" / "encoder.safetensors").read_bytes()
    assert run(registry, "--out", str(tmp_path / "a"), "--steps", "3") == 0
    (tmp_path / "a" / "encoder.safetensors").write_bytes(older)
    for force_pairing in (False, True):
        with pytest.raises(CheckpointError, match=r"encoder.safetensors \(step \d\) and .*decoder.safetensors "
                                                  r"\(step 3\) are from different steps of one training run"):
            registry.build("p", checkpoint=tmp_path / "a", force_pairing=force_pairing)


def test_resume_takes_the_encoder_the_run_was_started_with(tmp_path, capsys):
    registry = tiny_registry(tmp_path)
    out = fit_deeper(registry, tmp_path)
    assert run(registry, "--out", str(out), "--steps", "3") == 0  # no --encoder: run.json says deeper
    assert read_metadata(out / "encoder.safetensors")["name"] == "deeper"
    assert run(registry, "--encoder", "causal", "--out", str(out), "--steps", "4") == 2
    assert "trains encoder 'deeper'" in capsys.readouterr().err


def test_freeze_encoder_after_is_refused_with_a_frozen_component(tmp_path, capsys):
    registry = tiny_registry(tmp_path)
    assert run(registry, "--init", str(tmp_path / "ckpt"), "--freeze", "decoder", "--freeze-encoder-after", "1",
               "--out", str(tmp_path / "x")) == 2
    assert "only for joint training" in capsys.readouterr().err


def test_run_folders_say_what_is_missing(tmp_path, capsys):
    registry = tiny_registry(tmp_path)
    out = fit_deeper(registry, tmp_path)
    other = tmp_path / "other.toml"  # a registry that does not declare the run's encoder
    other.write_text(registry.path.read_text().replace("[encoders.deeper]", "[encoders.deep2]")
                     .replace('checkpoint = "ckpt"', f'checkpoint = "{tmp_path / "ckpt"}"'))
    from scdkit.registry import load_registry

    with pytest.raises(CheckpointError, match="trained with encoder 'deeper', which .* does not declare"):
        load_registry(other).build("p", checkpoint=out)
    mixed = tmp_path / "mixed"  # the run's encoder beside a decoder, no run.json: the file names its encoder
    mixed.mkdir()
    for name, source in (("encoder", out), ("decoder", tmp_path / "ckpt")):
        (mixed / f"{name}.safetensors").write_bytes((source / f"{name}.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match=r"that file is encoder 'deeper': pass --encoder deeper"):
        registry.build("p", checkpoint=mixed)
    capsys.readouterr()
    assert main(["--threads", "1", "generate", "--registry", str(registry.path), "--pipeline", "p", "--checkpoint",
                 str(out), "--clips", "1", "--context", "1", "--frames", "1", "--steps", "1",
                 "--gif", str(tmp_path / "g.gif")]) == 0
    err = capsys.readouterr().err  # which weights were loaded, on stderr
    assert "encoder: " in err and "(deeper, causal-transformer, step 2" in err and "decoder: " in err


def test_the_shipped_checkpoint_cannot_be_trained_over(capsys):
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    shipped = repo / "checkpoints" / "scd-digits"
    before = {path.name: sha256(path) for path in shipped.iterdir() if path.is_file()}
    assert main(["--threads", "1", "train", "--registry", str(repo / "registry.toml"), "--steps", "1"]) == 2
    assert "holds trained weights" in capsys.readouterr().err
    after = {path.name: sha256(path) for path in shipped.iterdir() if path.is_file()}
    assert after == before


@pytest.mark.parametrize("text, message", [("{not json", "not a readable run manifest"),
                                           ('{"frozen": []}', "not a readable run manifest"),
                                           ('{"frozen": {"decoder": {}}}', "frozen.decoder has no path")])
def test_a_damaged_run_manifest_is_one_clear_error(tmp_path, text, message):
    registry = tiny_registry(tmp_path)
    out = fit_deeper(registry, tmp_path)
    (out / "run.json").write_text(text)
    with pytest.raises(CheckpointError, match=message):
        registry.build("p", checkpoint=out, encoder="deeper")
