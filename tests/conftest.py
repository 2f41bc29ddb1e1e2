from __future__ import annotations

import pytest

from tests.tiny import build_tokenizer, tiny_classifier, tiny_loaded


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def base(tokenizer):
    return tiny_loaded("tiny-base", seed=0, tokenizer=tokenizer)


@pytest.fixture(scope="session")
def shared_classifier(base):
    return tiny_classifier(base, "shared")


@pytest.fixture(scope="session")
def separate_backbone(tokenizer):
    return tiny_loaded("tiny-backbone", seed=7, tokenizer=tokenizer)


@pytest.fixture(scope="session")
def separate_classifier(base, separate_backbone):
    return tiny_classifier(base, "separate", backbone=separate_backbone, seed=2)


@pytest.fixture(scope="session")
def bayes_classifier(base):
    return tiny_classifier(base, "shared", seed=3, form="bayes")


@pytest.fixture(scope="session")
def prior_classifier(base):
    return tiny_classifier(base, "shared", seed=4, form="bayes", class_prior="learned")


@pytest.fixture(params=["shared", "separate", "bayes", "bayes-prior"])
def classifier(request, shared_classifier, separate_classifier, bayes_classifier, prior_classifier):
    """Each way of scoring: the shared and the separate backbone (direct form), and the bayes form with a
    uniform and a learned class prior."""
    return {
        "shared": shared_classifier,
        "separate": separate_classifier,
        "bayes": bayes_classifier,
        "bayes-prior": prior_classifier,
    }[request.param]


@pytest.fixture(autouse=True)
def isolated_cache(request, tmp_path, monkeypatch):
    """Keep every test's cache (models, memory databases) out of the user's folders.

    Tests on the embedded model keep the real cache, so its one-time assembly is paid once.
    """
    if request.node.get_closest_marker("embedded") is None:
        monkeypatch.setenv("CLIPER_CACHE_DIR", str(tmp_path / "cache"))
