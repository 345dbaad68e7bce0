"""Configuration loading: valid files load, invalid ones name the key, value and expected form."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from node.config import ConfigError, load_config, parse_config, validate_ae_title
from tests.peers import REPO_ROOT


def test_config_example_file_loads():
    config = load_config(REPO_ROOT / "config" / "node.toml")
    assert config.node.ae_title == "LIBRA_NODE"
    assert config.destinations[0].port == 4242
    assert config.node.data_dir.is_absolute()


def test_config_empty_file_uses_defaults(tmp_path):
    path = tmp_path / "node.toml"
    path.write_text("")
    config = load_config(path)
    assert config.node.port == 11112
    assert config.database_url == f"sqlite:///{tmp_path / 'var' / 'index.sqlite3'}"


def test_config_missing_file_names_path(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.toml")


def test_config_invalid_toml_is_reported(tmp_path):
    path = tmp_path / "node.toml"
    path.write_text("[node\nport = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ({"node": {"port": 70000}}, "node.port = 70000"),
        ({"node": {"ae_title": "A" * 17}}, "node.ae_title = 'AAAAAAAAAAAAAAAAA': AE title 'AAAAAAAAAAAAAAAAA' has 17 characters"),
        ({"node": {"bind_address": "localhost"}}, "node.bind_address = 'localhost': 'localhost' is not an IP address"),
        ({"node": {"prot": 1}}, "node.prot: unknown key"),
        ({"callers": [{"ae_title": "   "}]}, "callers.0.ae_title = '   ': AE title is empty or all spaces"),
        ({"callers": [{"ae_title": "CT\\01"}]}, "contains a backslash"),
        ({"destinations": [{"name": "pacs", "ae_title": "PACS", "host": "h"}]}, "destinations.0.port: required key is missing"),
        ({"destinations": [{"name": "p", "ae_title": "PACS", "host": "h", "port": 1, "sr_class": "pdf"}]}, "destinations.0.sr_class = 'pdf'"),
        ({"model": {"device": "gpu"}}, "'gpu' is not a device; use 'auto', 'cpu', 'cuda' or 'cuda:N'"),
        (
            {"query_sources": [{"name": "q", "ae_title": "Q", "host": "h", "port": 1, "retrieve_method": "ftp"}]},
            "query_sources.0.retrieve_method = 'ftp'",
        ),
        (
            {"query_sources": [{"name": "q", "ae_title": "Q", "host": "h", "port": 1, "query_timeout_seconds": 0}]},
            "query_sources.0.query_timeout_seconds = 0",
        ),
        ({"query_sources": [{"name": "q", "ae_title": "Q", "host": "h"}]}, "query_sources.0.port: required key is missing"),
    ],
)
def test_config_invalid_value_names_key(document, expected):
    with pytest.raises(ConfigError) as raised:
        parse_config(document)
    assert expected in str(raised.value)


def test_config_query_sources_default_none():
    config = load_config(REPO_ROOT / "config" / "node.toml")
    assert config.query_sources == []


def test_config_query_source_example_parses():
    lines = (REPO_ROOT / "config" / "node.toml").read_text().splitlines()
    start = lines.index("# [[query_sources]]")
    end = lines.index("", start)
    example = "\n".join(line.removeprefix("# ") for line in lines[start:end])
    config = parse_config(tomllib.loads(example))
    assert config.query_sources[0].name == "pacs"
    assert config.query_sources[0].max_studies == 10


def test_config_query_source_defaults():
    config = parse_config({"query_sources": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}]})
    source = config.query_sources[0]
    assert source.retrieve_method.value == "move"
    assert source.query_timeout_seconds == 10
    assert source.retrieve_timeout_seconds == 60
    assert source.max_studies == 10


def test_config_duplicate_query_source_names_rejected():
    source = {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}
    with pytest.raises(ConfigError, match="query source names must be unique; repeated: pacs"):
        parse_config({"query_sources": [source, source]})


def test_config_duplicate_destination_names_rejected():
    destination = {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}
    with pytest.raises(ConfigError, match="repeated: pacs"):
        parse_config({"destinations": [destination, destination]})


@pytest.mark.parametrize("title", ["", "    ", "A\x01B", "ÄÖ", "X" * 17, "A\\B"])
def test_ae_title_invalid_values_rejected(title):
    with pytest.raises(ValueError):
        validate_ae_title(title)


def test_ae_title_surrounding_spaces_stripped():
    assert validate_ae_title(" PACS ") == "PACS"
