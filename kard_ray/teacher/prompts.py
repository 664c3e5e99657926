"""Teacher prompts (KARD.md §1): instruction, few-shot examples, question, lettered options, gold answer.

The teacher *rationalises*: it is shown the gold answer and asked to explain it step by step, ending
with a sentence the parser reads ("Therefore, the answer is (B) no."). Prompts are chat messages
(system instruction, then one user/assistant pair per few-shot example, then the question), so any
chat model or OpenAI-compatible endpoint takes them as they are; `render_plain` flattens them for
models without a chat template.

Few-shot examples come from a JSONL file (`teacher.few_shot_path`), one object a line:
`{"question": str, "options": [str, ...], "answer": int | letter | option text, "rationale": str}`;
without a file, each dataset has a small built-in set written for this project.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from kard_ray import io

LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class Template:
    """Per-dataset wording. `domain` is spliced into the instruction ("... questions about X")."""

    domain: str

    def instruction(self, with_answer: bool) -> str:
        about = f" about {self.domain}" if self.domain else ""
        head = f"The following are multiple-choice questions{about}."
        if with_answer:
            return (head + " Each comes with its correct answer. Explain step by step why that answer is "
                    "correct, using the knowledge the question needs, and end with a sentence of the form "
                    "\"Therefore, the answer is (X) <option>.\"")
        # The authors' solving instruction (KARD.md §1), used when the gold answer is withheld.
        return head + " Solve them in a step-by-step fashion. Output a single option as the final answer."


TEMPLATES: dict[str, Template] = {
    "strategyqa": Template(""),
    "medqa": Template("medical knowledge"),
    "obqa": Template("elementary science"),
    "synthetic": Template("fictional towns"),
    "generic": Template(""),
}

# Small built-in few-shot sets (written for this project; override with teacher.few_shot_path).
BUILTIN_FEW_SHOT: dict[str, list[dict]] = {
    "strategyqa": [
        {"question": "Could a bee survive a trip to the bottom of the Mariana Trench?", "options": ["yes", "no"],
         "answer": 1,
         "rationale": "The bottom of the Mariana Trench is about 11 km below the sea surface, where the "
                      "water pressure is over 1,000 times the pressure at sea level. Bees breathe air through "
                      "spiracles and cannot live under water, let alone under such pressure. Therefore, the "
                      "answer is (B) no."},
        {"question": "Is the Eiffel Tower older than the Statue of Liberty's dedication?", "options": ["yes", "no"],
         "answer": 1,
         "rationale": "The Statue of Liberty was dedicated in 1886. The Eiffel Tower was completed in 1889 for "
                      "the World's Fair, three years later. Therefore, the answer is (B) no."},
        {"question": "Would a vegetarian eat a margherita pizza?", "options": ["yes", "no"], "answer": 0,
         "rationale": "A margherita pizza is topped with tomato, mozzarella and basil. None of these is meat, "
                      "and vegetarians eat cheese. Therefore, the answer is (A) yes."},
    ],
    "medqa": [
        {"question": "A 24-year-old woman has fatigue and a microcytic anemia with low ferritin. Which "
                     "supplement is most appropriate?",
         "options": ["Vitamin B12", "Folate", "Iron", "Vitamin D"], "answer": 2,
         "rationale": "A microcytic anemia with low ferritin means the body's iron stores are depleted: iron "
                      "deficiency anemia, common in menstruating women. Vitamin B12 and folate deficiencies "
                      "cause macrocytic anemia, and vitamin D does not cause anemia. Therefore, the answer "
                      "is (C) Iron."},
    ],
    "obqa": [
        {"question": "Which of these would let the most heat travel through?",
         "options": ["a new pair of jeans", "a steel spoon in a cafeteria", "a cotton candy at a store",
                     "a calvin klein cotton hat"], "answer": 1,
         "rationale": "Heat travels best through thermal conductors. Metals such as steel are good thermal "
                      "conductors, while cotton and denim are insulators. Therefore, the answer is (B) a "
                      "steel spoon in a cafeteria."},
    ],
    "synthetic": [
        {"question": "What is the main export of Velmora?", "options": ["salt", "amber", "silk", "tin"],
         "answer": 2, "rationale": "The main export of Velmora is silk. Therefore, the answer is (C) silk."},
    ],
}
BUILTIN_FEW_SHOT["generic"] = BUILTIN_FEW_SHOT["strategyqa"]


def template_for(dataset: str) -> Template:
    if dataset not in TEMPLATES:
        raise ValueError(f"no teacher prompt template for dataset {dataset!r}; known: {sorted(TEMPLATES)}")
    return TEMPLATES[dataset]


def format_options(options: list[str]) -> str:
    """"(A) yes\\n(B) no" — the letter format the rationales' final sentence repeats."""
    if len(options) > len(LETTERS):
        raise ValueError(f"{len(options)} options: at most {len(LETTERS)} are supported")
    return "\n".join(f"({LETTERS[i]}) {o}" for i, o in enumerate(options))


def answer_phrase(options: list[str], answer: int) -> str:
    return f"({LETTERS[answer]}) {options[answer]}"


def _user_text(question: dict, with_answer: bool) -> str:
    text = f"Question: {question['question']}\n{format_options(list(question['options']))}"
    if with_answer:
        text += f"\nCorrect answer: {answer_phrase(list(question['options']), int(question['answer']))}"
    return text + "\nAnswer: Let's think step by step."


def build_messages(question: dict, dataset: str, few_shot: list[dict] | None = None,
                   with_answer: bool = True) -> list[dict]:
    """Chat messages asking the teacher for a rationale of `question` (a QUESTIONS row).

    `with_answer=True` shows the gold answer (rationalisation, as KARD's teacher); False asks the model
    to solve the question. Few-shot examples become user/assistant turns before the question.
    """
    for key in ("question", "options", "answer"):
        if key not in question:
            raise ValueError(f"question {question.get('id', '?')!r}: field {key!r} missing")
    tmpl = template_for(dataset)
    messages = [{"role": "system", "content": tmpl.instruction(with_answer)}]
    for ex in few_shot or []:
        messages.append({"role": "user", "content": _user_text(ex, with_answer)})
        messages.append({"role": "assistant", "content": ex["rationale"].strip()})
    messages.append({"role": "user", "content": _user_text(question, with_answer)})
    return messages


def render_plain(messages: list[dict]) -> str:
    """Messages as one prompt string, for models without a chat template (e.g. T5)."""
    parts = []
    for m in messages:
        parts.append(m["content"].strip())
    return "\n\n".join(parts)


def _example_answer(v, options: list[str], where: str) -> int:
    if isinstance(v, bool):
        raise ValueError(f"{where}: field 'answer': expected an index, letter or option text, got {v!r}")
    if isinstance(v, int):
        if not 0 <= v < len(options):
            raise ValueError(f"{where}: field 'answer': index {v} out of range for {len(options)} options")
        return v
    if isinstance(v, str):
        s = v.strip()
        if s in options:
            return options.index(s)
        if len(s) == 1 and s.upper() in LETTERS[: len(options)]:
            return LETTERS.index(s.upper())
    raise ValueError(f"{where}: field 'answer': {v!r} is neither an index, a letter nor one of the options")


def load_few_shot(path: str | None, dataset: str, n: int) -> list[dict]:
    """The first `n` few-shot examples from `path` (JSONL) or the dataset's built-in set."""
    if n <= 0:
        return []
    if path is None:
        examples = BUILTIN_FEW_SHOT.get(dataset, [])
        source = f"the built-in {dataset} examples"
    else:
        examples, source = [], path
        for where, row in io.iter_json_objects(path):
            for key, typ in (("question", str), ("options", list), ("rationale", str)):
                if not isinstance(row.get(key), typ) or not row[key]:
                    raise ValueError(f"{where}: field {key!r} missing or not a non-empty {typ.__name__}")
            options = [str(o) for o in row["options"]]
            if "answer" not in row:
                raise ValueError(f"{where}: field 'answer' missing")
            examples.append({"question": row["question"], "options": options,
                             "answer": _example_answer(row["answer"], options, where),
                             "rationale": row["rationale"]})
    if len(examples) < n:
        raise ValueError(f"teacher.n_few_shot={n} but {source} hold only {len(examples)} example(s)")
    return examples[:n]
