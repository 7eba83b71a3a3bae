"""A small mixed workload against vLLM's OpenAI completions API (aiohttp client, concurrent requests so
steps mix prefill and decode). Returns, per request, the token ids vLLM computed, for exact checks."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

import aiohttp

from .launch import SERVED_NAME

ORDINARY = ("the quick brown fox jumps over a lazy dog while seven bright stars watch the quiet river and "
            "people talk about weather music books cities gardens trains and small green lamps").split()


@dataclass
class Completed:
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    cached_tokens: int = 0  # prompt tokens served from vLLM's prefix cache (never routed)

    @property
    def sequence(self) -> list[int]:
        """Every token the request's KV cache holds when it ends: the prompt and all generated tokens but
        the last (which is sampled, never run through the model)."""
        return self.prompt_token_ids + self.output_token_ids[:-1]

    @property
    def computed_token_ids(self) -> list[int]:
        """Tokens vLLM ran through the model (and routed): the sequence minus its prefix-cached head."""
        return self.sequence[self.cached_tokens:]


def prompts(n: int, hot_words: list[str] = (), hot_share: float = 0.0, seed: int = 0,
            words_per_prompt: tuple[int, int] = (6, 40)) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(ORDINARY) for _ in range(rng.randint(*words_per_prompt))]
        if hot_words:
            words = [rng.choice(hot_words) if rng.random() < hot_share else w for w in words]
        out.append(" ".join(words))
    return out


async def _complete(session: aiohttp.ClientSession, url: str, prompt: str, max_tokens: int) -> Completed:
    body = {"model": SERVED_NAME, "prompt": prompt, "max_tokens": max_tokens, "min_tokens": max_tokens,
            "temperature": 0.0, "return_token_ids": True, "ignore_eos": True}
    async with session.post(f"{url}/v1/completions", json=body) as resp:
        data = await resp.json()
        if resp.status != 200:
            raise RuntimeError(f"vLLM answered {resp.status}: {data}")
    choice = data["choices"][0]
    details = (data.get("usage") or {}).get("prompt_tokens_details") or {}
    return Completed(list(choice["prompt_token_ids"]), list(choice["token_ids"]),
                     int(details.get("cached_tokens") or 0))


async def _run(url: str, texts: list[str], max_tokens: int, concurrency: int) -> list[Completed]:
    sem = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async def one(text: str, i: int) -> Completed:
            async with sem:
                return await _complete(session, url, text, max_tokens + i % 5)
        return await asyncio.gather(*(one(t, i) for i, t in enumerate(texts)))


def run(url: str, texts: list[str], max_tokens: int = 8, concurrency: int = 4) -> list[Completed]:
    """Send every prompt (greedy, exactly max_tokens + i%5 tokens each) and wait for all of them."""
    return asyncio.run(_run(url, texts, max_tokens, concurrency))


def run_until(url: str, done, hot_words: list[str] = (), seed: int = 0, batch: int = 6, max_tokens: int = 4,
              concurrency: int = 3) -> int:
    """Batches of prompt-heavy requests (30-60 words; 90 % hot words when hot_words are given) until done()
    is true, checked between batches. Returns the number of batches sent."""
    sent = 0
    while not done():
        texts = prompts(batch, hot_words, hot_share=0.9, seed=seed + sent, words_per_prompt=(30, 60))
        run(url, texts, max_tokens=max_tokens, concurrency=concurrency)
        sent += 1
    return sent
