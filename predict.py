"""Cog predictor: base model + LoRA adapter, streaming text. Thin: the work is in finetune/."""

import asyncio
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

from cog import BaseRunner, ConcatenateIterator, Input, concurrent, current_scope, streaming

from finetune.config import (
    MAX_STOP_CHARS,
    MAX_STOP_SEQUENCES,
    GenerationSettings,
    field_default,
    field_doc,
)
from finetune.data.prompts import AUTO, RAW, available_templates
from finetune.engine.requests import GenerationStats
from finetune.model.devices import serve_device
from finetune.serving.server import ModelServer, default_adapter
from finetune.settings import ServeSettings

G = GenerationSettings
TEMPLATE_CHOICES = [AUTO, RAW, *available_templates()]
# Far above any context window (~4 characters a token), but a 40 MB prompt gets 422 before anything
# tokenizes it; the context check then gives the exact limit.
MAX_PROMPT_CHARS = 400_000
CONCURRENCY = 32  # = @concurrent(max=...) below, which must be a literal for the Cog CLI
# Cog writes bounds as floats: the largest float not above MAX_SEED, so that the schema's bound is exact.
SCHEMA_MAX_SEED = 2**63 - 1024
# At most MAX_STOP_SEQUENCES comma-separated strings of at most MAX_STOP_CHARS each, checked by Cog's
# schema (422) before the request reaches the engine.
STOP_PATTERN = rf"^[^,]{{0,{MAX_STOP_CHARS}}}(,[^,]{{0,{MAX_STOP_CHARS}}}){{0,{MAX_STOP_SEQUENCES - 1}}}$"


def _input(name: str, **bounds):
    return Input(description=field_doc(G, name), default=field_default(G, name), **bounds)


class Predictor(BaseRunner):
    def setup(self, weights: str | None = None) -> None:
        """Load the base model once; `weights` (COG_WEIGHTS) is an adapter folder, archive, URL or data URI."""
        # SERVE_DEVICE, or the GPU; a GPU image whose GPU torch cannot use stops here with the reason.
        # The serving settings are parsed once: every bad variable, the device's included, fails here.
        settings = ServeSettings.from_env()
        device = serve_device(settings)
        self.server = ModelServer(adapter=weights or default_adapter(), device=device, settings=settings)
        # One thread per concurrent prediction: the loop's default pool has cpu+4 threads, and a
        # few slow downloads would hold up every request behind them.
        self.io = ThreadPoolExecutor(max_workers=CONCURRENCY, thread_name_prefix="request")

    def healthcheck(self) -> bool:
        """coglet reports the server UNHEALTHY while this fails: a stopped or wedged compute thread."""
        problem = self.server.health_problem()
        if problem:
            raise RuntimeError(problem)
        return True

    # Predictions Cog accepts at once (more get 409). They decode together in batches of up to
    # MAX_BATCH_SIZE (8) rows; the rest wait in the engine's queue. coglet answers a prediction a
    # moment before it frees the slot, and on a loaded machine that moment grows: with 16 slots, 8
    # clients sending back to back still met one 409 in 200 requests; 32 leave room. A
    # literal: the Cog CLI writes COG_MAX_CONCURRENCY into the image from it, and the local server
    # (finetune/cog/cogtools.py) reads it back from here.
    # run() is async and returns a plain generator: coglet iterates that on a thread of its own and
    # sends each chunk as it comes (an async generator's chunks would arrive only at the end).
    # coglet delivers a cancel only while run() itself is pending, so the part that can take long
    # before the first token (fetching a lora_weights adapter) happens in run(), on a worker
    # thread, and a cancel then stops the download.
    @concurrent(max=32)
    @streaming
    async def run(
        self,
        prompt: str = Input(
            description="Instruction or question for the model.", min_length=1, max_length=MAX_PROMPT_CHARS
        ),
        input: str = Input(
            description="Optional context for the instruction (Alpaca's `input`).",
            default="",
            max_length=MAX_PROMPT_CHARS,
        ),
        max_new_tokens: int = _input("max_new_tokens", ge=1, le=4096),
        temperature: float = _input("temperature", ge=0.0, le=5.0),
        top_p: float = _input("top_p", ge=0.0, le=1.0),
        top_k: int = _input("top_k", ge=0, le=1000),
        repetition_penalty: float = _input("repetition_penalty", ge=0.5, le=2.0),
        stop_sequences: str = Input(
            description=f"Comma-separated strings that end the answer (not included in the output): at most "
            f"{MAX_STOP_SEQUENCES}, of at most {MAX_STOP_CHARS} characters each.",
            default="",
            max_length=MAX_STOP_SEQUENCES * (MAX_STOP_CHARS + 1),
            regex=STOP_PATTERN,
        ),
        seed: int | None = Input(description=field_doc(G, "seed"), default=None, ge=0, le=SCHEMA_MAX_SEED),
        prompt_template: str = Input(
            description="auto = the adapter's own template; without one, the base model's chat template if it has one, else alpaca. none = send the prompt as is.",
            default=AUTO,
            choices=TEMPLATE_CHOICES,
        ),
        lora_weights: str | None = Input(
            description="Per-request LoRA adapter: URL, data URI or path of an adapter archive or folder.",
            default=None,
        ),
    ) -> ConcatenateIterator[str]:
        settings = GenerationSettings(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            repetition_penalty=repetition_penalty,
            stop_sequences=[s for s in stop_sequences.split(",") if s],
            seed=seed,
        )
        stats = GenerationStats()
        cancel = threading.Event()
        try:
            chunks = await asyncio.get_running_loop().run_in_executor(
                self.io,
                lambda: self.server.generate(
                    prompt, input, settings, prompt_template, lora_weights, stats=stats, cancel=cancel
                ),
            )
        except asyncio.CancelledError:
            cancel.set()  # stops the download, or the request if it was queued just now
            raise
        return self._stream(chunks, stats, current_scope())

    def _stream(self, chunks: Iterator[str], stats: GenerationStats, scope) -> Iterator[str]:
        yield from chunks
        scope.record_metric("input_token_count", stats.input_token_count)
        scope.record_metric("output_token_count", stats.output_token_count)
        scope.record_metric("time_to_first_token", round(stats.time_to_first_token, 4))
        scope.record_metric("tokens_per_second", round(stats.tokens_per_second, 2))
