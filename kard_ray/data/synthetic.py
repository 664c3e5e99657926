"""A synthetic knowledge-intensive task: the offline demo and the fast end-to-end test of KARD.

Fictional entities (towns with made-up names) have facts that exist only in a generated corpus.
Questions ask one fact each, as multiple choice. Train and test are split **by entity**: a test
entity never appears in training, so a student can answer it only by reading a retrieved passage —
exactly the situation KARD is built for. Each fact passage has distractor passages that share its
words (the entity's name, the attribute's phrase) but state a wrong option. For a share of questions a
"listing" passage names the entity next to the question's wrong options: a query made of the question
and its options prefers it, a query made of the rationale (which names the right option and the
attribute) does not — so question-only BM25 is sometimes fooled, and the reranker, distilled from
rationale-retrieval, has something real to learn.

Everything is a pure function of the config and its seed.

    task = make_task(SyntheticConfig(seed=1))
    task.train_questions, task.test_questions, task.passages, task.rationales  # lists of dicts
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from kard_ray.config import SyntheticConfig

# attribute -> (question template, fact template, value pool). Every value is one common word so a
# tokenizer trained on the task keeps it whole.
ATTRIBUTES = {
    "export": ("What is the main export of {e}?", "The main export of {e} is {v}.",
               ["copper", "silk", "salt", "tin", "amber", "wool", "coffee", "marble", "cotton", "timber", "pepper", "glass"]),
    "animal": ("Which animal is the emblem of {e}?", "The emblem of {e} is the {v}.",
               ["heron", "wolf", "otter", "falcon", "badger", "lynx", "stag", "raven", "bison", "crane", "viper", "ibex"]),
    "color": ("What color is the flag of {e}?", "The flag of {e} is {v}.",
              ["red", "green", "blue", "yellow", "purple", "orange", "white", "black", "silver", "crimson", "teal", "gold"]),
    "sport": ("Which sport is most popular in {e}?", "The most popular sport in {e} is {v}.",
              ["rowing", "chess", "archery", "fencing", "polo", "cricket", "hockey", "sailing", "boxing", "tennis", "rugby", "skiing"]),
    "instrument": ("Which instrument is played at festivals in {e}?", "At festivals in {e} people play the {v}.",
                   ["harp", "lute", "drum", "flute", "horn", "violin", "organ", "zither", "bagpipe", "cello", "oboe", "banjo"]),
    "dish": ("What is the traditional dish of {e}?", "The traditional dish of {e} is {v}.",
             ["stew", "dumplings", "porridge", "pie", "noodles", "curry", "pancakes", "soup", "risotto", "kebab", "salad", "bread"]),
}

# Distractors: same entity and attribute phrase, but the value belongs to somebody else.
DISTRACTOR_TEMPLATES = [
    "Merchants of {e} often say the {a} of {o} is {v}.",
    "Unlike {e}, the town of {o} is known for {v}, its {a}.",
    "Travellers compare {e} with {o}, where the {a} is {v}.",
]
LISTING_TEMPLATE = "Markets in {e} sell {w}."
ATTRIBUTE_PHRASE = {"export": "main export", "animal": "emblem", "color": "flag", "sport": "popular sport",
                    "instrument": "festival instrument", "dish": "traditional dish"}

RATIONALE_TEMPLATES = [
    "{fact} So the answer is {v}.",
    "According to the records, {fact_lc} Therefore, the answer is {v}.",
    "We know that {fact_lc} The answer is {v}.",
    "{fact} Hence {v} is correct, so the answer is {v}.",
]

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr", "tr", "th", "sk", "qu"]
_VOWELS = ["a", "e", "i", "o", "u", "ae", "y"]
_CODAS = ["", "n", "r", "s", "l", "k", "th", "x", "m"]


@dataclass
class SyntheticTask:
    train_questions: list[dict]
    test_questions: list[dict]
    passages: list[dict]
    rationales: list[dict]  # teacher-style rationales for train questions: {question_id, sample, text}
    test_rationales: list[dict]  # one gold rationale per test question (for the oracle retrieval mode)
    entity_split: dict[str, str]


def _entity_names(n: int, rng: random.Random) -> list[str]:
    names: set[str] = set()
    while len(names) < n:
        syll = lambda: rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)  # noqa: E731
        name = (syll() + syll()).capitalize()
        if 4 <= len(name) <= 9:
            names.add(name)
    return sorted(names)


def _lc_first(s: str) -> str:
    return s[0].lower() + s[1:]


def make_task(cfg: SyntheticConfig) -> SyntheticTask:
    rng = random.Random(cfg.seed)
    n_entities = cfg.n_train_entities + cfg.n_test_entities
    entities = _entity_names(n_entities, rng)
    rng.shuffle(entities)
    split = {e: ("train" if i < cfg.n_train_entities else "test") for i, e in enumerate(entities)}
    attrs = list(ATTRIBUTES)[: cfg.n_attributes]

    facts = {e: {a: rng.choice(ATTRIBUTES[a][2]) for a in attrs} for e in entities}
    passages: list[dict] = []
    questions = {"train": [], "test": []}
    rationales: list[dict] = []
    test_rationales: list[dict] = []

    for e in entities:
        for a in attrs:
            q_tmpl, fact_tmpl, pool = ATTRIBUTES[a]
            value = facts[e][a]
            fact = fact_tmpl.format(e=e, v=value)
            pid = f"{e.lower()}-{a}"
            passages.append({"id": pid, "title": e, "text": fact})

            wrong = rng.sample([v for v in pool if v != value], cfg.n_options - 1)
            options = wrong + [value]
            rng.shuffle(options)
            answer = options.index(value)
            qid = f"{split[e]}-{e.lower()}-{a}"
            questions[split[e]].append({"id": qid, "dataset": "synthetic", "split": split[e],
                                        "question": q_tmpl.format(e=e), "options": options, "answer": answer})

            # Distractors state a *wrong option* of this question next to the entity's name.
            for d in range(cfg.distractors_per_entity):
                other = rng.choice([x for x in entities if x != e])
                text = rng.choice(DISTRACTOR_TEMPLATES).format(e=e, o=other, a=ATTRIBUTE_PHRASE[a], v=wrong[d % len(wrong)])
                passages.append({"id": f"{pid}-d{d}", "title": e, "text": text})
            if rng.random() < cfg.listing_distractor_rate:
                listed = ", ".join(wrong[:-1]) + " and " + wrong[-1] if len(wrong) > 1 else wrong[0]
                passages.append({"id": f"{pid}-l", "title": e, "text": LISTING_TEMPLATE.format(e=e, w=listed)})

            def rationale(v: str, f: str) -> str:
                return rng.choice(RATIONALE_TEMPLATES).format(fact=f, fact_lc=_lc_first(f), v=v)

            if split[e] == "train":
                for s in range(cfg.rationales_per_question):
                    if rng.random() < cfg.wrong_rationale_rate:
                        v = rng.choice(wrong)
                        text = rationale(v, fact_tmpl.format(e=e, v=v))
                    else:
                        text = rationale(value, fact)
                    rationales.append({"question_id": qid, "sample": s, "text": text})
            else:
                test_rationales.append({"question_id": qid, "sample": 0, "text": rationale(value, fact)})

    rng.shuffle(passages)
    return SyntheticTask(questions["train"], questions["test"], passages, rationales, test_rationales, split)


def task_texts(task: SyntheticTask) -> list[str]:
    """All text of the task, for training a tokenizer on it."""
    out = [f"{p['title']} . {p['text']}" for p in task.passages]
    for q in task.train_questions + task.test_questions:
        out.append(q["question"] + " " + " ".join(q["options"]))
    out.extend(r["text"] for r in task.rationales)
    return out
