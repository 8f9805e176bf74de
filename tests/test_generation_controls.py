"""Sampling, stop conditions and finish reasons through the public API."""

from __future__ import annotations




async def test_seeded_sampling_is_reproducible_and_seed_dependent(client):
    params = dict(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, threshold=0.9)
    a = await client.generate("def add(a, b):", seed=7, **params)
    b = await client.generate("def add(a, b):", seed=7, **params)
    c = await client.generate("def add(a, b):", seed=8, **params)
    greedy = await client.generate("def add(a, b):", max_tokens=16, threshold=0.9)
    assert a.token_ids == b.token_ids and a.sources == b.sources
    assert a.token_ids != c.token_ids
    assert a.token_ids != greedy.token_ids


async def test_seeded_sampling_does_not_depend_on_batch_neighbours(client):
    import asyncio

    params = dict(max_tokens=12, temperature=0.8, seed=3, threshold=0.9)
    alone = await client.generate("class Stack:", **params)
    crowd = await asyncio.gather(*(client.generate(p, **params) for p in
                                   ["class Stack:", "for i in", "import os", "class Stack:"]))
    assert crowd[0].token_ids == alone.token_ids == crowd[3].token_ids


async def test_max_tokens_ends_with_length(client):
    r = await client.generate("for i in range(10):", max_tokens=5, threshold=1.5, ignore_eos=True)
    assert len(r.token_ids) == 5
    assert r.stats.finish_reason == "length" and r.stats.completion_tokens == 5


async def test_stop_sequence_truncates_and_ends_with_stop(client):
    free = await client.generate("def add(a, b):", max_tokens=20, threshold=1.5, ignore_eos=True)
    # A stop string taken from the middle of the free-running answer.
    stop = free.text[6:9]
    assert stop and stop in free.text
    r = await client.generate("def add(a, b):", max_tokens=20, threshold=1.5, ignore_eos=True, stop=[stop])
    assert r.stats.finish_reason == "stop" and r.stats.stop_sequence == stop
    assert r.text == free.text[: free.text.index(stop)]
    assert stop not in r.text
    assert r.token_ids == free.token_ids[: len(r.token_ids)]


async def test_stop_token_id_ends_with_stop(client):
    free = await client.generate("class Stack:", max_tokens=10, threshold=1.5, ignore_eos=True)
    target = free.token_ids[3]
    r = await client.generate("class Stack:", max_tokens=10, threshold=1.5, ignore_eos=True, stop_token_ids=[target])
    assert r.stats.finish_reason == "stop"
    assert r.token_ids == free.token_ids[: free.token_ids.index(target)]


async def test_streamed_text_equals_decoded_tokens(client, hf):
    r = await client.generate("Hello, world! Ünïcödé", max_tokens=30, threshold=0.9, ignore_eos=True)
    assert r.text == hf.tokenizer.decode(r.token_ids, skip_special_tokens=True)
    assert "\ufffd" not in "".join(t.text for t in r.tokens[:-3]) or "\ufffd" in r.text


async def test_chat_messages_use_the_template(client, hf):
    messages = [{"role": "user", "content": "Write a Python function that reverses a string"}]
    r = await client.generate(messages, max_tokens=8, threshold=1.5)
    ids = hf.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                          return_dict=True)["input_ids"]
    assert r.stats.prompt_tokens == len(ids)
    token_ids = await client.generate(list(ids), max_tokens=8, threshold=1.5)
    assert token_ids.token_ids == r.token_ids


async def test_server_info(client, services):
    info = await client.server_info()
    assert info.router_strategy == "entropy"
    assert info.slm_endpoints == [services.slm_target]
    assert info.max_context == 1024
