"""Greedy decoding speed of the embedded model in float32 and bfloat16, measured in one run.

    python benchmarks/dtype_speed.py

Eight chat prompts in one batch, 64 new tokens each, plain transformers ``generate`` (no guidance),
float32, bfloat16, then float32 again so that drift of a noisy machine shows; also prints each run's
first answer's opening, to see whether bfloat16 changes the greedy text.
"""

from __future__ import annotations

import time

import torch

from cliper_integrations.core.models import load_model

PROMPTS = ["Explain how rain forms.", "What is a binary tree?", "Give three tips for sleep.", "Describe Paris."] * 2
NEW_TOKENS = 64


def main() -> None:
    loaded = load_model("embedded")
    model, tokenizer = loaded.model, loaded.tokenizer
    tokenizer.padding_side = "left"
    chats = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in PROMPTS
    ]
    batch = tokenizer(chats, return_tensors="pt", padding=True)
    for dtype in (torch.float32, torch.bfloat16, torch.float32):
        model.to(dtype)
        with torch.inference_mode():
            model.generate(**batch, max_new_tokens=4, do_sample=False)  # warm-up
            started = time.perf_counter()
            out = model.generate(**batch, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
            seconds = time.perf_counter() - started
        opening = tokenizer.decode(out[0, batch.input_ids.shape[1] :][:20])
        print(f"{dtype}: {len(PROMPTS) * NEW_TOKENS / seconds:.1f} tokens/s  {opening!r}")


if __name__ == "__main__":
    main()
