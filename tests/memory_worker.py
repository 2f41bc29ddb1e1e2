"""Subprocess helpers for the memory tests: concurrent writers, and a writer that gets killed."""

from __future__ import annotations

import sys

from cliper_integrations.core.memory import PreferenceMemory

STYLE = {"concise": 0.9, "informative": 0.1}
RATING = 0.01


def feedback_loop(url: str, user_id: str, count: int) -> None:
    memory = PreferenceMemory(url)
    for index in range(count):
        memory.record_feedback(user_id, f"response {index}", RATING, style=STYLE)


if __name__ == "__main__":
    url, user_id, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    print("ready", flush=True)
    feedback_loop(url, user_id, count)
