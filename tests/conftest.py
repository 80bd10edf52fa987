import pytest
import torch

from scdkit import pluginmanager


@pytest.fixture(autouse=True)
def _deterministic_and_fresh_catalog():
    torch.manual_seed(0)
    pluginmanager._default = None  # each test sees the plugins installed at that moment
    yield
    pluginmanager._default = None


@pytest.fixture
def fake_dist(tmp_path, monkeypatch):
    """Install a fake third-party distribution with ``scdkit`` entry points into sys.path.

    Usage: fake_dist("name", {"module.py": source}, {"entry": "module"}).
    """

    def make(name: str, modules: dict[str, str], entry_points: dict[str, str]):
        for filename, source in modules.items():
            (tmp_path / filename).write_text(source)
        info = tmp_path / f"{name}-1.2.3.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.2.3\n")
        lines = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
        (info / "entry_points.txt").write_text(f"[scdkit]\n{lines}\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        return tmp_path

    return make
