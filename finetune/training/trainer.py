"""The training run: dataset file -> verified LoRA adapter folder with a training card.

train() is the recipe, in the order the data flows: plan_run (read, split and encode the data,
place this process, size the run; no model yet) -> build_run (base model + LoRA, optimizer and
schedule, or a checkpoint's state) -> run_loop (the optimizer steps) -> finish_run (the last
evaluation, the adapter kept, its card, the folder on disk). The records the stages hand on are in
run_state.py. Around them: run_data.py (the data read and encoded), schedule.py (the run's length,
the learning rate), train_eval.py (evaluation during training, stopping on evidence),
checkpoints.py, stopping.py (SIGTERM), progress.py (log lines, wandb), card.py (the training card),
distributed.py (DDP, FSDP).

Our own loop rather than HF Trainer: it packs examples without padding, normalises the loss by
the number of trained tokens across gradient accumulation and ranks, runs bf16 autocast on CPUs
that have it, and checkpoints everything needed to resume bit-for-bit (model, optimizer, schedule,
RNG; the data order is a pure function of seed and step)."""

from __future__ import annotations

import contextlib
import dataclasses
import random
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..config import ConfigError, TrainConfig
from ..data.batching import iter_collated, micro_batches
from ..data.encoding import IGNORE_INDEX, Encoded
from ..memory.plan import plan_for_config
from ..model.adapter_folder import save_adapter
from ..model.devices import train_device
from ..model.loading import base_identity, load_for_training, load_tokenizer, pick_device, pick_precision
from ..settings import STRATEGIES, TrainSettings
from .card import training_card
from .checkpoints import (
    CHECKPOINT_PREFIX,
    History,
    checkpoint_root,
    load_checkpoint,
    move_aside_old_checkpoints,
    write_checkpoint,
)
from .distributed import (
    AUTO_STRATEGY,
    Dist,
    Placement,
    check_strategy,
    clip_grad_norm,
    init_distributed,
    load_lora_state,
    same_as_main,
    skip_grad_sync,
    whole_lora,
    wrap_for_training,
)
from .evaluation import evaluate_peft
from .losses import TokenLoss, token_loss_sum
from .progress import log_line, log_start, log_step, start_wandb
from .run_data import encode_records, read_data, recall_sample
from .run_state import Data, LoopState, RunPlan, TrainResult, TrainState, steps_run
from .schedule import auto_length, eval_interval, lr_lambda, plan_steps
from .stopping import StopFlag, TrainingStopped, stop_before_save, stop_requested, stopped
from .train_eval import BEST_RULE, eval_hook, eval_line, evaluate_step, validation_loss

# --- the run in stages: plan -> build -> loop -> finish ------------------------------------------


def train(
    cfg: TrainConfig,
    on_step: Callable[[dict[str, float]], None] | None = None,
    log: Callable[[str], None] = log_line,
    settings: TrainSettings | None = None,
) -> TrainResult:
    """Dataset file -> adapter folder with its training card, in the order the data flows: plan the
    run (no model yet), build the model and optimizer, run the steps, finish (evaluate, save).
    `settings`: the environment's (TRAIN_DEVICE, TRAIN_STRATEGY, BASE_MODEL), parsed here if not given."""
    started = time.time()
    settings = settings or TrainSettings.from_env()
    # From the start: a SIGTERM while the model loads stops the run before its first step.
    with StopFlag() as stop:
        plan = plan_run(cfg, settings)
        cfg = settle_memory(cfg, plan.place)
        state = build_run(cfg, plan)
        log_start(cfg, plan, state, log)
        loop = run_loop(cfg, plan, state, on_step, stop)
        return finish_run(cfg, plan, state, loop, started, log, stop)


# --- plan ----------------------------------------------------------------------------------------


def plan_run(cfg: TrainConfig, settings: TrainSettings) -> RunPlan:
    """Read, split and encode the data and size the run; every check that needs no model runs here.
    The memory plan settles auto settings here; settle_memory then puts them in `cfg`."""
    data = read_data(cfg, settings.base_model)
    place = place_process(cfg, data, settings)
    base_path = data.base_path
    tokenizer = load_tokenizer(base_path)
    train_examples = encode_records(data.train_records, tokenizer, data.template, cfg)
    val_examples = encode_records(data.val_records, tokenizer, data.template, cfg)
    accum, micro_per_epoch = _accumulation(cfg, train_examples, place.dist)
    steps_per_epoch = micro_per_epoch / accum
    total_steps, steps_rule = plan_steps(cfg, steps_per_epoch, len(data.train_records))
    recall_examples = recall_sample(cfg, data.train_records, tokenizer, data.template)
    return RunPlan(
        data,
        place,
        base_path,
        tokenizer,
        train_examples,
        val_examples,
        accum,
        micro_per_epoch,
        steps_per_epoch,
        total_steps,
        steps_rule,
        recall_examples,
        eval_interval(cfg, total_steps),
    )


def place_process(cfg: TrainConfig, data: Data, settings: TrainSettings) -> Placement:
    """Device, rank, precision and the memory plan (which settles auto quantization, gradient
    checkpointing and strategy). A fresh run moves an earlier run's checkpoints aside here, once
    the main process is known."""
    device = pick_device(train_device(settings.device))
    dist = init_distributed(device.type)
    if device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    if data.checkpoint is None and dist.main:
        aside = move_aside_old_checkpoints(cfg.output_dir)
        if aside is not None:
            log_line(f"a fresh run: the checkpoints of an earlier run were moved to {aside}")
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    memory = memory_plan(cfg, data.base_path, device.type, total, dist)
    quantization = memory.settings["quantization"]
    precision = pick_precision(cfg.dtype, device, training=True)
    if precision.compute == torch.float16 and quantization == "none":
        raise ValueError("dtype float16 training is unstable without loss scaling; use bfloat16 or float32")
    autocast = (
        (lambda: torch.autocast(device.type, dtype=precision.compute)) if precision.autocast else nullcontext
    )
    strategy = settings.strategy
    if strategy == "auto":
        strategy = (
            memory.settings.get("strategy")
            if memory.settings.get("strategy") in STRATEGIES
            else AUTO_STRATEGY
        )
    if dist.world_size > 1:
        check_strategy(strategy, quantization)
    return Placement(device, dist, precision, autocast, strategy, memory)


def memory_plan(cfg: TrainConfig, base_path: str, device_type: str, total: int | None, dist: Dist) -> Any:
    """The memory plan for this run on a device with `total` bytes (None: a CPU, no limit). Auto
    settings that fit nothing stop the run with the plan's reason; explicit ones that the plan
    expects not to fit run anyway (the user may know better), with a warning."""
    memory = plan_for_config(cfg, base_path, device_type, total, dist.world_size)
    if not memory.fits:
        explicit = cfg.quantization != "auto" and cfg.gradient_checkpointing is not None
        if not explicit:
            raise ConfigError(f"training does not fit this GPU: {memory.reason}")
        if dist.main:
            log_line(f"warning: the memory plan expects this run not to fit: {memory.reason}")
    return memory


def settle_memory(cfg: TrainConfig, place: Placement) -> TrainConfig:
    """cfg with the memory plan's quantization and gradient checkpointing in place of auto."""
    settings = place.memory.settings
    return dataclasses.replace(
        cfg,
        quantization=settings["quantization"],
        gradient_checkpointing=bool(settings["gradient_checkpointing"]),
    )


def _accumulation(cfg: TrainConfig, train_examples: list[Encoded], dist: Dist) -> tuple[int, int]:
    """Micro-batches per optimizer step, and this process's micro-batches per epoch."""
    per_pass = cfg.micro_batch_size * dist.world_size
    accum = max(1, cfg.batch_size // per_pass)
    micro_per_epoch = len(
        micro_batches(
            train_examples,
            cfg.micro_batch_size,
            cfg.seed,
            0,
            cfg.data.group_by_length,
            dist.rank,
            dist.world_size,
        )
    )
    if micro_per_epoch == 0:
        raise ValueError(
            f"{len(train_examples)} training records are too few for {dist.world_size} processes "
            f"x micro_batch_size {cfg.micro_batch_size}"
        )
    return accum, micro_per_epoch


# --- build ---------------------------------------------------------------------------------------


def build_run(cfg: TrainConfig, plan: RunPlan) -> TrainState:
    """Base model + a new LoRA, the optimizer and schedule; a checkpoint's state when resuming."""
    place = plan.place
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model = load_for_training(
        plan.base_path, place.device, place.precision, cfg.lora, cfg.gradient_checkpointing, cfg.quantization
    )
    identity = base_identity(model.get_base_model(), plan.base_path)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total_params = sum(p.numel() for p in model.parameters())
    # Before the optimizer: under FSDP it must hold the sharded parameters.
    loss_fn = wrap_for_training(TokenLoss(model), place, place.strategy)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, plan.total_steps))
    history = History()
    start_step, best_state = 0, None
    if plan.data.checkpoint is not None:
        start_step, history, best_state = load_checkpoint(
            plan.data.checkpoint, model, optimizer, scheduler, place.dist, place.sharded
        )
    return TrainState(
        model,
        loss_fn,
        optimizer,
        scheduler,
        identity,
        trainable,
        total_params,
        start_step,
        history,
        best_state,
    )


# --- run -----------------------------------------------------------------------------------------


def run_loop(
    cfg: TrainConfig,
    plan: RunPlan,
    state: TrainState,
    on_step: Callable[[dict[str, float]], None] | None,
    stop: StopFlag,
) -> LoopState:
    """From the start step to the last; on SIGTERM, checkpoint at the end of the step and stop."""
    if stop_requested(stop, plan.place):  # before the first step: nothing new to keep
        raise stopped(cfg, plan.data.checkpoint)
    loop = _start_loop(cfg, plan, state)
    checkpoint = None
    for step in range(state.start_step, plan.total_steps):
        if state.history.stopped:  # a resumed run that had already stopped on evidence
            break
        entry, mean_loss = optimizer_step(cfg, plan, state, loop, step)
        _after_step(cfg, plan, state, loop, entry, mean_loss)
        if on_step is not None:
            on_step(entry)
        stop_now = stop_requested(stop, plan.place)
        checkpoint = _checkpoint_hook(cfg, plan, state, loop, step + 1, stop_now)
        if stop_now:
            loop.bar.close()
            raise stopped(cfg, checkpoint)
    loop.bar.close()
    return loop


def _start_loop(cfg: TrainConfig, plan: RunPlan, state: TrainState) -> LoopState:
    """wandb, the base model's validation loss and the progress bar, before the first step."""
    wandb_run = start_wandb(cfg, plan.place.dist) if cfg.wandb_project else None
    # Once per run: a resumed run has it in its history.
    if plan.val_examples and state.history.base_val_loss is None:
        with state.model.disable_adapter():
            state.history.base_val_loss = validation_loss(cfg, plan, state)
    state.model.train()
    bar = tqdm(
        total=plan.total_steps,
        initial=state.start_step,
        desc="train",
        disable=not plan.place.dist.main,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    return LoopState(bar, wandb_run)


def optimizer_step(
    cfg: TrainConfig, plan: RunPlan, state: TrainState, loop: LoopState, step: int
) -> tuple[dict[str, float], float]:
    """One optimizer step over `accum` micro-batches: its history entry and its unrounded mean loss."""
    place = plan.place
    t0 = time.perf_counter()
    batches = [_micro_batch(cfg, plan, loop, step * plan.accum + k) for k in range(plan.accum)]
    step_targets = _step_targets(batches, place)
    # Summed on the device and read once per step: one host sync, not one per micro-batch.
    step_loss = torch.zeros((), dtype=torch.float64, device=place.device)
    for k, batch in enumerate(batches):
        # Gradients are all-reduced once per step, on the last micro-batch.
        last = k == plan.accum - 1
        with nullcontext() if last else skip_grad_sync(state.loss_fn):
            loss_sum, _ = token_loss_sum(state.loss_fn, batch, place.device, place.autocast)
            # Normalise by trained tokens over the whole step (all micro-batches, all
            # ranks); DDP and FSDP average over ranks, so scale back up by world size.
            loss = loss_sum * place.dist.world_size / step_targets
            loss.backward()
        step_loss += loss_sum.detach()
    # The norm of the whole step's gradient, over all ranks, logged whether or not it clips.
    grad_norm = clip_grad_norm(state.model.parameters(), cfg.max_grad_norm)
    state.optimizer.step()
    state.scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)

    loss_total, step_tokens = _step_totals(step_loss, batches, place)
    loop.total_tokens += step_tokens
    loop.window_tokens += step_tokens
    loop.train_seconds += time.perf_counter() - t0
    mean_loss = loss_total / step_targets
    entry = {
        "step": step + 1,
        "epoch": round((step + 1) / plan.steps_per_epoch, 4),
        "loss": round(mean_loss, 5),
        "lr": state.scheduler.get_last_lr()[0],
        "grad_norm": float(f"{grad_norm:.6g}"),
    }
    return entry, mean_loss


def _micro_batch(cfg: TrainConfig, plan: RunPlan, loop: LoopState, index: int) -> dict[str, torch.Tensor]:
    """The index-th micro-batch of the run, collated; the order is a pure function of seed and epoch."""
    epoch, pos = divmod(index, plan.micro_per_epoch)
    if epoch != loop.epoch:
        dist = plan.place.dist
        loop.epoch = epoch
        loop.epoch_order = micro_batches(
            plan.train_examples,
            cfg.micro_batch_size,
            cfg.seed,
            epoch,
            cfg.data.group_by_length,
            dist.rank,
            dist.world_size,
            plan.accum,
        )
    pad_id = plan.tokenizer.pad_token_id
    return next(iter_collated(plan.train_examples, [loop.epoch_order[pos]], pad_id, cfg.data.packing))


def _step_targets(batches: list[dict[str, torch.Tensor]], place: Placement) -> float:
    """Trained tokens in the step, over all ranks (at least 1: the loss divides by it)."""
    # Collective tensors live on the device: NCCL cannot reduce CPU tensors.
    n_targets = torch.tensor(
        float(sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)),
        dtype=torch.float64,
        device=place.device,
    )
    if place.dist.world_size > 1:
        torch.distributed.all_reduce(n_targets)
    return max(float(n_targets), 1.0)


def _step_totals(
    step_loss: torch.Tensor, batches: list[dict[str, torch.Tensor]], place: Placement
) -> tuple[float, int]:
    """The step's summed loss and its non-padding tokens (packed rows have none), over all ranks."""
    local_tokens = sum(
        int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in batches
    )
    totals = torch.stack(
        [step_loss, torch.tensor(float(local_tokens), dtype=torch.float64, device=place.device)]
    )
    if place.dist.world_size > 1:
        torch.distributed.all_reduce(totals)
    loss_total, tokens = totals.tolist()
    return loss_total, int(tokens)


def _after_step(
    cfg: TrainConfig,
    plan: RunPlan,
    state: TrainState,
    loop: LoopState,
    entry: dict[str, float],
    mean_loss: float,
) -> None:
    """Record the step, log it, evaluate when due, and tell wandb."""
    state.history.steps.append(entry)
    loop.bar.update(1)
    log_step(cfg, plan, loop, entry, mean_loss)
    eval_hook(cfg, plan, state, loop, int(entry["step"]))
    if loop.wandb_run is not None:
        loop.wandb_run.log(entry, step=entry["step"])


def _checkpoint_hook(
    cfg: TrainConfig, plan: RunPlan, state: TrainState, loop: LoopState, done: int, stop_now: bool
) -> Path | None:
    """A checkpoint every save_steps steps, on an early stop, and on SIGTERM (None: none written)."""
    want = cfg.save_steps and done % cfg.save_steps == 0 and done < plan.total_steps
    # A run stopping on evidence checkpoints too: a resume then finishes without more steps.
    want = want or (cfg.save_steps and state.history.stopped and not stop_now)
    if not (want or stop_now):
        return None
    path = write_checkpoint(
        checkpoint_root(cfg.output_dir),
        done,
        state.model,
        state.optimizer,
        state.scheduler,
        state.history,
        plan.data.fingerprint,
        plan.place,
        best_state=state.best_state,
    )
    if path is not None:
        loop.bar.write(f"checkpoint {path}", file=sys.stdout)
    return path


# --- finish --------------------------------------------------------------------------------------


def finish_run(
    cfg: TrainConfig,
    plan: RunPlan,
    state: TrainState,
    loop: LoopState,
    started: float,
    log: Callable[[str], None],
    stop: StopFlag,
) -> TrainResult:
    """The last evaluation; with num_epochs=auto the best evaluation's weights back in the model
    (BEST_RULE); base-vs-adapter generations, the card; the adapter folder on disk. A SIGTERM before
    the adapter is being written stops the run with a checkpoint that finishes it without more steps."""
    done = steps_run(state)
    # Before the evaluations and the save, which may outlast a stop's grace period: a SIGTERM, or
    # the kill that follows one, from here on loses no training.
    final_checkpoint = _final_checkpoint(cfg, plan, state, done)
    try:
        result = _evaluate_and_save(cfg, plan, state, loop, started, log, stop, done)
    except TrainingStopped:
        raise
    except Exception:  # a failed evaluation or save leaves the folders as they were
        _remove_checkpoint(final_checkpoint)
        raise
    _remove_checkpoint(final_checkpoint)
    if loop.wandb_run is not None:
        loop.wandb_run.finish()
    return result


def _evaluate_and_save(
    cfg: TrainConfig,
    plan: RunPlan,
    state: TrainState,
    loop: LoopState,
    started: float,
    log: Callable[[str], None],
    stop: StopFlag,
    done: int,
) -> TrainResult:
    """The evaluation kept, the generations and the card, then the adapter folder. A SIGTERM stops
    the run until the save begins."""
    kept = _final_evaluation(cfg, plan, state, log, stop, done)
    generation_eval = _generations(cfg, plan, state)
    stop_before_save(cfg, stop, plan.place, done)
    # From here the adapter is written even if a SIGTERM comes: it is the whole result.
    card = training_card(cfg, plan, state, loop, kept, generation_eval, started)
    adapter_dir = _write_adapter(cfg, plan, state, card, kept, log)
    return TrainResult(adapter_dir, card, state.model, plan.tokenizer)


def _final_evaluation(
    cfg: TrainConfig, plan: RunPlan, state: TrainState, log: Callable[[str], None], stop: StopFlag, done: int
) -> dict[str, float] | None:
    """The last step's evaluation (the loop's, or one now); with num_epochs=auto the best
    evaluation's weights back in the model (BEST_RULE). The evaluation whose adapter is kept."""
    history = state.history
    last = history.evals[-1] if history.evals and history.evals[-1]["step"] == done else None
    last = last or evaluate_step(cfg, plan, state, done)
    stop_before_save(cfg, stop, plan.place, done)
    if not (auto_length(cfg) and history.best is not None):
        return last
    kept = history.best
    if kept["step"] != done and state.best_state is not None:
        load_lora_state(state.model, state.best_state)
        log(f"keeping step {kept['step']}'s adapter ({BEST_RULE}): {eval_line(kept)}")
    return kept


def _generations(cfg: TrainConfig, plan: RunPlan, state: TrainState) -> dict[str, Any] | None:
    """Base-vs-adapter generations on up to eval_generate validation records (None: none asked)."""
    place, data = plan.place, plan.data
    # Sharded, every rank generates: each forward gathers weights from all of them. The ranks run
    # the same greedy decoding on the same whole weights, so they stop at the same token. (Rank 0
    # alone on the gathered model would need the whole base on one device, which FSDP is for
    # models that do not fit.)
    if not ((place.dist.main or place.sharded) and data.val_records and cfg.eval_generate > 0):
        return None
    return evaluate_peft(
        state.model, plan.tokenizer, data.val_records, data.template, max_records=cfg.eval_generate
    )


def _write_adapter(
    cfg: TrainConfig,
    plan: RunPlan,
    state: TrainState,
    card: dict[str, Any],
    kept: dict[str, float] | None,
    log: Callable[[str], None],
) -> Path:
    """The adapter folder with its card, written by the main process; every rank waits for it."""
    place = plan.place
    val_loss = kept.get("val_loss") if kept else None
    base_val_loss = state.history.base_val_loss
    adapter_dir = Path(cfg.output_dir)
    with whole_lora(state.model):  # sharded: the same adapter file as one process writes
        if place.dist.main:
            adapter_dir = save_adapter(state.model, cfg.output_dir, plan.data.template, card)
            log(
                f"adapter written to {adapter_dir} (val_loss {val_loss if val_loss is None else round(val_loss, 4)}, "
                f"base {base_val_loss if base_val_loss is None else round(base_val_loss, 4)})"
            )
    if place.dist.world_size > 1:
        torch.distributed.barrier()
    return adapter_dir


def _final_checkpoint(cfg: TrainConfig, plan: RunPlan, state: TrainState, done: int) -> Path | None:
    """A checkpoint of the last step, written by this call (None: another process writes them, or
    one of that step exists already, such as the one the run resumed from)."""
    root = checkpoint_root(cfg.output_dir)
    place = plan.place
    exists = place.dist.main and (root / f"{CHECKPOINT_PREFIX}{done:07d}").exists()
    # Every rank joins the checkpoint's gathers: each must know what rank 0's disk holds.
    if same_as_main(exists, place):
        return None
    return write_checkpoint(
        root,
        done,
        state.model,
        state.optimizer,
        state.scheduler,
        state.history,
        plan.data.fingerprint,
        place,
        keep=None,  # removed again once the adapter is written: prune nothing for it
        best_state=state.best_state,
    )


def _remove_checkpoint(path: Path | None) -> None:
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)
        with contextlib.suppress(OSError):  # the folder too, if nothing else is there
            path.parent.rmdir()
