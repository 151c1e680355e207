"""The configs users copy from must stay valid: every file in configs/ and the README's example."""

import re
from pathlib import Path

import pytest

from mdiff.config import load_config, parse_config

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.models and cfg.hooks and cfg.train is not None


def test_readme_example_is_a_valid_config():
    import tomllib

    blocks = re.findall(r"```toml\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    experiment = next(b for b in blocks if b.lstrip().startswith("name ="))
    train = next(b for b in blocks if b.lstrip().startswith("[train]"))
    cfg = parse_config(tomllib.loads(experiment + "\n" + train), "README.md", base_dir=str(REPO))
    assert [m.name for m in cfg.models] == ["1B", "4B"]
    assert [d.architecture for d in cfg.train.dictionaries] == ["batchtopk", "relu"]
