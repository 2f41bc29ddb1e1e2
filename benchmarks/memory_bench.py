"""PreferenceMemory speed with 10,000 users in SQLite: weights() and record_feedback() calls per second.

Run: python benchmarks/memory_bench.py [--users 10000] [--json]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import insert

from cliper_integrations.core.memory import PreferenceMemory, PreferenceProfile
from cliper_integrations.core.memory.backends import profiles

STYLE = {"concise": 0.7, "informative": 0.3, "friendly": 0.6, "unfriendly": 0.4}


def populate(memory: PreferenceMemory, users: int) -> list[str]:
    """Insert users in bulk (the benchmark measures reads and feedback, not the set-up)."""
    rng = random.Random(0)
    ids = [f"user-{n:05d}" for n in range(users)]
    rows = [
        {
            "user_id": user,
            "version": 1,
            "updated_at": datetime.now(timezone.utc),
            "profile": PreferenceProfile(
                strengths={
                    rng.choice(["concise", "informative"]): rng.random(),
                    rng.choice(["friendly", "unfriendly"]): rng.random(),
                }
            ).model_dump_json(),
        }
        for user in ids
    ]
    with memory.backend.engine.begin() as connection:
        connection.execute(insert(profiles), rows)
    return ids


def measure(call, arguments: list, seconds: float = 3.0) -> float:
    started, done = time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        call(*arguments[done % len(arguments)])
        done += 1
    return done / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        memory = PreferenceMemory(f"sqlite:///{Path(folder) / 'bench.sqlite3'}")
        ids = populate(memory, args.users)
        rng = random.Random(1)
        sample = [(rng.choice(ids),) for _ in range(5000)]
        weights_per_s = measure(memory.weights, sample)
        feedback_per_s = measure(memory.record_feedback, [(u, "An answer.", 1.0, STYLE) for (u,) in sample])
    result = {
        "users": args.users,
        "weights_calls_per_s": round(weights_per_s),
        "record_feedback_calls_per_s": round(feedback_per_s),
        "targets": {"weights": 5000, "record_feedback": 500},
    }
    print(json.dumps(result) if args.json else "\n".join(f"{k}: {v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
