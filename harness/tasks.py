"""Zero-shot tasks as lm-eval-harness defines them: documents -> log-likelihood requests.

Each task turns a document (``harness.data.load_task_docs`` schema) into an ``Item``: one
``Request(context, continuation)`` per answer choice, the gold index, and the strings whose
lengths ``acc_norm`` divides by. Templates follow EleutherAI/lm-evaluation-harness
(``lm_eval/tasks/<task>/*.yaml``), zero-shot, ``target_delimiter=" "``:

============== ================================================ ================================
task           context                                          continuation (per choice)
============== ================================================ ================================
arc_easy,      ``"Question: {question}\\nAnswer:"``              ``" " + choices.text[i]``
arc_challenge
piqa           ``"Question: {goal}\\nAnswer:"``                  ``" " + sol1`` / ``" " + sol2``
hellaswag      ``query`` (preprocessed, see harness.data)       ``" " + choices[i]``
winogrande     ``sentence[:blank] + option_i`` (partial         ``" " + sentence[blank+1:]``
               scoring: the choice is in the context)           ``.strip()`` (same for both)
boolq          ``"{passage}\\nQuestion: {question}?\\nAnswer:"``  ``" no"`` / ``" yes"``
lambada_openai ``text`` without its last " "-separated word     ``" " + last word`` (one request)
============== ================================================ ================================

Metrics (lm-eval ``api/task.py process_results``): ``acc`` = argmax of the summed continuation
log-likelihoods is gold; ``acc_norm`` = argmax of log-likelihood / ``len(choice)`` — lm-eval's
code divides by the *character* length of the choice string (``float(len(i)) for i in
choices``; its docs say "byte length", identical for ASCII text) — reported where the task's
yaml lists it (ARC, PIQA, HellaSwag). LAMBADA: ``acc`` = the whole last word is the greedy
continuation, ``perplexity`` = exp(−mean over documents of the word's log-likelihood).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["Request", "Item", "Task", "TASKS"]


@dataclass(frozen=True, kw_only=True)
class Request:
    context: str  # conditioning text
    continuation: str  # text whose log-likelihood is scored


@dataclass(frozen=True, kw_only=True)
class Item:
    requests: tuple[Request, ...]  # one per choice (one for loglikelihood tasks)
    gold: int  # index of the correct choice
    choices: tuple[str, ...]  # lm-eval's doc_to_choice strings; acc_norm divides by len()


@dataclass(frozen=True, kw_only=True)
class Task:
    name: str
    kind: str  # "multiple_choice" or "loglikelihood"
    metrics: tuple[str, ...]  # what lm-eval reports for it
    to_item: Callable[[dict[str, Any]], Item]


def _mc(context: str, choices: list[str], gold: int) -> Item:
    if not 0 <= gold < len(choices):
        raise ValueError(f"gold index {gold} outside {len(choices)} choices")
    return Item(
        requests=tuple(Request(context=context, continuation=" " + c) for c in choices),
        gold=gold,
        choices=tuple(choices),
    )


def _arc(doc: dict[str, Any]) -> Item:
    labels = list(doc["choices"]["label"])
    return _mc(
        f"Question: {doc['question']}\nAnswer:",
        list(doc["choices"]["text"]),
        labels.index(doc["answerKey"]),
    )


def _piqa(doc: dict[str, Any]) -> Item:
    return _mc(f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], int(doc["label"]))


def _hellaswag(doc: dict[str, Any]) -> Item:
    return _mc(doc["query"], list(doc["choices"]), int(doc["label"]))


def _boolq(doc: dict[str, Any]) -> Item:
    return _mc(
        f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:", ["no", "yes"], int(doc["label"])
    )


def _winogrande(doc: dict[str, Any]) -> Item:
    sentence = doc["sentence"]
    blank = sentence.index("_")
    target = " " + sentence[blank + 1 :].strip()
    contexts = [sentence[:blank] + doc["option1"], sentence[:blank] + doc["option2"]]
    gold = {"1": 0, "2": 1}[str(doc["answer"])]
    return Item(
        requests=tuple(Request(context=c, continuation=target) for c in contexts),
        gold=gold,
        choices=tuple(contexts),
    )


def _lambada(doc: dict[str, Any]) -> Item:
    words = doc["text"].split(" ")
    if len(words) < 2:
        raise ValueError(f"LAMBADA text has no last word to predict: {doc['text']!r}")
    last = " " + words[-1]
    return Item(
        requests=(Request(context=" ".join(words[:-1]), continuation=last),),
        gold=0,
        choices=(last,),
    )


TASKS: dict[str, Task] = {
    "arc_easy": Task(
        name="arc_easy", kind="multiple_choice", metrics=("acc", "acc_norm"), to_item=_arc
    ),
    "arc_challenge": Task(
        name="arc_challenge", kind="multiple_choice", metrics=("acc", "acc_norm"), to_item=_arc
    ),
    "piqa": Task(name="piqa", kind="multiple_choice", metrics=("acc", "acc_norm"), to_item=_piqa),
    "hellaswag": Task(
        name="hellaswag", kind="multiple_choice", metrics=("acc", "acc_norm"), to_item=_hellaswag
    ),
    "winogrande": Task(
        name="winogrande", kind="multiple_choice", metrics=("acc",), to_item=_winogrande
    ),
    "boolq": Task(name="boolq", kind="multiple_choice", metrics=("acc",), to_item=_boolq),
    "lambada_openai": Task(
        name="lambada_openai", kind="loglikelihood", metrics=("acc", "perplexity"), to_item=_lambada
    ),
}
