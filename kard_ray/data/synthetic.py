"""A synthetic knowledge-intensive task: the offline demo and the fast end-to-end test of KARD.

Fictional entities have facts that exist only in a generated corpus. Questions ask one fact each, as
multiple choice. Train and test are split **by entity**: a test entity never appears in training, so a
student can answer it only by reading a retrieved passage — exactly the situation KARD is built for.

Two task families share the machinery (`data.synthetic.family`): **towns** (one-word names, short
rationales: the demo) and **people** (two-word names, other attributes, longer rationales: the second
family the shipped recipe must also work on).

Every fact passage names a second entity in a *frame* ("Unlike Kravel, the main export of Zorbat is
silk."). A distractor for a fact uses the same frames and the same fact templates with the roles
swapped: the question's entity stands in the frame, and the fact is another entity's true fact whose
value is one of the question's wrong options ("Unlike Zorbat, the main export of Mobur is tin."). A
query made of the question and its options matches both about equally (entity, attribute words, one
option each), so question-only BM25 is fooled about half the time; a query made of the rationale (which
states the right value) is not — and since distractors and facts are written in the same templates, a
reranker distilled from rationale retrieval can only win by reading *whose* fact a sentence states
(`distractor_templates: facts`, the default). `distractor_templates: own` writes distractors in
templates the facts never use (the earlier demo): a tiny reranker then wins by recognising the template.

Everything is a pure function of the config and its seed.

    task = make_task(SyntheticConfig(seed=1))
    task.train_questions, task.test_questions, task.passages, task.rationales  # lists of dicts
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from kard_ray.config import SyntheticConfig


@dataclass(frozen=True)
class Family:
    """What a task family writes. attributes: name -> (question template, fact template, value pool);
    every value is one common word so a tokenizer trained on the task keeps it whole."""
    attributes: dict
    phrase: dict              # attribute -> how distractor and listing sentences name it
    frames: tuple             # sentences around a fact that name a second entity {x}: {fact} / {fact_lc}
    rationales: tuple         # {fact} {fact_lc} {v} {e} {p}
    own_distractors: tuple    # distractor-only templates (distractor_templates: own)
    listing: str              # names the entity next to the question's wrong options {w}
    name_words: int           # words per entity name
    name_syllables: int       # syllables per name word


# Value pools both families use (one word each).
INSTRUMENTS = ["harp", "lute", "drum", "flute", "horn", "violin", "organ", "zither", "bagpipe", "cello", "oboe", "banjo"]
DISHES = ["stew", "dumplings", "porridge", "pie", "noodles", "curry", "pancakes", "soup", "risotto", "kebab", "salad", "bread"]
SPORTS = ["rowing", "chess", "archery", "fencing", "polo", "cricket", "hockey", "sailing", "boxing", "tennis", "rugby", "skiing"]


TOWNS = Family(
    attributes={
        "export": ("What is the main export of {e}?", "The main export of {e} is {v}.",
                   ["copper", "silk", "salt", "tin", "amber", "wool", "coffee", "marble", "cotton", "timber", "pepper", "glass"]),
        "animal": ("Which animal is the emblem of {e}?", "The emblem of {e} is the {v}.",
                   ["heron", "wolf", "otter", "falcon", "badger", "lynx", "stag", "raven", "bison", "crane", "viper", "ibex"]),
        "color": ("What color is the flag of {e}?", "The flag of {e} is {v}.",
                  ["red", "green", "blue", "yellow", "purple", "orange", "white", "black", "silver", "crimson", "teal", "gold"]),
        "sport": ("Which sport is most popular in {e}?", "The most popular sport in {e} is {v}.",
                  SPORTS),
        "instrument": ("Which instrument is played at festivals in {e}?", "At festivals in {e} people play the {v}.",
                       INSTRUMENTS),
        "dish": ("What is the traditional dish of {e}?", "The traditional dish of {e} is {v}.",
                 DISHES),
    },
    phrase={"export": "main export", "animal": "emblem", "color": "flag", "sport": "popular sport",
            "instrument": "festival instrument", "dish": "traditional dish"},
    frames=("Unlike {x}, {fact_lc}", "Travellers from {x} say that {fact_lc}", "{fact} The same is not true of {x}.",
            "Compared with {x}, {fact_lc}"),
    rationales=("{fact} So the answer is {v}.",
                "According to the records, {fact_lc} Therefore, the answer is {v}.",
                "We know that {fact_lc} The answer is {v}.",
                "{fact} Hence {v} is correct, so the answer is {v}."),
    own_distractors=("Merchants of {e} often say the {a} of {o} is {w}.",
                     "Unlike {e}, the town of {o} is known for {w}, its {a}.",
                     "Travellers compare {e} with {o}, where the {a} is {w}."),
    listing="Markets in {e} sell {w}.",
    name_words=1,
    name_syllables=2,
)

PEOPLE = Family(
    attributes={
        "instrument": ("Which instrument does {e} play?", "{e} plays the {v}.",
                       INSTRUMENTS),
        "pet": ("What pet does {e} keep?", "{e} keeps a {v} as a pet.",
                ["parrot", "tortoise", "ferret", "rabbit", "goldfish", "hamster", "lizard", "pony", "goat", "canary", "snake", "beagle"]),
        "job": ("What does {e} do for a living?", "{e} works as a {v}.",
                ["baker", "pilot", "carpenter", "nurse", "tailor", "fisher", "miner", "potter", "sailor", "farmer", "judge", "chemist"]),
        "city": ("In which city was {e} born?", "{e} was born in {v}.",
                 ["Lisbon", "Oslo", "Cairo", "Lima", "Dublin", "Vienna", "Prague", "Nairobi", "Quito", "Hanoi", "Tunis", "Riga"]),
        "food": ("What is the favourite food of {e}?", "The favourite food of {e} is {v}.",
                 DISHES),
        "sport": ("Which sport does {e} coach?", "{e} coaches {v}.",
                  SPORTS),
    },
    phrase={"instrument": "instrument", "pet": "pet", "job": "job", "city": "birthplace", "food": "favourite food",
            "sport": "sport"},
    frames=("Unlike {x}, {fact_lc}", "A letter from {x} mentions that {fact_lc}", "{fact} Their friend {x} often says so.",
            "As {x} once told a reporter, {fact_lc}"),
    rationales=("The question asks about {e}, so we look for what the records say about their {p}. {fact} "
                "None of the other options is supported, so the answer is {v}.",
                "To answer this we need the {p} of {e}. According to the records, {fact_lc} "
                "Therefore the answer is {v}.",
                "We are asked about {e}. The records state that {fact_lc} This matches one of the options, "
                "so the answer is {v}."),
    own_distractors=("People who know {e} often say the {a} of {o} is {w}.",
                     "Unlike {e}, their neighbour {o} is known for {w}, the {a}.",
                     "Friends compare {e} with {o}, whose {a} is {w}."),
    listing="Neighbours of {e} talk about {w}.",
    # Two words of one syllable: a name as long to copy as a town's. Two-syllable words (names of ~5 BPE
    # pieces) made the demo's 2-layer student garble or loop on 23% of unseen names (README).
    name_words=2,
    name_syllables=1,
)

FAMILIES = {"towns": TOWNS, "people": PEOPLE}

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


# Short made-up words can be real ones ("The", "Tin"): a name must not be a function word, nor a value or
# a word of the family's sentences, or "The Gys works as a fisher" reads as an article and a name.
_NOT_NAMES = {"a", "an", "as", "at", "be", "by", "do", "go", "he", "in", "is", "it", "me", "my", "no", "of", "on",
              "or", "so", "to", "us", "we", "ye", "yet", "was", "say", "says", "sell", "kep", "ban", "bin",
              "but", "for", "not", "nor", "the", "they", "them", "then", "than", "thus", "this"}


def _word(rng: random.Random, syllables: int, reserved: set) -> str:
    while True:
        w = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))
        if 2 * syllables <= len(w) <= 9 and w not in reserved:
            return w.capitalize()


def _entity_names(n: int, fam: Family, rng: random.Random) -> list[str]:
    reserved = _NOT_NAMES | {w.lower() for a in fam.attributes.values() for t in a[:2] for w in t.split()}
    reserved |= {v.lower() for a in fam.attributes.values() for v in a[2]}
    names: set[str] = set()
    while len(names) < n:
        names.add(" ".join(_word(rng, fam.name_syllables, reserved) for _ in range(fam.name_words)))
    return sorted(names)


def entity_slug(name: str) -> str:
    """The entity's part of question and passage ids (lower case, no spaces)."""
    return name.lower().replace(" ", "_")


def _lc_first(s: str) -> str:
    """A fact continuing a sentence: "The main export ..." -> "the main export ..."; names keep their case."""
    return s[0].lower() + s[1:] if s.split()[0] in ("The", "At") else s


def _framed(fam: Family, rng: random.Random, fact: str, x: str) -> str:
    return rng.choice(fam.frames).format(fact=fact, fact_lc=_lc_first(fact), x=x)


def _distractors(fam: Family, cfg: SyntheticConfig, rng: random.Random, e: str, a: str, wrong: list[str],
                 holders: dict, entities: list[str], seen: set) -> list[str]:
    """The distractor sentences of entity e's attribute a: each states a wrong option of its question."""
    out = []
    for d in range(cfg.distractors_per_entity if rng.random() < cfg.distractor_rate else 0):
        w = wrong[d % len(wrong)]
        if cfg.distractor_templates == "facts":
            # another entity's true fact with that value (any entity when none holds it), e in the frame;
            # never a copy of a passage already written (the corpus dedup would drop one of the two ids)
            text = None
            while text is None or text in seen:
                o = rng.choice(holders.get(w) or [x for x in entities if x != e])
                text = _framed(fam, rng, fam.attributes[a][1].format(e=o, v=w), e)
            seen.add(text)
            out.append(text)
        else:
            o = rng.choice([x for x in entities if x != e])
            out.append(rng.choice(fam.own_distractors).format(e=e, o=o, a=fam.phrase[a], w=w))
    if rng.random() < cfg.listing_distractor_rate:
        listed = ", ".join(wrong[:-1]) + " and " + wrong[-1] if len(wrong) > 1 else wrong[0]
        out.append(fam.listing.format(e=e, w=listed))
    return out


def make_task(cfg: SyntheticConfig) -> SyntheticTask:
    fam = FAMILIES[cfg.family]
    rng = random.Random(cfg.seed)
    entities = _entity_names(cfg.n_train_entities + cfg.n_test_entities, fam, rng)
    rng.shuffle(entities)
    split = {e: ("train" if i < cfg.n_train_entities else "test") for i, e in enumerate(entities)}
    attrs = list(fam.attributes)[: cfg.n_attributes]
    facts = {e: {a: rng.choice(fam.attributes[a][2]) for a in attrs} for e in entities}
    holders = {a: {} for a in attrs}  # attribute -> value -> entities holding it
    for e in entities:
        for a in attrs:
            holders[a].setdefault(facts[e][a], []).append(e)

    passages: list[dict] = []
    seen: set[str] = set()
    questions = {"train": [], "test": []}
    rationales: list[dict] = []
    test_rationales: list[dict] = []
    for e in entities:
        for a in attrs:
            q_tmpl, fact_tmpl, pool = fam.attributes[a]
            value = facts[e][a]
            fact = fact_tmpl.format(e=e, v=value)
            pid = f"{entity_slug(e)}-{a}"
            if cfg.distractor_templates == "facts":  # framed by an entity whose value differs ("Unlike x, ...")
                fact_text = None
                while fact_text is None or fact_text in seen:
                    x = rng.choice(entities)
                    if x != e and facts[x][a] != value:
                        fact_text = _framed(fam, rng, fact, x)
                seen.add(fact_text)
            else:
                fact_text = fact
            passages.append({"id": pid, "title": e, "text": fact_text})

            wrong = rng.sample([v for v in pool if v != value], cfg.n_options - 1)
            options = wrong + [value]
            rng.shuffle(options)
            qid = f"{split[e]}-{entity_slug(e)}-{a}"
            questions[split[e]].append({"id": qid, "dataset": "synthetic", "split": split[e],
                                        "question": q_tmpl.format(e=e), "options": options,
                                        "answer": options.index(value)})
            for d, text in enumerate(_distractors(fam, cfg, rng, e, a, wrong, holders[a], entities, seen)):
                passages.append({"id": f"{pid}-d{d}", "title": e, "text": text})

            def rationale(v: str, f: str) -> str:
                return rng.choice(fam.rationales).format(fact=f, fact_lc=_lc_first(f), v=v, e=e, p=fam.phrase[a])

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
