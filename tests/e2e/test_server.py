"""`vllm-mla serve` as a subprocess (the tiny MoE model, bf16, compiled graph) with the openai
client: completion, chat, streaming, 32 concurrent requests; token counts checked against the
model's own tokenizer and the requested lengths."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from vllm_mla_backend.cli import Server, backend_from_log, server_env_defaults

pytestmark = pytest.mark.slow

MAX_TOKENS = 12
CONCURRENT = 32
FIXED_LENGTH = {"ignore_eos": True}    # vLLM sampling extra: exactly max_tokens tokens


@pytest.fixture(scope="module")
def server(tiny_moe, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = {**server_env_defaults(), "VLLM_MLA_BACKEND": "1"}
    args = ["--dtype", "bfloat16", "--max-model-len", "1024", "--max-num-seqs", str(CONCURRENT),
            "--max-num-batched-tokens", "256"]
    with Server(tiny_moe, args, env=env, log_path=log) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI
    return OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def tokenizer(tiny_moe):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_moe)


def test_our_backend_serves(server):
    assert "vllm-mla-backend active" in backend_from_log(server.log_path)


def test_completion(client, server, tokenizer):
    prompt = "The river town woke slowly in the autumn fog."
    out = client.completions.create(model=server.model_name, prompt=prompt, max_tokens=MAX_TOKENS,
                                    temperature=0.0, extra_body=FIXED_LENGTH)
    assert out.usage.prompt_tokens == len(tokenizer(prompt).input_ids)
    assert out.usage.completion_tokens == MAX_TOKENS
    assert out.choices[0].finish_reason == "length"
    assert out.choices[0].text


def test_chat(client, server, tokenizer):
    messages = [{"role": "system", "content": "You tell short stories."},
                {"role": "user", "content": "Tell me about the sea."}]
    out = client.chat.completions.create(model=server.model_name, messages=messages,
                                         max_tokens=MAX_TOKENS, temperature=0.0,
                                         extra_body=FIXED_LENGTH)
    expected_prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                    tokenize=True)
    if isinstance(expected_prompt, dict) or hasattr(expected_prompt, "input_ids"):
        expected_prompt = expected_prompt["input_ids"]
    assert out.usage.prompt_tokens == len(expected_prompt)
    assert out.usage.completion_tokens == MAX_TOKENS
    assert out.choices[0].message.role == "assistant"


def test_streaming_equals_non_streaming(client, server):
    prompt = "Once upon a time there was a small robot"
    whole = client.completions.create(model=server.model_name, prompt=prompt,
                                      max_tokens=MAX_TOKENS, temperature=0.0,
                                      extra_body=FIXED_LENGTH)
    chunks, usage = [], None
    for event in client.completions.create(model=server.model_name, prompt=prompt,
                                           max_tokens=MAX_TOKENS, temperature=0.0, stream=True,
                                           stream_options={"include_usage": True},
                                           extra_body=FIXED_LENGTH):
        if event.choices:
            chunks.append(event.choices[0].text)
        if event.usage is not None:
            usage = event.usage
    assert len(chunks) > 1, "the answer did not stream"
    assert "".join(chunks) == whole.choices[0].text
    assert usage is not None and usage.completion_tokens == MAX_TOKENS


def test_concurrent_requests(client, server, tokenizer):
    prompts = [f"Question {i}: how many days are in {i % 7 + 1} weeks? Answer:"
               for i in range(CONCURRENT)]

    def complete(prompt):
        return client.completions.create(model=server.model_name, prompt=prompt,
                                         max_tokens=MAX_TOKENS, temperature=0.0,
                                         extra_body=FIXED_LENGTH)

    with ThreadPoolExecutor(CONCURRENT) as pool:
        outs = list(pool.map(complete, prompts))
    for prompt, out in zip(prompts, outs):
        assert out.usage.prompt_tokens == len(tokenizer(prompt).input_ids)
        assert out.usage.completion_tokens == MAX_TOKENS
        assert out.choices[0].finish_reason == "length"
