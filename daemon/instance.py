"""`previewd init`: a commented config, its folders, and optionally a CPU demo.

The demo (`--tiny --example`) builds tiny random-weight models and drops an ai-toolkit-like
training run (config.yaml + two checkpoints) and a request into the inbox, so `previewd run`
has real work on a machine with no GPU and no model download.
"""

from __future__ import annotations

from pathlib import Path

from previewd.errors import ConfigError
from previewd.spec import MODEL_IDS

CONFIG_TEMPLATE = """\
# previewd configuration. Relative paths are relative to this file's folder.

# Folder watched (recursively) for ai-toolkit training runs and request files.
inbox: ./inbox
# previewd's own state: the queue database and snapshots of accepted checkpoints.
state_dir: ./state
# SQLAlchemy URL of the job queue. Empty: SQLite in state_dir (one host).
# Several hosts share one PostgreSQL queue: postgresql+psycopg://user:pass@host/previewd
database_url:
# Where previews of requests that are not part of a training run are written.
outbox_root: ./outbox
# Extra folders that files dropped into the inbox may name (control images, LoRAs).
# The inbox and watch.roots are always allowed. Control images uploaded through ai-toolkit's UI
# live in its data folder (<dataRoot>/images/): add that folder here to render those runs.
allowed_roots: []
# ai-toolkit's own folder (where it runs from): relative ctrl_img paths of a run are looked up in
# the run folder first, then here; a relative name_or_path here. Empty: the run folder only.
aitk_root:
# auto (CUDA when available, else CPU), cpu, cuda or cuda:N.
device: auto
# auto (bfloat16 on CUDA, as ai-toolkit trains; float32 on CPU), bfloat16, float16 or float32.
dtype: auto
# aitk: look exactly like ai-toolkit's own training samples.
# reference: look like the reference inference server (the seeds' documented behaviour).
parity: aitk
# DEBUG, INFO, WARNING or ERROR.
log_level: INFO

watch:
  # Training folders watched besides the inbox (e.g. ai-toolkit's training_folder).
  roots: []
  # Poll instead of inotify (network filesystems).
  polling: false
  # A file is complete once its size and mtime stay unchanged this long (seconds).
  settle_seconds: {settle_seconds}
  # Full rescan period (seconds): file events can be lost.
  rescan_seconds: 60

worker:
  # A running job whose worker stops renewing its lease for this long is taken again.
  lease_seconds: 300
  # How often a worker renews its lease (seconds).
  heartbeat_seconds: 10
  # Attempts per job before it is marked failed.
  max_attempts: 3
  # First retry delay (seconds); doubles per attempt.
  retry_delay_seconds: 10
  # How often an idle worker looks for work (seconds).
  idle_poll_seconds: {idle_poll_seconds}
  # On CUDA, wait until at least this much GPU memory (GiB) is free before loading a model; the
  # model's planned peak (memory: below) is waited for in any case.
  min_free_vram_gb: 0
  # How long a stopping daemon waits for the current step before it exits anyway (seconds).
  shutdown_timeout_seconds: 30

# Before loading a model previewd computes what each component needs (from the safetensors headers
# and configs) and places it to fit; `previewd plan -c CONFIG` prints the plan without loading.
memory:
  # GPU memory previewd may use (GiB), or auto: what is free when a model loads.
  budget_gb: auto
  # auto: the fastest placement that fits the budget, or always one of: resident (all on the GPU),
  # te_offload (text encoder in host RAM, used only for prompts not yet cached), model_offload
  # (each component on the GPU only while it runs), group_offload (blocks streamed to the GPU).
  placement: auto
  # none, or qfloat8: a full-precision run that would need group_offload renders with a qfloat8
  # transformer and text encoder instead (much faster; renders record the parity gap).
  quantize_to_fit: none
  # GiB kept free beside the planned peak (CUDA context, workspaces, fragmentation).
  reserve_gb: 1
  # Unload the model after this many minutes without a job (gives the GPU back to training); 0: never.
  idle_release_minutes: 0

output:
  # Image format: png (lossless, carries the render record) or jpg.
  format: png
  # Folder created inside each training run for its previews.
  dirname: previews
  # Also write grid.png (rows: checkpoints, columns: prompts) and index.html.
  grid: true
  html: true
  # grid.png puts ai-toolkit's own sample of the same step beside each render that has one.
  grid_aitk: true
  # Also render each training run's prompts on the base model (no LoRA), like ai-toolkit's
  # step-0 baseline sample: a "base model" row in the grid.
  baseline: false

# What one file dropped into the inbox or a training folder may cost; beyond it the file is refused
# with the reason in <file>.error.txt (README: threat model and limits).
limits:
  # Largest request or run config (MiB), base64 control images included.
  document_mb: 16
  # Values (lists, mappings, texts, numbers, keys) one document may hold, aliases expanded; and
  # how many of them YAML aliases may add in all (an alias repeats its anchor's subtree).
  document_nodes: 100000
  yaml_alias_nodes: 1000
  # Deepest nesting of lists and mappings.
  max_depth: 32
  # Prompts per request or run, and the longest prompt (characters).
  prompts_per_file: 256
  prompt_chars: 10000
  # Largest checkpoint (GiB), by size and by the tensor bytes its header claims.
  checkpoint_gb: 8
  # Largest safetensors header (MiB); it may not exceed the tensor data by more than 1 MiB either.
  header_mb: 8
  # A checkpoint of 16 MiB or more must occupy this share of its size on disk (a sparse file claims
  # space it does not hold); 0 accepts sparse files, e.g. on a compressing filesystem.
  checkpoint_min_allocated: 0.5
  # A checkpoint still shorter than its header says after this many minutes without a change is
  # refused (a crashed save); until then it is waited for.
  incomplete_checkpoint_minutes: 10
  # Largest control image: file size (MiB) and pixels (millions). PNG, JPEG and WebP only.
  image_mb: 20
  image_megapixels: 50

# Control images given as http(s) URLs. Off unless hosts are listed here; addresses that resolve to
# loopback, link-local or private networks are refused whatever is listed, and so are redirects to
# another host.
urls:
  # e.g. [images.example.com, "*.cdn.example.com"]
  allow_hosts: []
  # Total time one download may take (seconds); its size counts against limits.image_mb.
  timeout_seconds: 20

# Where each model's weights come from: a hub id (read from your Hugging Face cache; previewd
# never downloads) or a local diffusers-layout folder. text_encoder: optional separate source
# of the text encoder; quantize_text_encoder: none or qfloat8 (optimum-quanto), for renders that do not
# say (the reference profile, requests without aitk.quantize_te); a run quantises as it trained.
models:
{models}"""

_HUB = {
    "qwen_image": "Qwen/Qwen-Image",
    "qwen_image_2512": "Qwen/Qwen-Image-2512",
    "qwen_image_edit": "Qwen/Qwen-Image-Edit",
    "qwen_image_edit_plus": "Qwen/Qwen-Image-Edit-2509",
    "qwen_image_edit_plus_2511": "Qwen/Qwen-Image-Edit-2511",
    "flux2": "black-forest-labs/FLUX.2-dev",
}


def render_config(*, tiny_models_dir: str | None = None, settle_seconds: float = 5,
                  idle_poll_seconds: float = 2) -> str:
    lines = []
    for model_id in MODEL_IDS:
        path = f"{tiny_models_dir}/{model_id}" if tiny_models_dir else _HUB[model_id]
        lines.append(f"  {model_id}:\n    path: {path}\n    quantize_text_encoder: none\n")
    return CONFIG_TEMPLATE.format(models="".join(lines), settle_seconds=settle_seconds,
                                  idle_poll_seconds=idle_poll_seconds)


EXAMPLE_RUN = """\
# An ai-toolkit job config as ai-toolkit writes it into its run folder (config.yaml).
job: extension
config:
  name: example_lora
  process:
    - type: sd_trainer
      training_folder: {training_folder}
      trigger_word: p3r5on
      network:
        type: lora
        linear: 4
        linear_alpha: 4
      save:
        dtype: bf16
        save_every: 250
        max_step_saves_to_keep: 4
      model:
        name_or_path: Qwen/Qwen-Image-2512
        arch: "qwen_image:2512"
        quantize: false
        low_vram: false
      sample:
        sampler: flowmatch
        sample_every: 250
        width: 64
        height: 64
        prompts:
          - "[trigger] a red fox sitting in fresh snow, golden hour"
          - "[trigger] holding a sign that says hello --seed 7"
        neg: ""
        seed: 42
        walk_seed: true
        guidance_scale: 4
        sample_steps: 4
meta:
  name: "[name]"
  version: "1.0"
"""

EXAMPLE_REQUEST = """\
# A render request in the reference server's format (the seeds), plus previewd's own keys.
model: qwen_image_2512
trigger_word: p3r5on
prompts:
  - prompt: "[trigger] a lighthouse on a cliff at dusk"
    width: 64
    height: 64
    seed: 42
    sample_steps: 4
    guidance_scale: 4.0
    neg: ""
loras:
  - path: example_lora/example_lora_000000500.safetensors
    network_multiplier: 1.0
"""


def init_instance(folder: Path, *, tiny: bool = False, example: bool = False, force: bool = False) -> Path:
    """Create `folder/config.yaml` and its folders; returns the config path."""
    folder = folder.resolve()
    config_path = folder / "config.yaml"
    if config_path.exists() and not force:
        raise ConfigError(f"{config_path} exists; pass --force to overwrite it")
    if example and not tiny:
        raise ConfigError("--example renders on tiny models: use it together with --tiny")
    for sub in ("inbox", "state", "outbox"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    if tiny:
        from previewd.pipelines.tiny import build_all

        build_all(folder / "models")
    # The demo settles fast so a first run finishes quickly; real checkpoints want the default.
    demo = {"settle_seconds": 1, "idle_poll_seconds": 0.5} if example else {}
    config_path.write_text(render_config(tiny_models_dir="./models" if tiny else None, **demo))
    if example:
        write_example(folder / "inbox", folder / "models" / "qwen_image_2512")
    return config_path


def write_example(inbox: Path, model_dir: Path) -> None:
    from previewd.pipelines.tiny.qwen import write_random_lora

    run = inbox / "example_lora"
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(EXAMPLE_RUN.format(training_folder=inbox))
    for step, seed in ((250, 1), (500, 2)):
        write_random_lora(model_dir, run / f"example_lora_{step:09d}.safetensors", seed=seed, step=step)
    (inbox / "example_request.yaml").write_text(EXAMPLE_REQUEST)
