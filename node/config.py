"""Node configuration: one TOML file, validated completely at start.

An invalid file raises `ConfigError`, whose message names the key, the bad value and the
expected form, so that the node never starts on a half-understood configuration.
"""

from __future__ import annotations

import ipaddress
import tomllib
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

AE_TITLE_MAX_LENGTH = 16
ADMIN_TOKEN_MIN_LENGTH = 16


class ConfigError(ValueError):
    """The configuration file is missing, is not TOML, or contains an invalid value."""


def validate_ae_title(value: str) -> str:
    """Check an AE title against PS3.5 (AE value representation) and return it stripped.

    An AE title has 1 to 16 characters of the default repertoire, no backslash, no control
    characters, and is not all spaces. Leading and trailing spaces are not significant.

    Raises
    ------
    ValueError
        When the title breaks one of these rules; the message names the rule.
    """
    if not isinstance(value, str):
        raise ValueError(f"an AE title must be a string, not {type(value).__name__}")
    if len(value) > AE_TITLE_MAX_LENGTH:
        raise ValueError(f"AE title {value!r} has {len(value)} characters; the maximum is 16")
    if any(ord(character) < 0x20 or ord(character) == 0x7F for character in value):
        raise ValueError(f"AE title {value!r} contains a control character")
    if "\\" in value:
        raise ValueError(f"AE title {value!r} contains a backslash")
    if any(ord(character) > 0x7E for character in value):
        raise ValueError(f"AE title {value!r} contains a character outside ASCII")
    stripped = value.strip(" ")
    if not stripped:
        raise ValueError("AE title is empty or all spaces; give 1 to 16 characters")
    return stripped


AETitle = Annotated[str, AfterValidator(validate_ae_title)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SRClass(str, Enum):
    """The SR storage SOP class written for a destination."""

    ENHANCED = "enhanced"
    COMPREHENSIVE = "comprehensive"
    BASIC_TEXT = "basic_text"


class _TLSFiles(_Section):
    """The TLS keys shared by the listener and the destinations."""

    tls: bool = False
    tls_certificate_file: Path | None = None
    tls_private_key_file: Path | None = None
    tls_ca_file: Path | None = None

    def _check_tls_keys(self, prefix: str, certificate_required: bool) -> None:
        files = {
            "tls_certificate_file": self.tls_certificate_file,
            "tls_private_key_file": self.tls_private_key_file,
            "tls_ca_file": self.tls_ca_file,
        }
        configured_keys = [key for key, value in files.items() if value is not None]
        if not self.tls and configured_keys:
            raise ValueError(f"{prefix}{', '.join(configured_keys)} set but tls = false; set tls = true or remove them")
        if (self.tls_certificate_file is None) != (self.tls_private_key_file is None):
            raise ValueError(f"{prefix}give tls_certificate_file and tls_private_key_file together")
        if self.tls and certificate_required and self.tls_certificate_file is None:
            raise ValueError(f"{prefix}tls = true needs tls_certificate_file and tls_private_key_file")

    def _resolved_tls_files(self, base_dir: Path) -> dict[str, Path]:
        resolved = {}
        for key in ("tls_certificate_file", "tls_private_key_file", "tls_ca_file"):
            value = getattr(self, key)
            if value is not None and not value.is_absolute():
                resolved[key] = (base_dir / value).resolve()
        return resolved


class NodeSettings(_TLSFiles):
    """The `[node]` table: identity, listener and storage.

    With `tls = true` the listener accepts only DICOM TLS connections (TLS 1.2 or newer).
    When `tls_ca_file` is also set, callers must present a certificate that it signed.
    """

    ae_title: AETitle = "LIBRA_NODE"
    bind_address: str = "0.0.0.0"
    port: int = Field(default=11112, ge=1, le=65535)
    data_dir: Path = Path("var")
    database_url: str = ""
    study_stable_seconds: float = Field(default=30.0, ge=0)
    max_associations: int = Field(default=20, ge=1)
    acse_timeout_seconds: float = Field(default=30.0, gt=0)
    dimse_timeout_seconds: float = Field(default=60.0, gt=0)
    network_timeout_seconds: float = Field(default=60.0, gt=0)
    max_pdu_bytes: int = Field(default=262144, ge=0)
    free_disk_reserve_mb: int = Field(default=1024, ge=0)
    max_prior_age_days: int = Field(default=3650, ge=1)
    stability_check_seconds: float = Field(default=0.5, gt=0)

    @field_validator("bind_address")
    @classmethod
    def _check_bind_address(cls, value: str) -> str:
        try:
            ipaddress.ip_address(value)
        except ValueError as exc:
            raise ValueError(f"{value!r} is not an IP address such as 0.0.0.0 or 127.0.0.1") from exc
        return value

    @model_validator(mode="after")
    def _check_tls(self) -> "NodeSettings":
        self._check_tls_keys("", certificate_required=True)
        return self


class CallerSettings(_Section):
    """One `[[callers]]` entry: a calling AE title allowed to store, optionally from one host."""

    ae_title: AETitle
    host: str = ""


class DestinationSettings(_TLSFiles):
    """One `[[destinations]]` entry: a PACS that receives the draft SRs.

    With `tls = true` the sender verifies the PACS certificate against `tls_ca_file` (or the
    system's trust store) and its host name against `tls_server_hostname` (or `host`), and
    presents `tls_certificate_file` when the PACS requires mutual TLS.
    """

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    ae_title: AETitle
    host: str
    port: int = Field(ge=1, le=65535)
    sr_class: SRClass = SRClass.ENHANCED
    max_attempts: int = Field(default=10, ge=1)
    retry_backoff_seconds: float = Field(default=5.0, gt=0)
    max_backoff_seconds: float = Field(default=600.0, gt=0)
    timeout_seconds: float = Field(default=30.0, gt=0)
    tls_server_hostname: str = ""

    @model_validator(mode="after")
    def _check_tls(self) -> "DestinationSettings":
        self._check_tls_keys(f"destination {self.name!r}: ", certificate_required=False)
        if self.tls_server_hostname and not self.tls:
            raise ValueError(f"destination {self.name!r}: tls_server_hostname set but tls = false")
        return self


class RetrieveMethod(str, Enum):
    """The retrieve method of a query source: C-MOVE or C-GET."""

    MOVE = "move"
    """C-MOVE: the PACS opens its own association to the node's receiver to send the image."""

    GET = "get"
    """C-GET: the PACS sends the image back on the node's association (SCP/SCU role selection)."""


class QuerySourceSettings(_TLSFiles):
    """One `[[query_sources]]` entry: a PACS queried for prior studies (Study Root C-FIND).

    With `tls = true` the queries and retrieves run over DICOM TLS, checked as for a
    destination. A C-MOVE still arrives on the node's own listener.
    """

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    ae_title: AETitle
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    retrieve_method: RetrieveMethod = RetrieveMethod.MOVE
    query_timeout_seconds: float = Field(default=10.0, gt=0)
    retrieve_timeout_seconds: float = Field(default=60.0, gt=0)
    max_studies: int = Field(default=10, ge=1, le=1000)
    tls_server_hostname: str = ""

    @model_validator(mode="after")
    def _check_tls(self) -> "QuerySourceSettings":
        self._check_tls_keys(f"query source {self.name!r}: ", certificate_required=False)
        if self.tls_server_hostname and not self.tls:
            raise ValueError(f"query source {self.name!r}: tls_server_hostname set but tls = false")
        return self


class ModelSettings(_Section):
    """The `[model]` table: which Libra checkpoint writes the drafts, and how."""

    path: str = ""
    vision_tower_path: str = ""
    device: str = "auto"
    dtype: str = "auto"
    max_new_tokens: int = Field(default=256, ge=1, le=4096)
    dicom_conversion: Literal["mimic", "released"] = "mimic"
    feature_cache_size: int = Field(default=32, ge=0)
    feature_cache_dir: str = "feature_cache"

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if value not in ("auto", "cpu") and not value.startswith("cuda"):
            raise ValueError(f"{value!r} is not a device; use 'auto', 'cpu', 'cuda' or 'cuda:N'")
        return value


class RoutingSettings(_Section):
    """The `[routing]` table: which studies get a draft report."""

    modalities: list[str] = ["CR", "DX"]
    body_parts: list[str] = ["CHEST", "THORAX"]
    description_keywords: list[str] = ["CHEST", "THORAX", "CXR", "LUNG"]


class WorkerSettings(_Section):
    """The `[worker]` table: report jobs."""

    enabled: bool = True
    max_attempts: int = Field(default=3, ge=1)
    lease_seconds: float = Field(default=300.0, gt=0)
    poll_seconds: float = Field(default=0.5, gt=0)
    max_batch_size: int = Field(default=4, ge=1)


class ReportSettings(_Section):
    """The `[report]` table: the SR series the node writes."""

    series_number: int = Field(default=9901, ge=0)
    series_description: str = Field(default="AI DRAFT - NOT VERIFIED", max_length=64)
    manufacturer: str = "libra-node project"
    institution_name: str = ""


class LoggingSettings(_Section):
    """The `[logging]` table."""

    format: Literal["json", "console"] = "json"
    level: Literal["debug", "info", "warning", "error"] = "info"


class AdminSettings(_Section):
    """The `[admin]` table: the HTTP endpoint for health, metrics, the status page and the API."""

    enabled: bool = True
    bind_address: str = "127.0.0.1"
    port: int = Field(default=11180, ge=0, le=65535)
    token: SecretStr = SecretStr("")

    @field_validator("bind_address")
    @classmethod
    def _check_bind_address(cls, value: str) -> str:
        try:
            ipaddress.ip_address(value)
        except ValueError as exc:
            raise ValueError(f"{value!r} is not an IP address such as 127.0.0.1") from exc
        return value

    @field_validator("token")
    @classmethod
    def _check_token(cls, value: SecretStr) -> SecretStr:
        length = len(value.get_secret_value())
        if length and length < ADMIN_TOKEN_MIN_LENGTH:
            raise ValueError(
                f"the admin token has {length} characters; use at least {ADMIN_TOKEN_MIN_LENGTH} "
                "(for example the output of 'openssl rand -hex 32')"
            )
        return value

    @model_validator(mode="after")
    def _require_token_off_loopback(self) -> "AdminSettings":
        if self.enabled and not self.is_loopback and not self.token.get_secret_value():
            raise ValueError(
                f"the admin endpoint is bound to {self.bind_address}, which is not a loopback address, "
                "so admin.token must be set; or bind it to 127.0.0.1"
            )
        return self

    @property
    def is_loopback(self) -> bool:
        """Whether the endpoint listens on a loopback address only."""
        return ipaddress.ip_address(self.bind_address).is_loopback


class RetentionSettings(_Section):
    """The `[retention]` table: when received images and sent SRs are removed from the store."""

    max_age_days: float = Field(default=0.0, ge=0)
    check_interval_seconds: float = Field(default=3600.0, gt=0)


class NodeConfig(_Section):
    """The whole configuration file."""

    node: NodeSettings = NodeSettings()
    callers: list[CallerSettings] = []
    destinations: list[DestinationSettings] = []
    query_sources: list[QuerySourceSettings] = []
    model: ModelSettings = ModelSettings()
    routing: RoutingSettings = RoutingSettings()
    worker: WorkerSettings = WorkerSettings()
    report: ReportSettings = ReportSettings()
    logging: LoggingSettings = LoggingSettings()
    admin: AdminSettings = AdminSettings()
    retention: RetentionSettings = RetentionSettings()

    @model_validator(mode="after")
    def _check_unique_names(self) -> "NodeConfig":
        names = [destination.name for destination in self.destinations]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"destination names must be unique; repeated: {', '.join(duplicates)}")
        return self

    @model_validator(mode="after")
    def _check_unique_query_source_names(self) -> "NodeConfig":
        names = [source.name for source in self.query_sources]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"query source names must be unique; repeated: {', '.join(duplicates)}")
        return self

    def resolve_paths(self, base_dir: Path) -> "NodeConfig":
        """Return a copy whose relative `data_dir` and TLS file paths are resolved against `base_dir`."""
        data_dir = self.node.data_dir if self.node.data_dir.is_absolute() else base_dir / self.node.data_dir
        node = self.node.model_copy(update={"data_dir": data_dir.resolve(), **self.node._resolved_tls_files(base_dir)})
        destinations = [
            destination.model_copy(update=destination._resolved_tls_files(base_dir))
            for destination in self.destinations
        ]
        query_sources = [source.model_copy(update=source._resolved_tls_files(base_dir)) for source in self.query_sources]
        return self.model_copy(update={"node": node, "destinations": destinations, "query_sources": query_sources})

    @property
    def database_url(self) -> str:
        """The SQLAlchemy URL of the index: the configured one, or SQLite in `data_dir`."""
        if self.node.database_url:
            return self.node.database_url
        return f"sqlite:///{self.node.data_dir / 'index.sqlite3'}"


def _describe_error(error: dict[str, Any]) -> str:
    location = ".".join(str(part) for part in error["loc"]) or "(top level)"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return f"{location}: unknown key; check its spelling against config/node.toml"
    if error["type"] == "missing":
        return f"{location}: required key is missing"
    if location.endswith("token") or location == "admin":
        # The value is, or contains, a secret that must not reach logs or terminals.
        return f"{location}: {message}"
    if isinstance(error.get("input"), dict):
        # A check across several keys of one table: the message names them.
        return f"{location}: {message}"
    return f"{location} = {error.get('input')!r}: {message}"


def parse_config(data: dict[str, Any], source: str = "configuration") -> NodeConfig:
    """Validate a parsed TOML document and return the configuration.

    Raises
    ------
    ConfigError
        With one line per invalid key: the key, its value and the expected form.
    """
    try:
        return NodeConfig.model_validate(data)
    except ValidationError as exc:
        lines = [_describe_error(error) for error in exc.errors()]
        raise ConfigError(f"invalid {source}:\n  " + "\n  ".join(lines)) from exc


def load_config(path: Path | str) -> NodeConfig:
    """Read and validate a TOML configuration file.

    A relative `data_dir` is taken relative to the folder that contains the file.

    Raises
    ------
    ConfigError
        When the file is missing, is not valid TOML, or contains an invalid value.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"configuration file {path} not found; copy config/node.toml and edit it") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"configuration file {path} is not valid TOML: {exc}") from exc
    return parse_config(data, source=f"configuration file {path}").resolve_paths(path.parent.resolve())
