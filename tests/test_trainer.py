"""The training engine on a tiny in-process Llama: end to end, resume, DDP, bad data, artifacts."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import alpaca_records, build_tiny_llama
from safetensors.torch import load_file

from finetune.cog.cogtools import free_port
from finetune.config import ConfigError, TrainConfig
from finetune.model.loading import ModelError
from finetune.settings import TrainSettings
from finetune.training.cli import config_from_args
from finetune.training.cli import main as cli_main
from finetune.training.distributed import check_strategy
from finetune.training.schedule import plan_steps
from finetune.training.stopping import TrainingStopped
from finetune.training.trainer import checkpoint_root, train

ROOT = Path(__file__).resolve().parent.parent


def tiny_args(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--base_model",
        str(model_dir),
        "--data_path",
        str(data),
        "--output_dir",
        str(out),
        "--micro_batch_size",
        "2",
        "--batch_size",
        "4",
        "--cutoff_len",
        "256",
        "--val_set_size",
        "4",
        "--learning_rate",
        "1e-2",
        "--lora_r",
        "4",
        "--logging_steps",
        "1",
        *extra,
    ]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "finetune.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


def test_cli_flags_env_and_list_values():
    cfg = config_from_args(
        ["--lora_target_modules", "[q_proj,k_proj]", "--micro_batch_size", "2"],
        environ={"MICRO_BATCH_SIZE": "8", "EPOCHS": "5", "DATA_PATH": "x.json"},
    )
    assert cfg.micro_batch_size == 2  # the flag wins over the environment
    assert cfg.num_epochs == 5 and cfg.data.data_path == "x.json"
    assert cfg.lora.lora_target_modules == ["q_proj", "k_proj"]
    assert config_from_args(
        ["--lora_target_modules", "q_proj, v_proj"], environ={}
    ).lora.lora_target_modules == ["q_proj", "v_proj"]
    assert config_from_args(["--train_on_inputs", "False"], environ={}).data.train_on_inputs is False
    assert config_from_args(["--train_on_inputs"], environ={}).data.train_on_inputs is True


def test_num_epochs_reads_auto_or_a_number():
    assert config_from_args([], environ={}).num_epochs is None  # auto is the default
    assert config_from_args(["--num_epochs", "auto"], environ={"EPOCHS": "2"}).num_epochs is None
    assert config_from_args([], environ={"EPOCHS": "auto"}).num_epochs is None
    assert config_from_args(["--num_epochs", "1.5"], environ={}).num_epochs == 1.5
    with pytest.raises(SystemExit):
        config_from_args(["--num_epochs", "lots"], environ={})


@pytest.mark.parametrize(
    "settings, records, steps_per_epoch, steps, rule",
    [
        ({}, 48, 6, 180, "30 epochs"),  # a few dozen records: the 30-epoch cap
        ({}, 300, 37.5, 375, "10 epochs"),  # 3,000 examples over 300 records
        ({}, 3000, 375, 1125, "3 epochs"),  # 3,000 records: alpaca-lora's 3 epochs
        ({}, 18, 2.5, 75, "30 epochs"),  # a fractional step per epoch still counts
        ({}, 7, 1, 60, "would be under 60 steps: 60 epochs"),  # too few updates: the step floor
        ({"num_epochs": 1}, 48, 6, 6, "num_epochs=1"),  # explicit epochs are exact
        ({"num_epochs": 0.5}, 48, 6, 3, "num_epochs=0.5"),
        ({"max_steps": 7, "num_epochs": 2}, 48, 6, 7, "max_steps=7"),
    ],
)
def test_training_length(settings, records, steps_per_epoch, steps, rule):
    got, reason = plan_steps(TrainConfig(**settings), steps_per_epoch, records)
    assert got == steps and rule in reason


def test_an_explicit_epoch_count_is_exact(tiny_model_dir, tiny_data, tmp_path):
    out = tmp_path / "adapter"
    result = train(
        config_from_args(tiny_args(tiny_model_dir, tiny_data, out, "--num_epochs", "1"), environ={})
    )
    # 20 training records / micro-batch 2 / accumulation 2 = 5 steps (auto would plan 30 epochs).
    assert result.card["training"]["steps"] == 5
    assert result.card["training"]["steps_rule"] == "num_epochs=1"
    assert "Training length: num_epochs=1" in (out / "README.md").read_text()
    # The memory plan it ran under: auto on a CPU settles on the fastest setting, no limit.
    memory = result.card["training"]["memory_plan"]
    assert memory["fits"] and memory["gpu_memory"] is None and memory["peak_bytes"] > 0
    assert (
        memory["settings"]["quantization"] == "none" and memory["settings"]["gradient_checkpointing"] is False
    )
    assert result.card["config"]["quantization"] == "none"  # the settled value, not auto


def test_a_batch_size_that_does_not_divide_says_what_a_step_trains_on(tiny_model_dir, tiny_data, tmp_path):
    lines: list[str] = []
    args = tiny_args(tiny_model_dir, tiny_data, tmp_path / "adapter", "--max_steps", "1", "--batch_size", "5")
    result = train(config_from_args(args, environ={}), log=lines.append)
    assert result.card["training"]["gradient_accumulation"] == 2
    assert (
        "batch_size=5 is not a multiple of micro_batch_size 2 x 1 process(es): each step trains on 4"
        in "\n".join(lines)
    )


def test_help_lists_every_flag_with_its_default():
    out = run_cli("--help").stdout
    for flag in (
        "--base_model",
        "--data_path",
        "--output_dir",
        "--batch_size",
        "--micro_batch_size",
        "--num_epochs",
        "--learning_rate",
        "--cutoff_len",
        "--val_set_size",
        "--lora_r",
        "--lora_alpha",
        "--lora_dropout",
        "--lora_target_modules",
        "--train_on_inputs",
        "--add_eos_token",
        "--group_by_length",
        "--wandb_project",
        "--wandb_run_name",
        "--wandb_watch",
        "--wandb_log_model",
        "--resume_from_checkpoint",
        "--prompt_template_name",
    ):
        assert flag in out
    assert "(default: 0.001)" in out and "(default: 256)" in out


def test_invalid_settings_name_the_setting():
    result = run_cli("--micro_batch_size", "8", "--batch_size", "4", "--lora_dropout", "1.5")
    assert result.returncode == 2
    assert "batch_size=4 is smaller than micro_batch_size=8" in result.stderr
    assert "lora_dropout=1.5" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"{not json", "line 1"),
        (b'{"instruction": "a", "output": "b"}', "list"),
        (
            json.dumps([{"instruction": "q", "output": "a"}] * 16 + [{"instruction": "q"}]).encode(),
            "record 17",
        ),
        (json.dumps([{"instruction": "q", "output": ""}]).encode(), "record 1"),
        (
            json.dumps([{"instruction": "q", "output": "a"}, {"prompt": "p", "completion": "c"}]).encode(),
            "mixes record shapes",
        ),
        ('[{"instruction": "caf\u00e9", "output": "x"}]'.encode("latin-1"), "UTF-8"),
    ],
    ids=["not-json", "wrong-top-level", "missing-field-17", "empty-output", "mixed-shapes", "not-utf8"],
)
def test_invalid_data_exits_2_and_writes_nothing(tmp_path, capsys, content, expected):
    # In process, through the CLI's own main (the subprocess CLI is checked above: each process
    # here paid ~8 s importing torch); an uncaught exception would fail the test.
    data = tmp_path / "bad.json"
    data.write_bytes(content)
    out = tmp_path / "adapter"
    assert cli_main(["--data_path", str(data), "--output_dir", str(out)]) == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("error: ") and expected.lower() in stderr.lower(), stderr
    assert "Traceback" not in stderr
    assert not out.exists() and not checkpoint_root(out).exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad.json"]


def test_train_end_to_end_writes_a_verified_adapter_and_card(tiny_model_dir, tiny_data, tmp_path):
    out = tmp_path / "adapter"
    result = train(
        config_from_args(tiny_args(tiny_model_dir, tiny_data, out, "--max_steps", "6"), environ={})
    )
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "loss.png",
        "prompt_template.json",
        "training_card.json",
    ]
    card = json.loads((out / "training_card.json").read_text())
    assert card == json.loads(json.dumps(result.card, default=str))
    assert card["training"]["steps"] == 6 and len(card["history"]["steps"]) == 6
    assert card["data"]["train_records"] == 20 and card["data"]["val_records"] == 4
    assert card["data"]["sha256"].startswith("sha256:")
    assert card["template"]["name"] == "alpaca"
    assert card["eval"]["val_loss"] < card["eval"]["base_val_loss"]
    assert card["adapter"]["tensors"] == 2 * 7 * 2  # 2 layers x 7 linear layers (all-linear) x (A, B)
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"{card['eval']['val_loss']:.4f}" in (out / "README.md").read_text()
    # Left behind: nothing but the adapter (no temporary folders).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "data.json"]


def test_adapter_loads_with_plain_peft_in_a_fresh_process(tiny_model_dir, tiny_data, tmp_path):
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    out = tmp_path / "adapter"
    result = train(
        config_from_args(tiny_args(tiny_model_dir, tiny_data, out, "--max_steps", "3"), environ={})
    )
    # The saved tensors are the trained ones ...
    trained = get_peft_model_state_dict(result.model)
    saved = load_file(out / "adapter_model.safetensors")
    assert saved.keys() == trained.keys()
    for key, value in trained.items():
        assert torch.equal(saved[key], value.cpu()), key
    # ... and a fresh process with nothing but transformers + peft gets the same logits as here.
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out).eval()
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits
    with torch.no_grad(), model.disable_adapter():
        assert not torch.allclose(
            expected, model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits
        )  # it learned
    torch.save(expected, tmp_path / "expected.pt")
    script = (
        "import sys, torch; from transformers import AutoModelForCausalLM; from peft import PeftModel\n"
        f"base = AutoModelForCausalLM.from_pretrained({str(tiny_model_dir)!r})\n"
        f"m = PeftModel.from_pretrained(base, {str(out)!r}).eval()\n"
        "got = m(input_ids=torch.tensor([[5, 6, 7, 8]])).logits\n"
        f"exp = torch.load({str(tmp_path / 'expected.pt')!r})\n"
        "print(float((got - exp).abs().max()))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout.strip().splitlines()[-1]) < 1e-5


def test_resume_after_a_crash_matches_an_uninterrupted_run(tiny_model_dir, tiny_data, tmp_path):
    args = ["--max_steps", "6", "--save_steps", "2", "--lora_dropout", "0.1", "--seed", "7"]
    full = tmp_path / "full"
    train(config_from_args(tiny_args(tiny_model_dir, tiny_data, full, *args), environ={}))

    class Crash(Exception):
        pass

    def crash_at_step_5(entry: dict[str, float]) -> None:
        if entry["step"] == 5:
            raise Crash

    resumed = tmp_path / "resumed"
    with pytest.raises(Crash):
        train(
            config_from_args(tiny_args(tiny_model_dir, tiny_data, resumed, *args), environ={}),
            on_step=crash_at_step_5,
        )
    assert not resumed.exists()
    checkpoints = sorted(p.name for p in checkpoint_root(resumed).iterdir())
    assert checkpoints == ["checkpoint-0000002", "checkpoint-0000004"]
    result = train(
        config_from_args(
            tiny_args(tiny_model_dir, tiny_data, resumed, *args, "--resume_from_checkpoint", "latest"),
            environ={},
        )
    )
    a = load_file(full / "adapter_model.safetensors")
    b = load_file(resumed / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:  # bit for bit on CPU, as README says
        assert torch.equal(a[key], b[key]), key
    full_losses = [
        s["loss"] for s in json.loads((full / "training_card.json").read_text())["history"]["steps"]
    ]
    assert [s["loss"] for s in result.card["history"]["steps"]] == full_losses


class Crash(Exception):
    pass


def crash_at(step: int):
    def hook(entry: dict[str, float]) -> None:
        if entry["step"] == step:
            raise Crash

    return hook


def test_a_fresh_run_moves_an_older_runs_checkpoints_aside(tiny_model_dir, tiny_data, tmp_path):
    out = tmp_path / "adapter"
    older = ["--max_steps", "6", "--save_steps", "2", "--seed", "1"]
    with pytest.raises(Crash):
        train(
            config_from_args(tiny_args(tiny_model_dir, tiny_data, out, *older), environ={}),
            on_step=crash_at(5),
        )
    assert sorted(p.name for p in checkpoint_root(out).iterdir()) == [
        "checkpoint-0000002",
        "checkpoint-0000004",
    ]
    newer = ["--max_steps", "6", "--save_steps", "2", "--seed", "2"]
    with pytest.raises(Crash):
        train(
            config_from_args(tiny_args(tiny_model_dir, tiny_data, out, *newer), environ={}),
            on_step=crash_at(3),
        )
    # Only the new run's checkpoint is left where `latest` looks; the older ones were moved, not deleted.
    assert sorted(p.name for p in checkpoint_root(out).iterdir()) == ["checkpoint-0000002"]
    aside = [p for p in tmp_path.iterdir() if p.name.startswith(f"{checkpoint_root(out).name}-")]
    assert len(aside) == 1
    assert sorted(p.name for p in aside[0].iterdir()) == ["checkpoint-0000002", "checkpoint-0000004"]
    resumed = train(
        config_from_args(
            tiny_args(tiny_model_dir, tiny_data, out, *newer, "--resume_from_checkpoint", "latest"),
            environ={},
        )
    )
    assert resumed.card["history"]["steps"][0]["step"] == 1 and len(resumed.card["history"]["steps"]) == 6


@pytest.mark.parametrize(
    "change, named",
    [
        (["--learning_rate", "0.02"], "learning_rate"),
        (["--lora_r", "8"], "lora"),
        ("data", "the training data"),
    ],
)
def test_resume_refuses_a_checkpoint_of_another_run(tiny_model_dir, tiny_data, tmp_path, change, named):
    from finetune.model.loading import ModelError

    out = tmp_path / "adapter"
    args = ["--max_steps", "6", "--save_steps", "2"]
    with pytest.raises(Crash):
        train(
            config_from_args(tiny_args(tiny_model_dir, tiny_data, out, *args), environ={}),
            on_step=crash_at(3),
        )
    data = tiny_data
    if change == "data":
        data = tmp_path / "other.json"
        data.write_text(json.dumps(json.loads(tiny_data.read_text())[:-1]))
        change = []
    resume = [*args, *change, "--resume_from_checkpoint", "latest"]
    with pytest.raises(ModelError, match=f"belongs to another run: .*{named}"):
        train(config_from_args(tiny_args(tiny_model_dir, data, out, *resume), environ={}))
    assert not out.exists()


def test_resume_refuses_a_checkpoint_made_on_another_base_model(
    tiny_model_dir, tiny_data, tmp_path, monkeypatch
):
    # No --base_model: both runs take $BASE_MODEL, which names another model by the resume. The
    # fingerprint holds the model resolved, so the resume is refused rather than mixing two bases.
    other = tmp_path / "other-model"
    build_tiny_llama(other, seed=1)  # same shapes: it would load without complaint
    out = tmp_path / "adapter"
    args = tiny_args(tiny_model_dir, tiny_data, out, "--max_steps", "3", "--save_steps", "1")[2:]
    assert "--base_model" not in args
    monkeypatch.setenv("BASE_MODEL", str(tiny_model_dir))
    with pytest.raises(Crash):
        train(config_from_args(args, environ={}), on_step=crash_at(2))
    monkeypatch.setenv("BASE_MODEL", str(other))
    with pytest.raises(ModelError, match="belongs to another run: base_model changed"):
        train(config_from_args([*args, "--resume_from_checkpoint", "latest"], environ={}))
    assert not out.exists()


@contextlib.contextmanager
def sigterm_guard():
    """A SIGTERM that the trainer does not handle would end pytest: this counts it instead."""
    unhandled: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda *_: unhandled.append(1))
    try:
        yield unhandled
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_sigterm_while_the_model_loads_stops_before_the_first_step(
    tiny_model_dir, tiny_data, tmp_path, monkeypatch
):
    from finetune.training import trainer

    real_build = trainer.build_run

    def build(cfg, plan):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_build(cfg, plan)

    monkeypatch.setattr(trainer, "build_run", build)
    out = tmp_path / "adapter"
    with sigterm_guard() as unhandled, pytest.raises(TrainingStopped, match="before the first step"):
        train(config_from_args(tiny_args(tiny_model_dir, tiny_data, out, "--max_steps", "2"), environ={}))
    assert unhandled == [] and not out.exists() and not checkpoint_root(out).exists()


def test_a_sigterm_in_the_final_evaluation_stops_with_a_checkpoint_that_finishes_the_run(
    tiny_model_dir, tiny_data, tmp_path, monkeypatch
):
    # The final evaluation comes after the last step and may take minutes: a SIGTERM there stops the
    # run with a checkpoint of the last step, and the resume runs no step again.
    from finetune.training import trainer

    out = tmp_path / "adapter"
    args = tiny_args(
        tiny_model_dir, tiny_data, out, "--max_steps", "2", "--eval_recall", "2", "--eval_generate", "0"
    )
    real_evaluate = trainer.evaluate_step

    def evaluate(cfg, plan, built, done):
        if done == plan.total_steps:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_evaluate(cfg, plan, built, done)

    monkeypatch.setattr(trainer, "evaluate_step", evaluate)
    with sigterm_guard() as unhandled, pytest.raises(TrainingStopped) as stopped:
        train(config_from_args(args, environ={}))
    assert unhandled == [] and not out.exists()
    assert stopped.value.checkpoint == checkpoint_root(out) / "checkpoint-0000002"
    assert [p.name for p in checkpoint_root(out).iterdir()] == ["checkpoint-0000002"]
    monkeypatch.setattr(trainer, "evaluate_step", real_evaluate)
    lines: list[str] = []
    result = train(
        config_from_args([*args, "--resume_from_checkpoint", "latest"], environ={}), log=lines.append
    )
    assert any("resuming at step 2" in line for line in lines)
    assert [s["step"] for s in result.card["history"]["steps"]] == [1, 2]
    assert (out / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("interruption", ["sigterm", "disk full"])
def test_a_checkpoint_of_the_last_step_is_on_disk_while_the_adapter_is_saved(
    tiny_model_dir, tiny_data, tmp_path, monkeypatch, interruption
):
    # So a kill during the save (one follows a SIGTERM after a grace period) loses no training. A
    # SIGTERM once the save has begun lets it finish: the adapter is the whole result. Either way
    # the checkpoint goes once the save has ended (a failed save leaves the folders as they were).
    from finetune.training import trainer

    out = tmp_path / "adapter"
    args = tiny_args(
        tiny_model_dir, tiny_data, out, "--max_steps", "2", "--eval_recall", "2", "--eval_generate", "0"
    )
    real_save = trainer.save_adapter
    seen: list[list[str]] = []

    def save(*a, **kw):
        seen.append(sorted(p.name for p in checkpoint_root(out).iterdir()))
        if interruption == "disk full":
            raise OSError(28, "No space left on device")
        os.kill(os.getpid(), signal.SIGTERM)
        return real_save(*a, **kw)

    monkeypatch.setattr(trainer, "save_adapter", save)
    with sigterm_guard() as unhandled, contextlib.ExitStack() as expect:
        if interruption == "disk full":
            expect.enter_context(pytest.raises(OSError, match="No space left"))
        train(config_from_args(args, environ={}))
    assert seen == [["checkpoint-0000002"]] and unhandled == []
    assert (out / "adapter_model.safetensors").is_file() == (interruption == "sigterm")
    assert not checkpoint_root(out).exists()


def test_the_adapter_and_checkpoints_reach_the_disk_before_their_names(
    tiny_model_dir, tiny_data, tmp_path, monkeypatch, synced
):
    # Written under a temporary name, every file and folder flushed, renamed, then the parent flushed:
    # after a power loss the folder is whole or absent.
    out = tmp_path / "adapter"
    args = ["--max_steps", "2", "--save_steps", "1", "--eval_recall", "2", "--eval_generate", "0"]
    train(config_from_args(tiny_args(tiny_model_dir, tiny_data, out, *args), environ={}))
    checkpoint = checkpoint_root(out) / "checkpoint-0000001"
    for folder in (out, checkpoint):
        written = [p.relative_to(folder) for p in folder.rglob("*")]
        assert written
        for rel in written:  # flushed in the temporary folder, whose name starts with a dot
            assert any(
                s.endswith(f"/{rel}") and Path(s).parts[-len(rel.parts) - 1].startswith(".") for s in synced
            ), rel
        assert str(folder.parent) in synced


def run_ddp_worker(
    nproc: int, dump_dir: Path, args: list[str], env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Train under torch.distributed.run on CPU (gloo); the worker dumps each rank's weights and logs."""
    dump_dir.mkdir()
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_port",
        str(free_port()),
        str(ROOT / "tests" / "ddp_worker.py"),
        str(dump_dir),
        *args,
    ]
    # One thread per process for both runs, so they share the same kernels.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_stop_early_at_the_same_step_and_keep_the_same_adapter(
    tiny_model_dir, tiny_data, tmp_path, strategy
):
    # num_epochs=auto with patience 2: the tiny model's recall plateaus, and rank 0's decision to
    # stop must reach rank 1 (a rank left in the loop would hang in its next all-reduce). Under
    # FSDP every evaluation's best weights are gathered by both ranks, and put back at the end.
    settings = [
        "--eval_steps",
        "2",
        "--stop_patience",
        "2",
        "--eval_generate",
        "0",
        "--micro_batch_size",
        "2",
    ]
    out = tmp_path / "adapter"
    run_ddp_worker(
        2,
        tmp_path / "ddp",
        tiny_args(tiny_model_dir, tiny_data, out, *settings),
        {"TRAIN_STRATEGY": strategy},
    )
    ranks = [json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["stopped_early"] and "no better score" in ranks[0]["stopped_early"]
    assert len(ranks[0]["losses"]) == len(ranks[1]["losses"]) < 150
    assert ranks[0]["kept_step"] == ranks[1]["kept_step"]
    # The kept step is an earlier one: its weights were put back, on both ranks, and saved.
    assert ranks[0]["kept_step"] < len(ranks[0]["losses"])
    weights = [torch.load(tmp_path / "ddp" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    saved = load_file(out / "adapter_model.safetensors")
    assert weights[0].keys() == weights[1].keys() == saved.keys()
    assert all(
        torch.equal(weights[0][k], weights[1][k]) and torch.equal(saved[k], weights[0][k]) for k in saved
    )


# 36 records less 4 for validation, 8 a step: 4 steps per epoch, so 6 steps cross an epoch boundary.
# fp32 and no dropout: the runs then differ only in summation order. max_grad_norm 0.5 clips some
# steps, so a norm taken over one rank's shard would change the weights too.
EQUIVALENCE_SETTINGS = [
    "--max_steps",
    "6",
    "--batch_size",
    "8",
    "--dtype",
    "float32",
    "--lora_dropout",
    "0",
    "--max_grad_norm",
    "0.5",
    "--eval_generate",
    "2",
]


def equivalence_data(folder: Path) -> Path:
    records = alpaca_records(36)
    for i, record in enumerate(records):
        # Answers of 1 to 4 sentences, so that micro-batches hold different numbers of trained
        # tokens and normalising by a rank's own count instead of the global one shows.
        record["output"] = " ".join([record["output"]] * (1 + i % 4))
    data = folder / "data.json"
    data.write_text(json.dumps(records), encoding="utf-8")
    return data


@pytest.fixture(scope="module")
def one_process_run(tiny_model_dir, tmp_path_factory) -> tuple[Path, Path]:
    """One process, micro-batch 2, accumulation 4: the reference the two-rank runs must match."""
    folder = tmp_path_factory.mktemp("one-process")
    data = equivalence_data(folder)
    args = tiny_args(tiny_model_dir, data, folder / "adapter", *EQUIVALENCE_SETTINGS)
    run_ddp_worker(1, folder / "dump", args)
    return data, folder


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_gloo_ranks_train_as_one_process_on_the_same_global_batch(
    tiny_model_dir, one_process_run, tmp_path, strategy
):
    """Two ranks with micro-batch 2 and accumulation 2 against one process with micro-batch 2 and
    accumulation 4: each step sees the same 8 examples, so the logged losses and gradient norms,
    the adapter and its generations must agree up to float rounding. They differ if the ranks
    share a shard, gradients are not averaged (or are reduced on every micro-batch and then
    again), accumulation is miscounted for the world size, the loss is normalised per rank, only
    rank 0's loss is logged, or (FSDP) the gradient norm is one rank's shard's, the saved adapter
    one rank's shard, or the final evaluation not run by every rank."""
    data, single_folder = one_process_run
    out = tmp_path / "adapter"
    args = tiny_args(tiny_model_dir, data, out, *EQUIVALENCE_SETTINGS)
    proc = run_ddp_worker(2, tmp_path / "dump", args, env={"TRAIN_STRATEGY": strategy})

    single = json.loads((single_folder / "dump" / "rank0.json").read_text())
    ranks = [json.loads((tmp_path / "dump" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert len(single["losses"]) == len(single["grad_norms"]) == 6
    assert max(single["grad_norms"]) > 0.5  # clipping is exercised
    rtol, atol = 1e-4, 1e-5
    for logged in ranks:  # every rank logs the global figures, not its own shard's
        for name in ("losses", "grad_norms", "base_val_loss", "val_loss"):
            assert logged[name] == pytest.approx(single[name], rel=rtol, abs=atol), name

    single_weights = load_file(single_folder / "adapter" / "adapter_model.safetensors")
    weights = load_file(out / "adapter_model.safetensors")
    assert single_weights.keys() == weights.keys() and single_weights
    for key, value in single_weights.items():  # whole tensors, as one process writes them
        assert weights[key].shape == value.shape, key
        torch.testing.assert_close(
            weights[key], value, rtol=rtol, atol=atol, msg=lambda m, k=key: f"{k}: {m}"
        )
    # The ranks hold the same weights (FSDP: gathered from their shards), and rank 0 saved them.
    rank0, rank1 = torch.load(tmp_path / "dump" / "rank0.pt"), torch.load(tmp_path / "dump" / "rank1.pt")
    assert rank0.keys() == rank1.keys() == weights.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
        assert torch.equal(weights[key], rank0[key]), key

    single_card = json.loads((single_folder / "adapter" / "training_card.json").read_text())
    card = json.loads((out / "training_card.json").read_text())
    assert card["training"]["world_size"] == 2 and card["training"]["gradient_accumulation"] == 2
    assert card["training"]["strategy"] == strategy and single_card["training"]["strategy"] is None
    # The greedy generations at the end, through the serving engine: the same texts.
    assert card["eval"]["examples"] == single_card["eval"]["examples"] and card["eval"]["examples"]
    # Only rank 0 logs the step lines.
    assert proc.stdout.count("step 6/6") == 1


def test_an_fsdp_run_stopped_by_sigterm_resumes_to_the_uninterrupted_runs_adapter(
    tiny_model_dir, tiny_data, tmp_path
):
    # Rank 1 alone is signalled after step 3: both ranks stop there, gather the sharded weights and
    # optimizer state, and rank 0 writes the checkpoint. Dropout makes each rank's RNG matter.
    args = ["--max_steps", "6", "--save_steps", "2", "--lora_dropout", "0.1", "--seed", "7"]
    args += ["--eval_generate", "0"]
    fsdp = {"TRAIN_STRATEGY": "fsdp"}
    full = tmp_path / "full"
    run_ddp_worker(2, tmp_path / "full-dump", tiny_args(tiny_model_dir, tiny_data, full, *args), env=fsdp)

    resumed = tmp_path / "resumed"
    stop_args = tiny_args(tiny_model_dir, tiny_data, resumed, *args)
    run_ddp_worker(2, tmp_path / "stop-dump", stop_args, env={**fsdp, "SIGTERM_AT": "3"})
    stopped = json.loads((tmp_path / "stop-dump" / "rank0.json").read_text())
    assert stopped == {"stopped": str(checkpoint_root(resumed) / "checkpoint-0000003")}
    assert not resumed.exists()
    assert sorted(p.name for p in checkpoint_root(resumed).iterdir()) == [
        "checkpoint-0000002",
        "checkpoint-0000003",
    ]
    # The checkpoint holds whole tensors, as one process writes them.
    saved = load_file(
        checkpoint_root(resumed) / "checkpoint-0000003" / "adapter" / "adapter_model.safetensors"
    )
    full_weights = load_file(full / "adapter_model.safetensors")
    assert saved.keys() == full_weights.keys()
    assert all(saved[k].shape == full_weights[k].shape for k in saved)

    resume_args = [*stop_args, "--resume_from_checkpoint", "latest"]
    run_ddp_worker(2, tmp_path / "resume-dump", resume_args, env=fsdp)
    resumed_weights = load_file(resumed / "adapter_model.safetensors")
    assert resumed_weights.keys() == full_weights.keys()
    for key in full_weights:  # bit for bit, as a single process resumes
        assert torch.equal(resumed_weights[key], full_weights[key]), key
    full_log = json.loads((tmp_path / "full-dump" / "rank0.json").read_text())
    resumed_log = json.loads((tmp_path / "resume-dump" / "rank0.json").read_text())
    assert resumed_log["losses"] == full_log["losses"]
    assert resumed_log["grad_norms"] == full_log["grad_norms"]


def test_a_4bit_base_sharded_over_two_ranks_trains_as_one_process(tiny_model_dir, tiny_data, tmp_path):
    # QLoRA under FSDP: the packed 4-bit weights (uint8 storage, never cast) are sharded with the
    # rest and gathered whole for each layer; bitsandbytes puts their quantization state back.
    settings = ["--max_steps", "3", "--dtype", "float32", "--lora_dropout", "0", "--eval_generate", "0"]
    settings += ["--quantization", "4bit"]
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    run_ddp_worker(1, tmp_path / "single-dump", tiny_args(tiny_model_dir, tiny_data, single, *settings))
    env = {"TRAIN_STRATEGY": "fsdp"}
    run_ddp_worker(
        2, tmp_path / "sharded-dump", tiny_args(tiny_model_dir, tiny_data, sharded, *settings), env=env
    )
    one = json.loads((tmp_path / "single-dump" / "rank0.json").read_text())
    two = json.loads((tmp_path / "sharded-dump" / "rank0.json").read_text())
    for name in ("losses", "grad_norms", "val_loss"):
        assert two[name] == pytest.approx(one[name], rel=1e-4, abs=1e-5), name
    a, b = load_file(single / "adapter_model.safetensors"), load_file(sharded / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.parametrize(
    ("value", "expected"), [("", "auto"), ("auto", "auto"), ("DDP", "ddp"), (" fsdp ", "fsdp")]
)
def test_train_strategy_reads_ddp_fsdp_or_auto(value, expected):
    assert TrainSettings.from_env({"TRAIN_STRATEGY": value}).strategy == expected
    assert TrainSettings.from_env({}).strategy == "auto"


def test_a_bad_train_strategy_fails_before_the_model_loads(tiny_model_dir, tiny_data, tmp_path, monkeypatch):
    from finetune.training import trainer

    monkeypatch.setenv("TRAIN_STRATEGY", "zero3")
    monkeypatch.setattr(trainer, "load_for_training", lambda *a, **k: pytest.fail("the model loaded"))
    out = tmp_path / "adapter"
    with pytest.raises(ConfigError, match=r"TRAIN_STRATEGY='zero3' is not a training strategy: use ddp"):
        train(config_from_args(tiny_args(tiny_model_dir, tiny_data, out, "--max_steps", "1"), environ={}))
    assert not out.exists()


def test_8bit_weights_cannot_be_sharded_and_say_what_to_use():
    with pytest.raises(ConfigError, match="quantization 8bit cannot be sharded .*use quantization 4bit"):
        check_strategy("fsdp", "8bit")
    check_strategy("ddp", "8bit")
    check_strategy("fsdp", "4bit")


@pytest.mark.parametrize(
    ("storage", "gathered", "refused"),
    [("uint8", torch.bfloat16, False), ("float32", torch.float32, False), ("float32", torch.bfloat16, True)],
)
def test_4bit_weights_are_sharded_only_in_a_storage_fsdp_leaves_uncast(
    tiny_model_dir, storage, gathered, refused
):
    # FSDP casts floating-point weights to the dtype it gathers in (bf16 on a bf16 GPU): packed
    # 4-bit bytes stored as float32 would become other numbers. Integer storage is never cast.
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from finetune.training.distributed import check_quantized

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_storage=getattr(torch, storage))
    model = AutoModelForCausalLM.from_pretrained(
        str(tiny_model_dir), quantization_config=config, device_map={"": "cpu"}
    )
    with contextlib.ExitStack() as expect:
        if refused:
            expect.enter_context(pytest.raises(ModelError, match="bnb_4bit_quant_storage=torch.bfloat16"))
        check_quantized(model, gathered)
