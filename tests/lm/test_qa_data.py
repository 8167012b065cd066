"""Question-answer data: deterministic generation, split by subject, bad rows refused with the row named."""
from __future__ import annotations

import json

import pytest

from sharp_unlearn.data.qa import generate_people, load_qa_rows, split_by_subject, world_rows, write_qa_rows
from sharp_unlearn.errors import ConfigError


def test_same_seed_gives_identical_rows_and_another_seed_does_not():
    assert generate_people(12, seed=3) == generate_people(12, seed=3)
    assert generate_people(12, seed=3) != generate_people(12, seed=4)


def test_rows_carry_paraphrase_and_wrong_answers():
    rows = generate_people(5, seed=0)
    assert len({r.subject for r in rows}) == 5
    for row in rows:
        assert row.paraphrased_answer and row.paraphrased_answer != row.answer
        assert len(row.perturbed_answers) == 3 and row.answer not in row.perturbed_answers


def test_split_is_by_subject_and_seeded():
    rows = generate_people(40, seed=0)
    split = split_by_subject(rows, world_rows(), forget_fraction=0.1, heldout_fraction=0.1, seed=7)
    subjects = [{r.subject for r in part} for part in (split.forget, split.retain, split.heldout)]
    assert len(subjects[0]) == 4 and len(subjects[2]) == 4 and len(subjects[1]) == 32
    assert not (subjects[0] & subjects[1]) and not (subjects[0] & subjects[2]) and not (subjects[1] & subjects[2])
    assert len(split.forget) + len(split.retain) + len(split.heldout) == len(rows)
    again = split_by_subject(rows, world_rows(), forget_fraction=0.1, heldout_fraction=0.1, seed=7)
    other = split_by_subject(rows, world_rows(), forget_fraction=0.1, heldout_fraction=0.1, seed=8)
    assert again.forget_subjects == split.forget_subjects != other.forget_subjects


def test_jsonl_round_trip(tmp_path):
    rows = generate_people(3, seed=1)
    write_qa_rows(rows, tmp_path / "qa.jsonl")
    assert load_qa_rows(tmp_path / "qa.jsonl") == rows


@pytest.mark.parametrize("row, complaint", [
    ({"question": "who ?", "subject": "x"}, "missing 'answer'"),
    ({"question": "who ?", "answer": "  ", "subject": "x"}, "answer="),
    ({"question": "who ?", "answer": "a", "subject": "x", "perturbed_answers": "b"}, "perturbed_answers="),
])
def test_bad_row_names_file_and_row(tmp_path, row, complaint):
    path = tmp_path / "qa.jsonl"
    good = {"question": "q ?", "answer": "a", "subject": "s"}
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ConfigError) as error:
        load_qa_rows(path)
    assert f"{path}: row 2" in str(error.value) and complaint in str(error.value)
