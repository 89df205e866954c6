"""`make demo`: the main job on an embedded offline default (no GPU, no internet).

    python -m dpo.demo

Builds the tiny offline Phi model and truthy-format rows, then runs recipes/dpo_phi2.py on
them for a few steps: the phi-2 QLoRA code path end to end (4-bit base, LoRA, reference =
adapters disabled).
"""

import runpy
import sys
from pathlib import Path

from dpo.tiny import save_tiny_model, truthy_like_rows, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    out = ROOT / "outputs" / "demo"
    model_dir = save_tiny_model(out / "tiny-phi")
    data = write_jsonl(truthy_like_rows(64), out / "truthy_sample.jsonl")
    sys.argv = [
        "dpo_phi2.py", "--model_name_or_path", str(model_dir), "--dataset_name", str(data),
        "--max_steps", "8", "--gradient_accumulation_steps", "1", "--eval_steps", "4", "--save_steps", "4",
        "--output_dir", str(out / "dpo_phi2_tiny"),
    ]
    runpy.run_path(str(ROOT / "recipes" / "dpo_phi2.py"), run_name="__main__")


if __name__ == "__main__":
    main()
