"""The YAML configuration: pydantic models, loaded once at start and never mutated.

Relative paths are relative to the config file's folder. Unknown keys are errors, so a typo
never silently falls back to a default.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from previewd import validation_errors
from previewd.catalog import MODELS
from previewd.errors import ConfigError
from previewd.spec import MODEL_IDS, ModelSource


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WatchConfig(_Strict):
    roots: tuple[Path, ...] = ()
    """Training folders watched besides the inbox (e.g. ai-toolkit's training_folder)."""
    polling: bool = False
    """Use the polling observer (network filesystems, where inotify sees nothing)."""
    settle_seconds: float = Field(5.0, ge=0)
    """A file counts as written once its size and mtime have not changed for this long."""
    rescan_seconds: float = Field(60.0, gt=0)
    """Full rescan period: watcher events can be lost (overflow, network filesystems)."""


class WorkerConfig(_Strict):
    lease_seconds: float = Field(300.0, gt=0)
    """A running job whose worker has not renewed its lease for this long is taken again."""
    heartbeat_seconds: float = Field(10.0, gt=0)
    max_attempts: int = Field(3, ge=1)
    retry_delay_seconds: float = Field(10.0, ge=0)
    idle_poll_seconds: float = Field(2.0, gt=0)
    min_free_vram_gb: float = Field(0.0, ge=0)
    """On CUDA, wait until at least this much device memory is free before loading a model, and at
    least the model's planned peak (memory:) in any case: training shares the GPU."""
    shutdown_timeout_seconds: float = Field(30.0, ge=0)


Placement = Literal["resident", "te_offload", "model_offload", "group_offload"]
PLACEMENTS: tuple[str, ...] = Placement.__args__  # type: ignore[attr-defined]


class MemoryConfig(_Strict):
    """How a model is laid out on the device (previewd.pipelines.memory plans it before loading)."""

    budget_gb: Annotated[float, Field(gt=0)] | Literal["auto"] = "auto"
    """Device memory previewd may use, in GiB; auto: what is free on the device when a model loads."""
    placement: Placement | Literal["auto"] = "auto"
    """auto: the fastest placement whose planned peak fits the budget; or always this one."""
    quantize_to_fit: Literal["none", "qfloat8"] = "none"
    """A full-precision run that fits only with group offload renders quantised instead (faster; the
    render records the parity gap)."""
    reserve_gb: float = Field(1.0, ge=0)
    """Kept free beside the planned peak: CUDA context, library workspaces, allocator fragmentation."""
    idle_release_minutes: float = Field(0.0, ge=0)
    """Unload the model after this long without a job, giving the memory back to training; 0: never."""


class OutputConfig(_Strict):
    format: Literal["png", "jpg"] = "png"
    dirname: str = "previews"
    """Folder created inside a training run for its previews."""
    grid: bool = True
    html: bool = True
    grid_aitk: bool = True
    """grid.png shows ai-toolkit's own sample beside each render that has one."""
    baseline: bool = False
    """Also render each run's prompts on the base model (no LoRA), like ai-toolkit's step-0 sample."""


class LimitsConfig(_Strict):
    """What one dropped file may cost previewd; beyond it the file is refused with the reason."""

    document_mb: float = Field(16.0, gt=0)
    """Largest request or run config read (MiB); base64 control images count."""
    document_nodes: int = Field(100_000, ge=100)
    """Values (lists, mappings, texts, numbers, keys) one request or run config may hold, aliases expanded."""
    yaml_alias_nodes: int = Field(1000, ge=0)
    """Nodes YAML aliases may add to a document in all (an alias repeats its anchor's whole subtree)."""
    max_depth: int = Field(32, ge=4, le=200)
    """Deepest nesting of lists and mappings in a request or run config."""
    prompts_per_file: int = Field(256, ge=1)
    """Prompts one request or run may name (sweeps multiply them further, up to 2048 renders)."""
    prompt_chars: int = Field(10000, ge=1)
    """Longest prompt or negative prompt, in characters."""
    checkpoint_gb: float = Field(8.0, gt=0)
    """Largest checkpoint (GiB), by its size and by the tensor bytes its header claims."""
    header_mb: float = Field(8.0, gt=0)
    """Largest safetensors header (MiB); it may also not exceed the tensor data by more than 1 MiB."""
    checkpoint_min_allocated: float = Field(0.5, ge=0, le=1)
    """A checkpoint of 16 MiB or more must occupy at least this share of its size on disk: a sparse
    file (holes) claims gigabytes it does not hold. 0 accepts sparse files (compressing filesystems)."""
    incomplete_checkpoint_minutes: float = Field(10.0, gt=0)
    """A checkpoint still shorter than its header says after this long without a change is refused."""
    image_mb: float = Field(20.0, gt=0)
    """Largest control image (file, download or decoded base64), MiB."""
    image_megapixels: float = Field(50.0, gt=0)
    """Largest control image in pixels (millions)."""

    def nbytes(self, name: str) -> int:
        """A size limit in bytes: `document_mb`, `checkpoint_gb`, ..."""
        scale = 2**30 if name.endswith("_gb") else 2**20
        return int(getattr(self, name) * scale)


class UrlsConfig(_Strict):
    """Control images given as http(s) URLs. Off unless hosts are listed."""

    allow_hosts: tuple[str, ...] = ()
    """Hosts control images may be downloaded from (`images.example.com`, or `*.example.com` for its
    subdomains). Empty: URLs are refused. Addresses that resolve to loopback, link-local, private or
    other non-public networks are refused whatever is listed."""
    timeout_seconds: float = Field(20.0, gt=0, le=600)
    """Total time one download may take, connection included."""

    @field_validator("allow_hosts")
    @classmethod
    def _hosts(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for host in value:
            bare = host.removeprefix("*.")
            if not bare or "/" in bare or ":" in bare or "*" in bare:
                raise ValueError(f"{host!r}: expected a host name such as images.example.com or *.example.com")
        return tuple(h.lower() for h in value)


class Config(_Strict):
    inbox: Path
    state_dir: Path
    database_url: str | None = None
    outbox_root: Path
    allowed_roots: tuple[Path, ...] = ()
    """Extra folders that files dropped into the inbox may name (control images, LoRAs)."""
    aitk_root: Path | None = None
    """ai-toolkit's own folder, the working directory it resolves relative paths against: a run's
    relative `ctrl_img` is looked up in the run folder first, then here, and a relative
    `name_or_path` here. Files read from it must still lie within `allowed_roots`."""
    device: str = "auto"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    parity: Literal["aitk", "reference"] = "aitk"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    watch: WatchConfig = WatchConfig()
    worker: WorkerConfig = WorkerConfig()
    memory: MemoryConfig = MemoryConfig()
    output: OutputConfig = OutputConfig()
    limits: LimitsConfig = LimitsConfig()
    urls: UrlsConfig = UrlsConfig()
    models: dict[str, ModelSource] = Field(default_factory=dict)

    @field_validator("log_level", mode="before")
    @classmethod
    def _log_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError("must be auto, cpu, cuda or cuda:N")

    @field_validator("models")
    @classmethod
    def _models(cls, value: dict[str, ModelSource]) -> dict[str, ModelSource]:
        unknown = sorted(set(value) - set(MODEL_IDS))
        if unknown:
            raise ValueError(f"unknown model id(s) {', '.join(unknown)} (known: {', '.join(MODEL_IDS)})")
        return value

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.state_dir / 'previewd.db').resolve()}"

    @property
    def snapshot_dir(self) -> Path:
        return self.state_dir / "checkpoints"

    @property
    def asset_dir(self) -> Path:
        return self.state_dir / "assets"

    @property
    def watch_roots(self) -> tuple[Path, ...]:
        return (self.inbox, *self.watch.roots)

    @property
    def confinement_roots(self) -> list[Path]:
        return [p.resolve() for p in (*self.watch_roots, *self.allowed_roots)]

    @property
    def output_roots(self) -> list[Path]:
        """Where the daemon writes: previews, error files beside inputs, the outbox."""
        return [*self.confinement_roots, self.outbox_root.resolve()]

    def model_source(self, model_id: str, base: str | None = None) -> ModelSource:
        """Where `model_id` loads from: the configured source, else its hub id (through the local
        cache). `base` is a run's own weights (RenderSpec.base): ai-toolkit loads the text encoder
        and VAE from there too, so only the quantisation setting is kept."""
        source = self.models.get(model_id) or ModelSource(path=MODELS[model_id].hub_id)
        if base is None or base == source.path:
            return source
        return ModelSource(path=base, quantize_text_encoder=source.quantize_text_encoder)


def _resolve_paths(data: dict, base: Path) -> dict:
    def fix(value):
        path = Path(value).expanduser()
        return path if path.is_absolute() else (base / path).resolve()

    for key in ("inbox", "state_dir", "outbox_root", "aitk_root"):
        if isinstance(data.get(key), str):
            data[key] = fix(data[key])
    if isinstance(data.get("allowed_roots"), list):
        data["allowed_roots"] = [fix(p) if isinstance(p, str) else p for p in data["allowed_roots"]]
    watch = data.get("watch")
    if isinstance(watch, dict) and isinstance(watch.get("roots"), list):
        watch["roots"] = [fix(p) if isinstance(p, str) else p for p in watch["roots"]]
    models = data.get("models")
    if isinstance(models, dict):
        for entry in models.values():
            # A local folder is written as a relative path; anything else (a hub id) stays as it is.
            for key in ("path", "text_encoder"):
                if isinstance(entry, dict) and isinstance(entry.get(key), str):
                    candidate = base / entry[key]
                    if entry[key].startswith((".", "/", "~")) or candidate.exists():
                        entry[key] = str(fix(entry[key]))
    return data


def format_validation_error(source: str, error: ValidationError) -> list[str]:
    """pydantic errors as "file: dotted.key: message (got value)" lines."""
    return [f"{source}: {line}" for line in validation_errors.format_validation_error(error, Config)]


def load_config(path: str | Path) -> Config:
    """Read and validate the config, reporting every problem at once as one ConfigError."""
    path = Path(path)
    try:
        # An open file, not its text: YAML errors then name the file rather than "<unicode string>".
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle) or {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a mapping of keys, got {type(data).__name__}")
    data = _resolve_paths(dict(data), path.resolve().parent)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError("invalid config:\n" + "\n".join(format_validation_error(str(path), exc))) from exc


CONFIG_ENV = "PREVIEWD_CONFIG"


def config_search_path() -> list[Path]:
    """Where a command without `-c` looks, in order: $PREVIEWD_CONFIG, ./config.yaml,
    $XDG_CONFIG_HOME/previewd/config.yaml (~/.config by default), /etc/previewd/config.yaml."""
    xdg = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    candidates = [Path("config.yaml"), xdg / "previewd" / "config.yaml", Path("/etc/previewd/config.yaml")]
    if os.environ.get(CONFIG_ENV):
        candidates.insert(0, Path(os.environ[CONFIG_ENV]))
    return candidates


def find_config(explicit: str | Path | None) -> Path:
    """The config a command uses: `-c` when given, else the first of `config_search_path()` that
    exists (an explicit $PREVIEWD_CONFIG must exist)."""
    if explicit is not None:
        return Path(explicit)
    from_env = os.environ.get(CONFIG_ENV)
    if from_env:
        return Path(from_env)
    for candidate in config_search_path():
        if candidate.is_file():
            return candidate
    searched = ", ".join(str(p) for p in config_search_path())
    raise ConfigError(f"no config given (-c) and none found in: {searched}; "
                      "create one with `previewd init DIR`")
