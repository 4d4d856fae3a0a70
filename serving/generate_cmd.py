"""`tfjax generate`: greedy generation for one prompt, a smoke test of model loading and forward.

It runs `models.llama.forward` on a private single-sequence paged cache (pages 1..n of one row,
page 0 the padding page), the same code path the engine uses, without the engine: one jitted
step for the whole prompt, then one per new token, stopping at EOS or `--max-tokens`. Text is
printed as it grows; a suffix ending in U+FFFD (an incomplete UTF-8 sequence) is held back
until the next token completes it.
"""

from __future__ import annotations

import argparse
import functools
import math
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp

from models import LoadedModel, llama, load_model
from models.attention import Backend, backend_for
from models.config import ModelConfig
from models.sharding import kv_sharding
from models.weights import Weights
from tfjax.config import add_engine_arguments, engine_config_from_args

PAGE_SIZE = 16
PROMPT_BUCKET = 64
CONTEXT_BUCKET = 256


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("generate", help="greedy-generate text for one prompt")
    parser.add_argument("--model", default="default", help='"default", a HF dir or a .gguf file')
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
    parser.add_argument("--cache-dir", type=Path, default=None)
    add_engine_arguments(parser)  # `tfjax serve`'s; generate uses the model and kernel ones
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    config = engine_config_from_args(args)
    model = load_model(
        args.model,
        dtype=args.dtype,
        cache_dir=args.cache_dir,
        tensor_parallel=config.tensor_parallel,
        quantization=args.quantization,
    )
    backend = backend_for(config.attention_backend, mesh=model.mesh)
    tokenizer = model.tokenizer
    if args.chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}])
    else:
        text = args.prompt
    generated: list[int] = []
    printed = ""
    for token, _ in generate_greedy(model, tokenizer.encode(text), args.max_tokens, backend):
        generated.append(token)
        text = tokenizer.decode(generated)
        if not text.endswith("\ufffd"):
            print(text[len(printed) :], end="", flush=True)
            printed = text
    print()
    return 0


def generate_greedy(
    model: LoadedModel, prompt: list[int], max_tokens: int, backend: Backend | None = None
) -> Iterator[tuple[int, jax.Array]]:
    """Yield (token, float32 logits [V] it was picked from) for up to `max_tokens` greedy
    tokens after `prompt`, stopping before an EOS token.

    The prompt is padded to a multiple of PROMPT_BUCKET tokens and the row's page count to a
    multiple of CONTEXT_BUCKET tokens, so that similar requests share compiled steps.
    `backend`: the attention kernels (default: this platform's, over the model's mesh).
    """
    backend = backend or backend_for(mesh=model.mesh)
    pad_to = math.ceil(len(prompt) / PROMPT_BUCKET) * PROMPT_BUCKET
    num_row_pages = math.ceil((len(prompt) + max_tokens) / CONTEXT_BUCKET) * (
        CONTEXT_BUCKET // PAGE_SIZE
    )
    kv = llama.init_kv_cache(
        model.config,
        num_row_pages + 1,
        PAGE_SIZE,
        kv_sharding(model.mesh, backend.layout),
        backend,
    )
    step = llama.single_sequence_step(prompt, 0, PAGE_SIZE, num_row_pages, pad_to=pad_to)
    last, start = len(prompt) - 1, len(prompt)
    for _ in range(max_tokens):
        next_token, logits_V, kv = _greedy_step(
            model.weights, model.config, backend, step, kv, last
        )
        token = int(next_token)
        if token in model.tokenizer.eos_token_ids:
            return
        yield token, logits_V
        step = llama.single_sequence_step([token], start, PAGE_SIZE, num_row_pages)
        last, start = 0, start + 1


@functools.partial(jax.jit, static_argnames=("cfg", "backend"), donate_argnames=("kv",))
def _greedy_step(
    weights: Weights,
    cfg: ModelConfig,
    backend: Backend,
    step: llama.StepInput,
    kv: llama.KVCache,
    last: int,
) -> tuple[jax.Array, jax.Array, llama.KVCache]:
    """The argmax token after position `last` of row 0, its logits, and the updated cache."""
    hidden_TxD, kv = llama.forward(weights, cfg, step, kv, backend)
    logits_V = llama.logits(weights, cfg, hidden_TxD[last])
    return jnp.argmax(logits_V), logits_V, kv
