from __future__ import annotations

import json

import datasets
import pytest

from zephyr.data.mixing import load_mixture
from zephyr.data.rejects import Rejects
from zephyr.errors import ConfigError, DataError


def sft_rows(name, n):
    return [
        {"messages": [{"role": "user", "content": f"{name}{i}"}, {"role": "assistant", "content": "ok"}]}
        for i in range(n)
    ]


def write_split(folder, split, rows):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{split}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def two_sources(tmp_path):
    """Source a: 10 train_sft rows a0..a9 and 2 test_sft rows; source b: 20 train_sft rows b0..b19, 3 test_sft."""
    a, b = tmp_path / "a", tmp_path / "b"
    write_split(a, "train_sft", sft_rows("a", 10))
    write_split(a, "test_sft", sft_rows("ta", 2))
    write_split(b, "train_sft", sft_rows("b", 20))
    write_split(b, "test_sft", sft_rows("tb", 3))
    return str(a), str(b)


def prompts(dataset):
    return [m[0]["content"] for m in dataset["messages"]]


def mix(**kwargs):
    return load_mixture(kind="sft", rejects=Rejects(), **kwargs)


# ---------------------------------------------------------------- dataset_name


def test_dataset_name_keeps_both_splits_in_order(two_sources):
    a, _ = two_sources
    out = mix(dataset_name=a, dataset_train_split="train_sft", dataset_test_split="test_sft")
    assert prompts(out["train"]) == [f"a{i}" for i in range(10)]
    assert prompts(out["test"]) == ["ta0", "ta1"]
    assert out["train"][0]["_origin"] == f"{a}/train_sft.jsonl:1"


def test_dataset_name_without_test_split(tmp_path):
    path = write_split(tmp_path, "mine", sft_rows("m", 4))
    out = mix(dataset_name=str(path))  # a lone file is the train split
    assert list(out) == ["train"] and len(out["train"]) == 4


def test_dataset_name_missing_train_split(two_sources):
    with pytest.raises(DataError, match="there is no split 'train'; its splits are: test_sft, train_sft"):
        mix(dataset_name=two_sources[0])


def test_dataset_name_test_split_size(tmp_path):
    path = write_split(tmp_path, "train", sft_rows("m", 10))
    out = mix(dataset_name=str(path), test_split_size=0.2, seed=1)
    assert (len(out["train"]), len(out["test"])) == (8, 2)
    assert sorted(prompts(out["train"]) + prompts(out["test"])) == sorted(f"m{i}" for i in range(10))


# ---------------------------------------------------------------- dataset_mixer (handbook, first form)


def test_dataset_mixer_matches_the_handbook(two_sources):
    """Train: the first int(0.5 * 10) = 5 rows of a and int(0.25 * 20) = 5 of b, concatenated, shuffled with the
    seed; test: all 2 + 3 rows, concatenated, shuffled with the seed."""
    a, b = two_sources
    out = mix(dataset_mixer={a: 0.5, b: 0.25}, dataset_splits=["train_sft", "test_sft"], seed=42)
    ids = [f"a{i}" for i in range(5)] + [f"b{i}" for i in range(5)]
    expected_train = datasets.Dataset.from_dict({"id": ids}).shuffle(seed=42)["id"]
    expected_test = datasets.Dataset.from_dict({"id": ["ta0", "ta1", "tb0", "tb1", "tb2"]}).shuffle(seed=42)[
        "id"
    ]
    assert prompts(out["train"]) == expected_train
    assert prompts(out["test"]) == expected_test
    assert sorted(expected_train) != expected_train  # the shuffle did something


def test_dataset_mixer_is_deterministic_per_seed(two_sources):
    a, b = two_sources
    args = {"dataset_mixer": {a: 1.0, b: 1.0}, "dataset_splits": ["train_sft"]}
    first, again, other = (prompts(mix(seed=s, **args)["train"]) for s in (7, 7, 8))
    assert first == again and first != other
    assert sorted(first) == sorted(other) and len(first) == 30


def test_dataset_mixer_row_counts(two_sources):
    a, b = two_sources
    out = mix(dataset_mixer={a: 3, b: 1}, dataset_splits=["train_sft"])
    # 3 is a row count (the first 3 rows); 1 means the whole split.
    assert sorted(prompts(out["train"])) == sorted(["a0", "a1", "a2"] + [f"b{i}" for i in range(20)])
    assert list(out) == ["train"]


@pytest.mark.parametrize(
    ("fraction", "message"),
    [
        (0, r"must be a fraction in \(0, 1\] or a row count > 1, got 0"),
        (-0.5, r"must be a fraction in \(0, 1\] or a row count > 1, got -0.5"),
        (1.5, r"must be a fraction in \(0, 1\] or a row count > 1, got 1.5"),
        ("half", "must be a number, got 'half'"),
        (11, r"asks for 11 rows of .* \(train_sft\), which has only 10"),
    ],
)
def test_dataset_mixer_bad_fractions(two_sources, fraction, message):
    with pytest.raises(ConfigError, match=message):
        mix(dataset_mixer={two_sources[0]: fraction}, dataset_splits=["train_sft"])


def test_dataset_mixer_config_errors(two_sources):
    a, b = two_sources
    with pytest.raises(ConfigError, match="dataset_configs has 1 entries but dataset_mixer has 2 datasets"):
        mix(dataset_mixer={a: 1.0, b: 1.0}, dataset_splits=["train_sft"], dataset_configs=["default"])
    with pytest.raises(ConfigError, match="'validation' names neither a train nor a test split"):
        mix(dataset_mixer={a: 1.0}, dataset_splits=["train_sft", "validation"])
    with pytest.raises(ConfigError, match="has no train split"):
        mix(dataset_mixer={a: 1.0}, dataset_splits=["test_sft"])
    with pytest.raises(DataError, match="there is no split 'test'"):
        mix(dataset_mixer={a: 1.0}, dataset_splits=["train_sft", "test"])


def test_dataset_mixer_default_splits_skip_a_missing_test(tmp_path):
    write_split(tmp_path / "c", "train", sft_rows("c", 4))
    out = mix(dataset_mixer={str(tmp_path / "c"): 0.5})
    assert list(out) == ["train"] and len(out["train"]) == 2


def test_exactly_one_form(two_sources):
    a, _ = two_sources
    with pytest.raises(ConfigError, match="set exactly one of dataset_name, dataset_mixer, dataset_mixture"):
        mix()
    with pytest.raises(ConfigError, match=r"\(got dataset_name and dataset_mixer\)"):
        mix(dataset_name=a, dataset_mixer={a: 1.0})


# ---------------------------------------------------------------- dataset_mixture (handbook, newer form)


def test_dataset_mixture_weights_and_seed(two_sources):
    """Each weighted source is shuffled with the seed and cut to int(weight * rows), then all are concatenated and
    shuffled with the seed: 0.5 * 10 = 5 rows of a, all 20 of b."""
    a, b = two_sources
    mixture = {
        "datasets": [{"id": a, "split": "train_sft", "weight": 0.5}, {"id": b, "split": "train_sft"}],
        "seed": 3,
    }
    out = mix(dataset_mixture=mixture, seed=99)  # the mixture's own seed wins
    ids_a = datasets.Dataset.from_dict({"id": [f"a{i}" for i in range(10)]}).shuffle(seed=3)["id"][:5]
    expected = datasets.Dataset.from_dict({"id": ids_a + [f"b{i}" for i in range(20)]}).shuffle(seed=3)["id"]
    assert prompts(out["train"]) == expected
    assert list(out) == ["train"]


def test_dataset_mixture_test_split_size(two_sources):
    a, b = two_sources
    entries = [{"id": a, "split": "train_sft"}, {"id": b, "split": "train_sft", "weight": 0.5}]
    out = mix(dataset_mixture={"datasets": entries, "seed": 0, "test_split_size": 0.2})
    # 10 + 10 = 20 rows; datasets rounds the test share up: ceil(0.2 * 20) = 4.
    assert (len(out["train"]), len(out["test"])) == (16, 4)
    again = mix(dataset_mixture={"datasets": entries, "seed": 0, "test_split_size": 0.2})
    assert prompts(again["test"]) == prompts(out["test"])
    assert not set(prompts(out["train"])) & set(prompts(out["test"]))
    counted = mix(dataset_mixture=entries, test_split_size=3)  # a bare list, a row count
    assert len(counted["test"]) == 3 and len(counted["train"]) == 17


def test_dataset_mixture_columns_and_schema(tmp_path):
    """`columns` keeps the listed raw columns, so ultrafeedback_binarized can be read as SFT from its messages."""
    row = {
        "prompt": "q",
        "prompt_id": "x",
        "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
        "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}],
        "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
        "score_chosen": 1.0,
        "score_rejected": 0.0,
    }
    write_split(tmp_path / "uf", "train_prefs", [row])
    entry = {"id": str(tmp_path / "uf"), "split": "train_prefs"}
    prefs = load_mixture(kind="preference", dataset_mixture=[entry], rejects=Rejects())
    assert prefs["train"][0]["chosen"] == [{"role": "assistant", "content": "a"}]
    sft = mix(dataset_mixture=[{**entry, "columns": ["messages"]}])
    assert sft["train"][0]["messages"] == row["messages"]
    explicit = mix(dataset_mixture=[{**entry, "schema": "messages"}])
    assert explicit["train"][0]["messages"] == row["messages"]


def test_dataset_mixture_errors(two_sources):
    a, _ = two_sources
    with pytest.raises(
        ConfigError,
        match=r"unknown key 'wieght' in dataset_mixture.datasets\[0\] \(did you mean 'weight'\?\)",
    ):
        mix(dataset_mixture=[{"id": a, "split": "train_sft", "wieght": 0.5}])
    with pytest.raises(
        ConfigError, match=r"unknown key 'test_size' in dataset_mixture \(did you mean 'test_split_size'\?\)"
    ):
        mix(dataset_mixture={"datasets": [a], "test_size": 0.1})
    with pytest.raises(
        ConfigError, match=r"dataset_mixture.datasets\[0\].weight must be a fraction in \(0, 1\], got 2"
    ):
        mix(dataset_mixture=[{"id": a, "split": "train_sft", "weight": 2}])
    with pytest.raises(ConfigError, match="dataset_mixture needs a non-empty list of datasets"):
        mix(dataset_mixture={"datasets": [], "seed": 1})
    with pytest.raises(ConfigError, match="test_split_size=30 cannot split 10 rows"):
        mix(dataset_mixture=[{"id": a, "split": "train_sft"}], test_split_size=30)


def test_preference_sources_with_and_without_scores_concatenate(tmp_path):
    """Fixed features: a source with no scores (null) mixes with one that has float scores."""
    plain = write_split(tmp_path / "p", "train", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    scored_row = {"prompt": "q2", "chosen": "c", "rejected": "d", "score_chosen": 8, "score_rejected": 3}
    scored = write_split(tmp_path / "s", "train", [scored_row])
    out = load_mixture(
        kind="preference", dataset_mixer={str(plain): 1.0, str(scored): 1.0}, rejects=Rejects()
    )
    assert sorted(out["train"]["score_chosen"], key=str) == [8.0, None]
