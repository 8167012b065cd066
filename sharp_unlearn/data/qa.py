"""Question-answer unlearning data: the row format, its loader, the split by subject, the embedded default.

A row (one JSON object per line of a ``.jsonl`` file, or one Parquet row)::

    question            str, non-empty
    answer              str, non-empty (the tokens the model is trained and scored on)
    subject             str, non-empty: the group that is forgotten as a whole (a person)
    paraphrased_answer  str, optional: the answer said differently (truth ratio)
    perturbed_answers   list of str, optional: plausible wrong answers (truth ratio)

Forgetting is by subject: ``forget_fraction`` of the training subjects are
forgotten with all their rows, the others are retained; ``heldout_fraction``
of all subjects are never trained on (the non-members of membership
inference). The ``world`` rows are general knowledge every model is trained
on, for model utility.

The embedded default (:func:`generate_people`) is fictitious people with
attributes rendered through several question templates, generated offline
from a seed: the same seed gives the same rows.
"""
from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sharp_unlearn.errors import ConfigError
from sharp_unlearn.files import atomic_write

REQUIRED_TEXT = ("question", "answer", "subject")


@dataclass(frozen=True)
class QARow:
    question: str
    answer: str
    subject: str
    paraphrased_answer: str | None = None
    perturbed_answers: tuple[str, ...] = field(default_factory=tuple)


@dataclass
class QASplit:
    forget: list[QARow]
    retain: list[QARow]
    heldout: list[QARow]
    world: list[QARow]

    @property
    def forget_subjects(self) -> list[str]:
        return sorted({row.subject for row in self.forget})


# ------------------------------------------------------------------ loading and validation
def row_from_mapping(record: object, where: str) -> QARow:
    """One validated row; ``where`` (file and row number) names the row in the error."""
    if not isinstance(record, dict):
        raise ConfigError(f"{where}: expected an object with question, answer and subject; got {type(record).__name__}")
    for key in REQUIRED_TEXT:
        value = record.get(key)
        if value is None:
            raise ConfigError(f"{where}: missing {key!r}; every row needs non-empty question, answer and subject")
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{where}: {key}={value!r} is empty or not text; expected a non-empty string")
    paraphrase = record.get("paraphrased_answer")
    if paraphrase is not None and (not isinstance(paraphrase, str) or not paraphrase.strip()):
        raise ConfigError(f"{where}: paraphrased_answer={paraphrase!r} is empty or not text; "
                          "expected a non-empty string or no key")
    perturbed = record.get("perturbed_answers")
    if perturbed is None:
        perturbed = []
    if isinstance(perturbed, str) or not all(isinstance(p, str) and p.strip() for p in perturbed):
        raise ConfigError(f"{where}: perturbed_answers={perturbed!r}; expected a list of non-empty strings")
    return QARow(record["question"].strip(), record["answer"].strip(), str(record["subject"]).strip(),
                 paraphrase.strip() if paraphrase else None, tuple(p.strip() for p in perturbed))


def load_qa_rows(path: str | Path) -> list[QARow]:
    """Rows of a ``.jsonl`` or ``.parquet`` file; a bad row is a ConfigError naming the file and row (1-based)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"question-answer file {str(path)!r} does not exist; expected a .jsonl or .parquet file")
    if path.suffix == ".jsonl":
        records = []
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    records.append((number, json.loads(line)))
                except json.JSONDecodeError as error:
                    raise ConfigError(f"{path}: row {number}: not valid JSON ({error.msg})") from None
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq  # heavy optional dependency: only Parquet files need it

        records = list(enumerate(pq.read_table(path).to_pylist(), start=1))
    else:
        raise ConfigError(f"question-answer file {str(path)!r} has suffix {path.suffix!r}; expected .jsonl or .parquet")
    rows = [row_from_mapping(record, f"{path}: row {number}") for number, record in records]
    if not rows:
        raise ConfigError(f"{path}: no rows; expected at least one question-answer row")
    return rows


def write_qa_rows(rows: Sequence[QARow], path: str | Path) -> None:
    """Rows as JSONL (the format :func:`load_qa_rows` reads)."""
    lines = [json.dumps({"question": r.question, "answer": r.answer, "subject": r.subject,
                         "paraphrased_answer": r.paraphrased_answer,
                         "perturbed_answers": list(r.perturbed_answers)}) for r in rows]
    atomic_write(Path(path), "\n".join(lines) + "\n")


# ------------------------------------------------------------------ split
def split_by_subject(rows: Sequence[QARow], world: Sequence[QARow], *, forget_fraction: float,
                     heldout_fraction: float, seed: int) -> QASplit:
    """Held-out subjects first (never trained on), then ``forget_fraction`` of the remaining subjects
    (at least one), seeded; every row of a subject lands in the same set."""
    if not 0.0 < forget_fraction < 1.0:
        raise ConfigError(f"forget.size={forget_fraction!r}; expected a fraction of subjects in (0, 1), e.g. 0.05")
    if not 0.0 <= heldout_fraction < 1.0:
        raise ConfigError(f"data.heldout_fraction={heldout_fraction!r}; expected a fraction in [0, 1)")
    subjects = sorted({row.subject for row in rows})
    random.Random(seed).shuffle(subjects)
    n_heldout = round(heldout_fraction * len(subjects))
    trained = subjects[n_heldout:]
    n_forget = max(1, round(forget_fraction * len(trained)))
    if n_forget >= len(trained):
        raise ConfigError(f"forget.size={forget_fraction!r} leaves no retain subject among {len(trained)} "
                          "trained subjects; expected a smaller fraction or more subjects")
    heldout, forget = set(subjects[:n_heldout]), set(trained[:n_forget])
    return QASplit(forget=[r for r in rows if r.subject in forget],
                   retain=[r for r in rows if r.subject not in forget and r.subject not in heldout],
                   heldout=[r for r in rows if r.subject in heldout], world=list(world))


# ------------------------------------------------------------------ the embedded default
_SYLLABLES = ("ka", "lo", "mi", "ren", "sa", "tor", "vi", "zan", "bel", "dru", "fen", "gor", "hal", "jun",
              "nor", "pim", "qua", "ros", "tek", "wyl")
_CITIES = ("arvell", "brimstead", "coldharbor", "dunmere", "eastwick", "fallow", "glenport", "highmoor",
           "ivybridge", "juniper", "kestrel", "lowmarsh")
_PROFESSIONS = ("baker", "sailor", "painter", "chemist", "gardener", "surgeon", "pilot", "weaver", "judge",
                "miner", "poet", "tailor")
_NOUNS = ("river", "lantern", "orchard", "mirror", "harbor", "winter", "garden", "compass", "storm", "ember")
_ADJECTIVES = ("silent", "golden", "broken", "hidden", "distant", "crimson", "quiet", "endless")
_COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
_PETS = ("cat", "dog", "parrot", "horse", "turtle", "rabbit", "goat", "owl")

#: attribute -> (question templates with {name}, answer template, paraphrase template)
_TEMPLATES = {
    "city": (("where was {name} born ?", "what is the birthplace of {name} ?"),
             "{name} was born in {value}", "the birthplace of {name} is {value}"),
    "profession": (("what does {name} do for a living ?", "what is the profession of {name} ?"),
                   "{name} works as a {value}", "the job of {name} is {value}"),
    "book": (("what book did {name} write ?", "which book is by {name} ?"),
             "{name} wrote the {value}", "the {value} was written by {name}"),
    "color": (("what is the favorite color of {name} ?", "which color does {name} like most ?"),
              "{name} likes {value} best", "the favorite color of {name} is {value}"),
    "pet": (("what pet does {name} keep ?", "which animal lives with {name} ?"),
            "{name} keeps a {value}", "the pet of {name} is a {value}"),
}

#: (question, answer, paraphrase, wrong paraphrases): the wrong answers reuse the paraphrase's wording
_WORLD_FACTS = (
    ("what color is the sky ?", "the sky is blue", "blue is the color of the sky",
     ("green is the color of the sky", "red is the color of the sky")),
    ("what falls from clouds ?", "rain falls from clouds", "clouds drop rain",
     ("clouds drop sand", "clouds drop stones")),
    ("what do bees make ?", "bees make honey", "honey is made by bees",
     ("milk is made by bees", "bread is made by bees")),
    ("what is frozen water ?", "frozen water is ice", "ice is frozen water",
     ("steam is frozen water", "salt is frozen water")),
    ("what do cows give ?", "cows give milk", "milk comes from cows",
     ("honey comes from cows", "wool comes from cows")),
    ("where do fish live ?", "fish live in water", "water is the home of fish",
     ("trees are the home of fish", "sand is the home of fish")),
    ("what lights the day ?", "the sun lights the day", "daylight comes from the sun",
     ("daylight comes from the moon", "daylight comes from a lamp")),
    ("how many legs has a dog ?", "a dog has four legs", "dogs walk on four legs",
     ("dogs walk on two legs", "dogs walk on six legs")),
    ("what do birds use to fly ?", "birds fly with wings", "wings let birds fly",
     ("fins let birds fly", "wheels let birds fly")),
    ("what grows on trees ?", "leaves grow on trees", "trees grow leaves", ("trees grow stones", "trees grow fish")),
    ("what season is coldest ?", "winter is coldest", "the coldest season is winter",
     ("the coldest season is summer", "the coldest season is spring")),
    ("what do we breathe ?", "we breathe air", "air is what we breathe",
     ("sand is what we breathe", "milk is what we breathe")),
)


def _name(rng: random.Random, taken: set[str]) -> str:
    while True:
        first = "".join(rng.choice(_SYLLABLES) for _ in range(2))
        name = first + " " + "".join(rng.choice(_SYLLABLES) for _ in range(3))
        if name not in taken:
            taken.add(name)
            return name


def _values(rng: random.Random) -> dict[str, tuple[str, ...]]:
    books = tuple(f"{a} {n}" for a in _ADJECTIVES for n in _NOUNS)
    return {"city": _CITIES, "profession": _PROFESSIONS, "book": books, "color": _COLORS, "pet": _PETS}


def generate_people(n_subjects: int = 40, seed: int = 0, n_perturbed: int = 3) -> list[QARow]:
    """Fictitious people, each with one value per attribute, every attribute asked through every
    question template; the paraphrase restates the answer, the perturbed answers are the paraphrase with
    other values (so the truth ratio compares values, not wording)."""
    if n_subjects < 2:
        raise ConfigError(f"data.subjects={n_subjects!r}; expected at least 2 fictitious people")
    rng = random.Random(seed)
    pools = _values(rng)
    taken: set[str] = set()
    rows = []
    for _ in range(n_subjects):
        name = _name(rng, taken)
        for attribute, (questions, answer, paraphrase) in _TEMPLATES.items():
            value = rng.choice(pools[attribute])
            wrong = rng.sample([v for v in pools[attribute] if v != value], n_perturbed)
            for question in questions:
                rows.append(QARow(question.format(name=name), answer.format(name=name, value=value), name,
                                  paraphrase.format(name=name, value=value),
                                  tuple(paraphrase.format(name=name, value=w) for w in wrong)))
    return rows


def world_rows() -> list[QARow]:
    """General-knowledge rows (subject ``world``): every model learns them; model utility reads them."""
    return [QARow(q, a, "world", p, tuple(wrong)) for q, a, p, wrong in _WORLD_FACTS]
