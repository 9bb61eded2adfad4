"""The run's data, before any model loads: the dataset read, checked and split, the output folder
checked, the base model resolved and a checkpoint found; then the records encoded as the model
trains on them, and the sample of training answers each evaluation checks for recall."""

from __future__ import annotations

import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..config import TrainConfig
from ..data import prompts
from ..data.dataset_file import read_records
from ..data.encoding import Encoded, encode_example
from ..data.records import Record, split_records
from ..model.weights import base_model_path
from .checkpoints import checkpoint_root, find_checkpoint, run_fingerprint
from .run_state import Data


def read_data(cfg: TrainConfig, base_model: str | None) -> Data:
    """The dataset read, checked and split, the base model resolved (--base_model, else
    `base_model`: TrainSettings.base_model, BASE_MODEL), and a checkpoint to resume."""
    records = read_records(cfg.data.data_path)  # bad data fails here, before any model loads
    data_bytes = Path(cfg.data.data_path).read_bytes()
    train_records, val_records = split_records(records, cfg.data.val_set_size, cfg.seed)
    check_output_writable(cfg.output_dir)
    template = prompts.load_template(cfg.data.prompt_template_name)
    base_path = base_model_path(cfg.base_model or base_model)
    fingerprint = run_fingerprint(cfg, data_bytes, base_path)
    checkpoint = find_checkpoint(cfg, fingerprint)
    return Data(records, data_bytes, train_records, val_records, template, base_path, fingerprint, checkpoint)


def check_output_writable(output_dir: str | Path, need_bytes: int = 64 << 20) -> None:
    """Fail before any model loads if the adapter could not be written at the end."""
    # A file where the adapter or its checkpoints go would fail the final rename, or the first
    # checkpoint, only after training has run.
    for path in (Path(output_dir), checkpoint_root(output_dir)):
        if path.exists() and not path.is_dir():
            raise FileExistsError(f"{path} is a file, not a folder; move it or choose another --output_dir")
    parent = Path(output_dir).resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise PermissionError(
            f"cannot write to {parent}: {exc.strerror}; choose another --output_dir"
        ) from exc
    free = shutil.disk_usage(parent).free
    if free < need_bytes:
        raise OSError(
            f"only {free >> 20} MiB free under {parent}; at least {need_bytes >> 20} MiB are needed"
        )


def encode_records(
    records: list[Record], tokenizer: Any, template: prompts.PromptTemplate, cfg: TrainConfig
) -> list[Encoded]:
    """Records as token ids and labels, in the order given."""
    d = cfg.data
    out = []
    for record in records:
        prompt, response = prompts.split_record(record, template, tokenizer)
        out.append(
            encode_example(prompt, response, tokenizer, d.cutoff_len, d.train_on_inputs, d.add_eos_token)
        )
    return out


def recall_sample(
    cfg: TrainConfig, records: list[Record], tokenizer: Any, template: prompts.PromptTemplate
) -> list[Encoded]:
    """A seeded sample of eval_recall training records, encoded as served: the prompt, then the
    answer and EOS as labels. Truncated records are left out: their served prompt differs."""
    order = list(range(len(records)))
    random.Random(cfg.seed + 1).shuffle(order)
    chosen: list[Encoded] = []
    for i in order:
        if len(chosen) == cfg.eval_recall:
            break
        prompt, response = prompts.split_record(records[i], template, tokenizer)
        encoded = encode_example(
            prompt, response, tokenizer, cfg.data.cutoff_len, False, cfg.data.add_eos_token
        )
        if not encoded.truncated:
            chosen.append(encoded)
    return chosen
