"""The README's memory table: each model's plan for common card sizes, computed from the released
architectures on the meta device (no weights, no GPU needed).

    .venv/bin/python bench/memory_table.py [--budgets 24 32 48 80 141]
"""

from __future__ import annotations

import argparse
import sys

from previewd.pipelines.memory import GiB, MemorySettings, Precision, choose, measure
from previewd.spec import MODEL_IDS

SCENARIOS = {
    "bf16 run": (Precision(), "none"),
    "bf16 run, `quantize_to_fit: qfloat8`": (Precision(), "qfloat8"),
    "quantised run (ai-toolkit's example configs)": None,
}
SHORT = {"resident": "resident", "te_offload": "TE off", "model_offload": "model offload",
         "group_offload": "group offload"}


def _aitk_quantised(model_id: str) -> Precision:
    # The example configs: Qwen uint3 (+ ARA) transformer, FLUX.2 qfloat8; qfloat8 text encoder.
    return Precision(transformer="qfloat8" if model_id == "flux2" else "uint3", text_encoder="qfloat8")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[24, 32, 48, 80, 141])
    args = parser.parse_args()
    print("| model | run | " + " | ".join(f"{b:g} GiB" for b in args.budgets) + " |")
    print("|---|---|" + "---|" * len(args.budgets))
    for model_id in MODEL_IDS:
        sizes = measure(model_id, None, "bfloat16")
        for label, scenario in SCENARIOS.items():
            run, fallback = scenario if scenario is not None else (_aitk_quantised(model_id), "none")
            cells = []
            for budget in args.budgets:
                plan = choose(model_id, sizes, device="cuda", dtype="bfloat16", run_precision=run,
                              settings=MemorySettings(budget_bytes=int(budget * GiB), quantize_to_fit=fallback))
                quantised = f" ({plan.precision.transformer}/{plan.precision.text_encoder})" \
                    if plan.precision.quantized else ""
                cells.append(f"{SHORT[plan.placement]}{quantised}, {plan.peak_bytes / GiB:.1f}")
            print(f"| `{model_id}` | {label} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
