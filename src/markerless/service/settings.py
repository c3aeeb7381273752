"""Service settings: one strict pydantic section per concern, loaded from YAML with environment overrides.

`Settings.load(path)` reads `configs/markerless.yaml`; any field can be overridden from the environment as
`MARKERLESS__<SECTION>__<FIELD>` (e.g. `MARKERLESS__MQTT__HOST=broker`), which wins over the file so a container
can be retargeted without editing it. Unknown keys are refused so a typo fails at start, not at run time.
Relative paths in a file are relative to that file's directory. Secrets are never inline: the broker password
is read from a file (Docker/Kubernetes secret). `scenes.yaml` is its own file, read by `service.scenes_file`.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from markerless.pipeline.options import LocalizationOptions, WatchOptions
from markerless.pipeline.registration_options import SIFT_PROCESSES, UPLOAD_LIMITS
from markerless.scene.limits import IngestLimits

ENV_PREFIX = "MARKERLESS__"


def read_mapping(path: Path, what: str, shape: str) -> dict[str, Any]:
    """A YAML file that must hold a mapping; ValueError naming the file and what it should be."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: cannot read {what}: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: {what} must be {shape}")
    return data


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TlsSettings(_Section):
    """TLS towards the broker. When this section is present the service never connects without TLS."""

    ca_file: Path = Field(title="CA certificate", description="PEM file of the CA that signed the broker certificate.")
    cert_file: Path | None = Field(
        None, title="Client certificate", description="PEM client certificate, for brokers that require one."
    )
    key_file: Path | None = Field(None, title="Client key", description="PEM private key of `cert_file`.")
    insecure_skip_hostname_check: bool = Field(
        False,
        title="Skip hostname check",
        description="Accept a broker certificate issued for another host name (the CA is still verified).",
    )

    @model_validator(mode="after")
    def _cert_and_key_together(self) -> TlsSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("tls.cert_file and tls.key_file must be given together")
        return self


class MqttSettings(_Section):
    """Broker connection and session."""

    host: str = Field("localhost", min_length=1, title="Broker host", description="Host name or IP of the broker.")
    port: int = Field(1883, ge=1, le=65535, title="Broker port", description="1883 plain, 8883 TLS by convention.")
    client_id: str = Field(
        "markerless",
        min_length=1,
        max_length=128,
        title="Client id",
        description="Stable MQTT client id: the broker keeps this session's subscriptions and queued frames. "
        "'{hostname}' is replaced by the host name (distinct replicas from one configuration).",
    )
    protocol: Literal["3.1.1", "5"] = Field("3.1.1", title="MQTT version", description="'3.1.1' or '5'.")
    keepalive_s: int = Field(60, ge=5, le=3600, title="Keepalive", description="Seconds between PINGREQs.")
    session_expiry_s: int = Field(
        86400,
        ge=0,
        title="Session expiry",
        description="MQTT 5 only: how long the broker keeps the session while the service is away.",
    )
    reconnect_min_s: float = Field(1.0, gt=0, title="Reconnect delay min", description="First reconnect backoff.")
    reconnect_max_s: float = Field(30.0, gt=0, title="Reconnect delay max", description="Backoff ceiling.")
    connect_timeout_s: float = Field(
        30.0,
        gt=0,
        title="Connect timeout",
        description="How long start-up waits for the broker's CONNACK before giving up with an error.",
    )
    username: str | None = Field(None, title="Username", description="Broker user; requires `password_file`.")
    password_file: Path | None = Field(
        None, title="Password file", description="File holding the broker password (first line); a secret mount."
    )
    tls: TlsSettings | None = Field(None, title="TLS", description="TLS settings; absent means plain TCP.")
    topic_prefix: str = Field(
        "scenescape",
        pattern=r"^[^#+\s]+$",
        title="Topic prefix",
        description="First level(s) of every topic; SceneScape uses 'scenescape'.",
    )
    shared_group: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        title="Shared subscription group",
        description="Scale out: replicas with the same group share the request topics ($share/<group>/...), each "
        "request going to one of them. Requires protocol '5' and a distinct client_id per replica.",
    )

    @field_validator("client_id")
    @classmethod
    def _expand_hostname(cls, value: str) -> str:
        return value.replace("{hostname}", socket.gethostname())

    @model_validator(mode="after")
    def _credentials_together(self) -> MqttSettings:
        if (self.username is None) != (self.password_file is None):
            raise ValueError("mqtt.username and mqtt.password_file must be given together")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("mqtt.reconnect_max_s must be >= mqtt.reconnect_min_s")
        if self.shared_group is not None and self.protocol != "5":
            raise ValueError("mqtt.shared_group needs MQTT 5 shared subscriptions: set mqtt.protocol to '5'")
        return self

    def password(self) -> SecretStr | None:
        """Read the password file now (so a rotated secret is picked up on restart); errors name the file."""
        if self.password_file is None:
            return None
        try:
            text = self.password_file.read_text()
        except OSError as exc:
            raise ValueError(f"mqtt.password_file {self.password_file}: cannot read: {exc.strerror}") from exc
        lines = text.splitlines()
        if not lines or not lines[0]:
            raise ValueError(f"mqtt.password_file {self.password_file}: empty")
        return SecretStr(lines[0])


class WorkerSettings(_Section):
    """The calibration worker: the one thread that owns the models and the scene cache."""

    device: str | None = Field(
        None, title="Device", description="Torch device for the models; empty picks 'cuda' when present, else 'cpu'."
    )
    weights_dir: Path | None = Field(
        None, title="Weights directory", description="Where pretrained weights live; empty uses the default."
    )
    queue_size: int = Field(
        32, ge=1, le=10000, title="Queue size", description="Calibration requests waiting; beyond it: 'overloaded'."
    )
    deadline_s: float = Field(
        120.0,
        gt=0,
        title="Deadline",
        description="A request still queued this long after arrival gets 'timeout' (SceneScape's UI waits 200 s).",
    )
    max_payload_bytes: int = Field(
        32 * 1024 * 1024, ge=1024, title="Max payload", description="Larger frames are refused with 'too_large'."
    )
    stall_s: float = Field(
        120.0,
        gt=0,
        title="Stall limit",
        description="A worker busy with one request (or silent) this long is stalled: no `running` heartbeat, "
        "availability `stalled`, markerless_worker_alive 0, until it takes requests again.",
    )


class RegistrationSettings(_Section):
    """Scene registration, run in the background while calibrations continue."""

    queue_size: int = Field(
        16, ge=1, le=1000, title="Queue size", description="Registrations waiting behind the running one."
    )
    progress_interval_s: float = Field(
        1.0, ge=0, title="Progress interval", description="Minimum seconds between two progress messages."
    )
    on_start: bool = Field(
        True,
        title="Register on start",
        description="At start, register every scene of scenes.yaml that is new or whose dataset/config changed.",
    )
    dataset_dirs: list[Path] = Field(
        default_factory=list,
        title="Dataset directories",
        description="Directories a JSON register request may name a dataset in (besides the scene's own dataset).",
    )
    workers: int | None = SIFT_PROCESSES
    limits: IngestLimits = UPLOAD_LIMITS


class StoreSettings(_Section):
    """The scene store on disk."""

    root: Path = Field(Path("store"), title="Store root", description="Directory holding registered scene versions.")


class MetricsSettings(_Section):
    """Prometheus metrics over HTTP (off by default)."""

    port: int | None = Field(
        None, ge=1, le=65535, title="Port", description="Serve /metrics on this port; empty: no metrics endpoint."
    )
    host: str = Field("0.0.0.0", min_length=1, title="Bind address", description="Address the endpoint listens on.")


class HttpSettings(_Section):
    """The HTTP front door (SceneScape's REST v1 and Socket.IO), beside MQTT in the same process (off by default)."""

    port: int | None = Field(
        None, ge=1, le=65535, title="Port",
        description="Serve REST v1 and Socket.IO on this port; empty: no HTTP front door. SceneScape's is 8443 (TLS).",
    )
    host: str = Field("0.0.0.0", min_length=1, title="Bind address", description="Address the server listens on.")
    certfile: Path | None = Field(
        None, title="TLS certificate", description="PEM server certificate (chain); with `keyfile`, HTTPS only."
    )
    keyfile: Path | None = Field(None, title="TLS key", description="PEM private key of `certfile`.")
    client_ca_file: Path | None = Field(
        None, title="Client CA",
        description="PEM CA: clients must present a certificate it signed (mutual TLS). Needs certfile/keyfile.",
    )
    token_file: Path | None = Field(
        None, title="Token file",
        description="File holding a bearer token (first line; a secret mount): every request and Socket.IO "
        "connection must send `Authorization: Bearer <token>`. Empty: no token check.",
    )
    cors_origins: list[str] = Field(
        default_factory=list, title="CORS origins",
        description="Browser origins allowed to call the API and open Socket.IO (SceneScape's UI origin); "
        "empty: same-origin only (SceneScape's manager proxies /v1/).",
    )

    @model_validator(mode="after")
    def _tls_consistent(self) -> HttpSettings:
        if (self.certfile is None) != (self.keyfile is None):
            raise ValueError("http.certfile and http.keyfile must be given together")
        if self.client_ca_file is not None and self.certfile is None:
            raise ValueError("http.client_ca_file (mutual TLS) needs http.certfile and http.keyfile")
        return self

    def token(self) -> SecretStr | None:
        """Read the token file now (a rotated secret is picked up on restart); errors name the file."""
        if self.token_file is None:
            return None
        try:
            lines = self.token_file.read_text().splitlines()
        except OSError as exc:
            raise ValueError(f"http.token_file {self.token_file}: cannot read: {exc.strerror}") from exc
        if not lines or not lines[0].strip():
            raise ValueError(f"http.token_file {self.token_file}: empty")
        return SecretStr(lines[0].strip())


class Settings(BaseSettings):
    """All settings of `markerless serve`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        nested_model_default_partial_update=True,
    )

    mqtt: MqttSettings = Field(default_factory=MqttSettings, title="MQTT", description="Broker connection.")
    worker: WorkerSettings = Field(default_factory=WorkerSettings, title="Worker", description="Calibration worker.")
    registration: RegistrationSettings = Field(
        default_factory=RegistrationSettings, title="Registration", description="Background registration."
    )
    store: StoreSettings = Field(default_factory=StoreSettings, title="Store", description="Scene store.")
    localization: LocalizationOptions = Field(
        default_factory=LocalizationOptions, title="Localization",
        description="Inlier threshold and per-keyframe verification; SceneScape's gates are per scene.",
    )
    metrics: MetricsSettings = Field(default_factory=MetricsSettings, title="Metrics", description="Prometheus.")
    calibration: WatchOptions = Field(
        default_factory=WatchOptions, title="Calibration watch",
        description="Each camera's calibration kept, fused over its frames, watched and re-published when it moves.",
    )
    http: HttpSettings = Field(
        default_factory=HttpSettings, title="HTTP", description="SceneScape's REST v1 and Socket.IO front door."
    )
    state_dir: Path | None = Field(
        None,
        title="State directory",
        description="Where the service remembers answered request ids and accepted registrations across restarts "
        "(one subfolder per client id); empty: <store.root>/.service.",
    )
    scenes_file: Path | None = Field(
        None, title="Scenes file", description="YAML mapping scene id -> dataset/config/pose and camera id -> scene."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", title="Log level", description="Logging level of the service."
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment overrides the file (which arrives as init kwargs from `load`).
        return env_settings, init_settings

    @classmethod
    def load(cls, path: Path | None) -> Settings:
        """Read a YAML settings file (or none), apply environment overrides, resolve paths against the file."""
        data: dict[str, Any] = {}
        base = Path.cwd()
        if path is not None:
            path = Path(path)
            data = read_mapping(path, "settings", "a mapping of sections")
            base = path.resolve().parent
        return cls(**data).resolved(base)

    def resolved(self, base: Path) -> Settings:
        """Relative paths made absolute against `base` (the settings file's directory)."""

        def fix(p: Path | None) -> Path | None:
            return None if p is None else (p if p.is_absolute() else base / p)

        mqtt = self.mqtt
        tls = mqtt.tls
        if tls is not None:
            tls = tls.model_copy(
                update={"ca_file": fix(tls.ca_file), "cert_file": fix(tls.cert_file), "key_file": fix(tls.key_file)}
            )
        mqtt = mqtt.model_copy(update={"tls": tls, "password_file": fix(mqtt.password_file)})
        worker = self.worker.model_copy(update={"weights_dir": fix(self.worker.weights_dir)})
        registration = self.registration.model_copy(
            update={"dataset_dirs": [fix(p) for p in self.registration.dataset_dirs]}
        )
        store = self.store.model_copy(update={"root": fix(self.store.root)})
        http = self.http.model_copy(update={
            "certfile": fix(self.http.certfile), "keyfile": fix(self.http.keyfile),
            "client_ca_file": fix(self.http.client_ca_file), "token_file": fix(self.http.token_file),
        })
        return self.model_copy(
            update={
                "mqtt": mqtt,
                "worker": worker,
                "registration": registration,
                "store": store,
                "http": http,
                "scenes_file": fix(self.scenes_file),
                "state_dir": fix(self.state_dir),
            }
        )
