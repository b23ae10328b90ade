"""WorkerSettings / ClientSettings from the environment: parsing and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.config import KDConfig, parse_overrides, resolve_config
from jobs.errors import ConfigError
from kd_client.settings import ClientSettings
from kd_worker.settings import load_settings, require_model_dir


def test_env_prefix_and_types(monkeypatch, tmp_path):
    monkeypatch.setenv("KD_REDIS_URL", "redis://:secret@127.0.0.1:6390/2")
    monkeypatch.setenv("KD_TEACHER", str(tmp_path / "t"))
    monkeypatch.setenv("KD_JOB_TIMEOUT", "7200")
    monkeypatch.setenv("KD_KD_DEFAULTS", '{"iterations": 50, "temperature": 4}')
    monkeypatch.setenv("KD_ADAPTERS_DIR", "~/adapters")
    s = load_settings()
    assert s.redis_url.endswith(":6390/2") and s.job_timeout == 7200
    assert s.teacher == tmp_path / "t" and s.adapters_dir == Path.home() / "adapters"
    assert resolve_config(s.kd_defaults).iterations == 50


def test_openblas_coretype_is_read_from_either_variable(monkeypatch):
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    assert load_settings().openblas_coretype == "Haswell"
    monkeypatch.setenv("KD_OPENBLAS_CORETYPE", "SkylakeX")
    assert load_settings().openblas_coretype == "SkylakeX"


@pytest.mark.parametrize("url", ["http://localhost:6379", "localhost:6379", "redis://", "rediss:///0"])
def test_bad_redis_url_says_what_to_set(monkeypatch, url):
    monkeypatch.setenv("KD_REDIS_URL", url)
    with pytest.raises(ConfigError, match="KD_REDIS_URL"):
        load_settings()


def test_unix_socket_and_tls_urls_are_accepted(monkeypatch):
    for url in ("unix:///tmp/redis.sock?password=x", "rediss://user:pw@host:6380/0"):
        monkeypatch.setenv("KD_REDIS_URL", url)
        assert load_settings().redis_url == url
        assert ClientSettings().redis_url == url


def test_bad_values_name_the_variable(monkeypatch):
    monkeypatch.setenv("KD_KEEP_VERSIONS", "0")
    with pytest.raises(ConfigError, match="KD_KEEP_VERSIONS"):
        load_settings()
    monkeypatch.delenv("KD_KEEP_VERSIONS")
    monkeypatch.setenv("KD_LOG_FORMAT", "xml")
    with pytest.raises(ConfigError, match="KD_LOG_FORMAT"):
        load_settings()


def test_model_dir_requirements(tmp_path):
    with pytest.raises(ConfigError, match="KD_TEACHER is not set"):
        require_model_dir(None, "KD_TEACHER")
    with pytest.raises(ConfigError, match="no config.json"):
        require_model_dir(tmp_path, "KD_TEACHER")
    (tmp_path / "config.json").write_text("{}")
    assert require_model_dir(tmp_path, "KD_TEACHER") == tmp_path


def test_kd_config_defaults_follow_the_design():
    c = KDConfig()
    assert (c.temperature, c.alpha, c.learning_rate, c.iterations) == (2.0, 0.7, 1e-4, 200)
    assert c.lora_parameters() == {"rank": 8, "scale": 20.0, "dropout": 0.0}


def test_config_merge_order_and_errors():
    c = resolve_config({"iterations": 10, "alpha": 0.5}, {"alpha": 0.9})
    assert (c.iterations, c.alpha) == (10, 0.9)
    with pytest.raises(ConfigError, match="did you mean 'temperature'"):
        resolve_config({"temperture": 3})
    for bad in ({"temperature": 0.1}, {"alpha": 1.5}, {"lora_rank": 0}, {"top_k": "most"}, {"lora_layers": 0}):
        with pytest.raises(ConfigError, match="invalid KD settings"):
            resolve_config(bad)
    assert resolve_config({"top_k": "full"}).top_k == "full"


def test_set_overrides_parse_json_or_strings():
    assert parse_overrides(["temperature=4", "top_k=full", 'lora_keys=["self_attn.q_proj"]']) == {
        "temperature": 4,
        "top_k": "full",
        "lora_keys": ["self_attn.q_proj"],
    }
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["temperature"])
