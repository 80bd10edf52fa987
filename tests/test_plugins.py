"""Third-party plugins through the `scdkit` entry-point group, isolated from each other."""

import json

import pytest

from scdkit.cli import main
from scdkit.errors import PluginError
from scdkit.pluginmanager import load_catalog

GOOD_PLUGIN = """
from scdkit.hookspecs import hookimpl
from scdkit.plugins.encoders.causal_transformer import CausalTransformerEncoder

class Thirdparty(CausalTransformerEncoder):
    plugin_name = "thirdparty-encoder"
    plugin_version = "9.9"

@hookimpl
def scdkit_register_encoders(register):
    register(Thirdparty)
"""

DUPLICATE_PLUGIN = GOOD_PLUGIN.replace('"thirdparty-encoder"', '"causal-transformer"')


def test_broken_plugin_is_recorded_and_others_still_work(fake_dist):
    fake_dist("goodplug", {"goodplug.py": GOOD_PLUGIN}, {"good": "goodplug"})
    fake_dist("badplug", {"badplug.py": "raise RuntimeError('boom at import')\n"}, {"bad": "badplug"})
    catalog = load_catalog()
    assert "thirdparty-encoder" in catalog.names("encoders")
    assert "causal-transformer" in catalog.names("encoders")
    [broken] = catalog.broken
    assert broken.provider == "badplug:bad" and broken.version == "1.2.3"
    assert "RuntimeError: boom at import" in broken.error
    with pytest.raises(PluginError, match="broken plugins that might provide it: badplug:bad"):
        catalog.get("encoders", "bad-encoder")


def test_plugin_whose_register_hook_raises_is_isolated(fake_dist):
    source = ("from scdkit.hookspecs import hookimpl\n"
              "@hookimpl\ndef scdkit_register_decoders(register):\n    raise ValueError('cannot register')\n")
    fake_dist("raiser", {"raiser.py": source}, {"raiser": "raiser"})
    catalog = load_catalog()
    assert "dit-frame" in catalog.names("decoders")
    assert any("cannot register" in b.error for b in catalog.broken)


def test_misspelled_hook_is_reported_by_check_pending(fake_dist):
    source = "from scdkit.hookspecs import hookimpl\n@hookimpl\ndef scdkit_register_encoderz(register):\n    pass\n"
    fake_dist("typo", {"typo.py": source}, {"typo": "typo"})
    catalog = load_catalog()
    assert any("scdkit_register_encoderz" in b.error for b in catalog.broken)


def test_two_providers_of_one_name_is_an_error_naming_both(fake_dist):
    fake_dist("dupe", {"dupe.py": DUPLICATE_PLUGIN}, {"dupe": "dupe"})
    catalog = load_catalog()
    with pytest.raises(PluginError) as info:
        catalog.get("encoders", "causal-transformer")
    assert "scdkit.plugins.encoders.causal_transformer" in str(info.value) and "dupe:dupe" in str(info.value)


def test_plugins_json_lists_builtins_and_broken(fake_dist, capsys):
    fake_dist("badplug", {"badplug.py": "import does_not_exist\n"}, {"bad": "badplug"})
    assert main(["plugins", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert {"encoders", "decoders", "schedulers", "broken"} <= listing.keys()
    names = {kind: [row["name"] for row in listing[kind]] for kind in ("encoders", "decoders", "schedulers")}
    assert "causal-transformer" in names["encoders"] and "dit-frame" in names["decoders"]
    assert "flow-match-euler" in names["schedulers"]
    assert all(set(row) == {"name", "provider", "version"} for row in listing["encoders"])
    [broken] = listing["broken"]
    assert broken["provider"] == "badplug:bad" and "ModuleNotFoundError" in broken["error"]


def test_every_hook_is_documented_prefixed_and_exercised():
    """As datasette does: each hookspec is prefixed, documented with its signature and version, and wired."""
    from scdkit import hookspecs

    hooks = [name for name, fn in vars(hookspecs).items() if callable(fn) and hasattr(fn, "scdkit_spec")]
    assert hooks, "no hookspecs found"
    catalog = load_catalog(entry_points=False)
    for name in hooks:
        assert name.startswith("scdkit_"), name
        doc = getattr(hookspecs, name).__doc__ or ""
        assert "register(" in doc and "Since" in doc, f"{name} is not documented with its signature and version"
        kind = name.removeprefix("scdkit_register_")
        assert kind in catalog.components, f"{name} has no catalog kind"
    assert catalog.names("attention_backends"), "the attention-backend hook registered nothing"
