"""Our decoder against HF transformers (torch, float32) on three models.

SmolLM2 from the default GGUF (quantized weights, llama.cpp's q/k permutation undone), a tiny
random Llama-3 with llama3 rope scaling read from sharded safetensors, and a tiny random Qwen2
with q/k/v bias and tied embeddings. Greedy generation runs through `tfjax generate`'s jitted
path; the logits it picked each token from (last prompt position, then every decode step over
the paged cache) are checked against one HF forward pass over prompt + generated tokens.
Relative error is max|ours - hf| / max|hf|.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from models import LoadedModel, llama, load_model
from serving.generate_cmd import generate_greedy

NUM_NEW_TOKENS = 32
MAX_REL_ERR = 1e-4


@dataclass
class Case:
    ours: LoadedModel
    hf_model: Any
    prompt: list[int]
    tokens: list[int]  # our greedy tokens
    logits_NxV: np.ndarray  # the logits each was picked from


@pytest.fixture(scope="module", params=["smollm2", "llama3", "qwen2"])
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Case:
    import torch
    from transformers import AutoModelForCausalLM

    if request.param == "smollm2":
        hf_model, _ = request.getfixturevalue("hf_smollm2")
        cache_dir = request.getfixturevalue("model_cache_dir")
        ours = load_model("default", dtype="float32", cache_dir=cache_dir)
        story = "Write a short story about a robot who learns to paint."
        text = ours.tokenizer.apply_chat_template([{"role": "user", "content": story}])
    else:
        directory = request.getfixturevalue(f"tiny_{request.param}_dir")
        hf_model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        ours = load_model(str(directory), dtype="float32", cache_dir=tmp_path_factory.mktemp("c"))
        text = "the quick brown fox jumps over the lazy dog, hello world"
    prompt = ours.tokenizer.encode(text)
    steps = list(generate_greedy(ours, prompt, NUM_NEW_TOKENS))
    tokens = [token for token, _ in steps]
    logits_NxV = np.stack([np.asarray(logits_V) for _, logits_V in steps])
    return Case(ours=ours, hf_model=hf_model, prompt=prompt, tokens=tokens, logits_NxV=logits_NxV)


def _hf_logits(hf_model: Any, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].numpy()


def _rel_err(got: np.ndarray, want: np.ndarray) -> float:
    assert got.shape == want.shape
    return float(np.abs(got - want).max() / np.abs(want).max())


def test_greedy_generation_matches_hf(case: Case) -> None:
    import torch

    eos = sorted(case.ours.tokenizer.eos_token_ids)
    with torch.no_grad():
        out = case.hf_model.generate(
            torch.tensor([case.prompt]),
            max_new_tokens=NUM_NEW_TOKENS,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=eos[0],
        )
    want = [t for t in out[0, len(case.prompt) :].tolist() if t not in eos]
    assert case.tokens == want
    assert len(case.tokens) > 8  # a generation that stops at once would prove little


def test_prefill_and_decode_logits_match_hf(case: Case) -> None:
    want = _hf_logits(case.hf_model, case.prompt + case.tokens)
    first = len(case.prompt) - 1
    assert _rel_err(case.logits_NxV, want[first : first + len(case.tokens)]) < MAX_REL_ERR


@pytest.mark.parametrize("case", ["llama3", "qwen2"], indirect=True)  # 30 layers eagerly: slow
def test_every_prompt_position_matches_hf(case: Case) -> None:
    """All prompt positions of one eager pass (the jitted path only returns the last)."""
    cfg, prompt = case.ours.config, case.prompt
    num_pages = len(prompt) // 16 + 1
    step = llama.single_sequence_step(prompt, 0, 16, num_pages)
    hidden, _ = llama.forward(
        case.ours.weights, cfg, step, llama.init_kv_cache(cfg, num_pages + 1, 16)
    )
    got = np.asarray(llama.logits(case.ours.weights, cfg, hidden))[: len(prompt)]
    assert _rel_err(got, _hf_logits(case.hf_model, prompt)) < MAX_REL_ERR


@pytest.mark.parametrize("case", ["smollm2"], indirect=True)
def test_default_model_answers_paris(case: Case) -> None:
    tokenizer = case.ours.tokenizer
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}]
    )
    tokens = [token for token, _ in generate_greedy(case.ours, tokenizer.encode(text), 16)]
    assert "Paris" in tokenizer.decode(tokens)


@pytest.mark.parametrize("case", ["llama3"], indirect=True)
def test_engine_logprobs_are_hf_log_softmax(case: Case) -> None:
    """The engine's logprobs, greedy and at temperature 0.7, are HF transformers' log-softmax
    of the same prompt and tokens (teacher-forced): the raw model's, whatever the sampling."""
    import torch

    from tests.fakes import drive
    from tests.test_engine import Recorder
    from tfjax.config import EngineConfig
    from tfjax.engine import Engine
    from tfjax.request import Request, SamplingParams
    from tfjax.runner_setup import make_runner
    from tfjax.sched.fcfs import FcfsPolicy

    config = EngineConfig(page_size=16, prefill_token_budget=64, max_batch_size=2)
    ours = case.ours
    runner = make_runner(ours.config, ours.weights, config, num_pages=32, max_model_len=256)
    runner.warmup()
    rec = Recorder()
    engine = Engine(runner, None, config, FcfsPolicy(chunked=True), emit=rec)
    settings = {"greedy": {}, "sampled": {"temperature": 0.7, "seed": 3}}  # no tokenizer: no EOS
    requests = [
        Request(name, case.prompt, SamplingParams(max_tokens=12, logprobs=5, **kw), 0, 10)
        for name, kw in settings.items()
    ]
    drive(engine, requests)
    first = len(case.prompt) - 1
    for r in requests:
        output = rec.tokens(r.request_id)
        logprobs = [lp for d in rec.deltas[r.request_id] if d.logprobs for lp in d.logprobs]
        assert len(output) == len(logprobs) == 12
        hf_logits = _hf_logits(case.hf_model, case.prompt + output)
        want = torch.log_softmax(torch.from_numpy(hf_logits), -1).numpy()[first:][: len(output)]
        got = [lp.logprob for lp in logprobs]
        np.testing.assert_allclose(got, want[np.arange(len(output)), output], atol=1e-4)
        for lp, row in zip(logprobs, want, strict=True):
            np.testing.assert_allclose([v for _, v in lp.top], np.sort(row)[::-1][:5], atol=1e-4)
