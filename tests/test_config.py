"""YAML configs validate into typed objects; a bad value names the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from synth.config import GenerateConfig
from synth.core.config import load_config
from synth.core.errors import ConfigError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("generate*.yaml")) + [CONFIGS / "demo.yaml"], ids=str)
def test_shipped_configs_validate(path):
    cfg = load_config(GenerateConfig, path)
    assert cfg.n > 0


def test_bad_value_names_the_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("normal: a\nout: b\nn: -3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: key 'n': Input should be greater than 0 \(got -3\)"):
        load_config(GenerateConfig, path)


def test_unknown_key_and_bad_choice(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("normal: a\nout: b\nmethd: perlin\n")
    with pytest.raises(ConfigError, match="key 'methd'"):
        load_config(GenerateConfig, path)
    path.write_text("normal: a\nout: b\nmethod: nope\n")
    with pytest.raises(ConfigError, match="key 'method'"):
        load_config(GenerateConfig, path)


def test_missing_key_invalid_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("out: b\n")
    with pytest.raises(ConfigError, match="key 'normal': Field required"):
        load_config(GenerateConfig, path)
    path.write_text("normal: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(GenerateConfig, path)
    path.write_text("normal: a\nout: b\nn: 5\n")
    assert load_config(GenerateConfig, path, {"n": 7, "seed": None}).n == 7
    path.write_text("!!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):  # safe_load refuses object construction
        load_config(GenerateConfig, path)
