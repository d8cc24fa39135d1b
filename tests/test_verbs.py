"""The verb-tense corpus and task: grammar, the disjoint (subject, verb) split, determinism."""
import random
from collections import Counter

import pytest

from quantlab.data import load_task, load_text
from quantlab.data.verbs import (SUBJECTS, VERBS, Subject, make_sentence, pair_split, sample_sentences,
                                 split_pairs, third_person_singular, verb_tense_task, verbs_text)

WALK = next(v for v in VERBS if v.base == "walk")
HE, THEY, I = Subject("he", True), Subject("they", False), Subject("I", False)


@pytest.mark.parametrize("base, expected", [
    ("walk", "walks"), ("watch", "watches"), ("wash", "washes"), ("fix", "fixes"), ("miss", "misses"),
    ("carry", "carries"), ("play", "plays"), ("go", "goes"), ("do", "does"),
])
def test_third_person_singular_follows_english_spelling(base, expected):
    assert third_person_singular(base) == expected


@pytest.mark.parametrize("subject, tense, cue, expected", [
    (HE, "past", "Yesterday", "Yesterday he walked to the store."),
    (THEY, "past", "Last week", "Last week they walked to the store."),
    (HE, "habitual", "Every day", "Every day he walks to the store."),
    (THEY, "habitual", "Every day", "Every day they walk to the store."),
    (I, "habitual", "Usually", "Usually I walk to the store."),
    (HE, "future", "Tomorrow", "Tomorrow he will walk to the store."),
])
def test_time_cue_and_subject_decide_the_verb_form(subject, tense, cue, expected):
    assert make_sentence(subject, WALK, tense, cue, "to the store").text == expected


def test_noun_phrase_subjects_agree_by_number():
    baker, bakers = Subject("the baker", True), Subject("the bakers", False)
    assert make_sentence(baker, WALK, "habitual", "Often", "home").text == "Often the baker walks home."
    assert make_sentence(bakers, WALK, "habitual", "Often", "home").text == "Often the bakers walk home."


def test_vocabulary_has_several_hundred_verb_object_pairs_with_distinct_forms():
    assert sum(len(v.complements) for v in VERBS) >= 300
    assert all(len(set(v.forms)) == 3 for v in VERBS)
    irregular = [v for v in VERBS if v.past != v.base + "ed" and v.past != v.base + "d"]
    assert len(irregular) >= 50
    assert any(not s.third_singular and " " in s.text for s in SUBJECTS)   # plural noun phrases too


def test_train_and_test_pairs_are_disjoint_and_cover_every_pair():
    train, test = set(split_pairs("train")), set(split_pairs("test"))
    assert not train & test
    assert len(train | test) == len(SUBJECTS) * len(VERBS)
    assert 0.1 < len(test) / len(train | test) < 0.3


def test_generated_sentences_only_use_their_splits_pairs():
    for split in ("train", "test"):
        for seed in (0, 1):
            pairs = {(s.subject, s.verb) for s in sample_sentences(split, random.Random(seed), 500)}
            by_text = {(s.text, v.base): (s, v) for s, v in split_pairs(split)}
            assert pairs <= set(by_text)
            assert all(pair_split(*by_text[p]) == split for p in pairs)


def test_text_is_deterministic_under_a_seed():
    assert verbs_text("train", seed=0, n_sentences=200) == verbs_text("train", seed=0, n_sentences=200)
    assert verbs_text("train", seed=0, n_sentences=200) != verbs_text("train", seed=1, n_sentences=200)
    assert verbs_text("train", seed=0, n_sentences=200) != verbs_text("test", seed=0, n_sentences=200)
    assert load_text("verbs", "test") == verbs_text("test")


def test_task_items_blank_the_verb_and_complete_to_the_generated_sentence():
    rng = random.Random("verb-tense-task/test/0")   # the task's own stream, replayed
    sentences = sample_sentences("test", rng, 20)
    items = verb_tense_task("test", seed=0, n_items=20)
    for sentence, item in zip(sentences, items):
        assert item.context == sentence.before + "__" + sentence.after
        prefix, continuation = item.completions()[item.answer]
        assert prefix + continuation == sentence.text
        assert sorted(item.choices) == sorted(sentence.forms)


def test_answer_position_carries_no_signal():
    counts = Counter(item.answer for item in verb_tense_task("test", seed=0, n_items=600))
    assert set(counts) == {0, 1, 2} and min(counts.values()) > 150


def test_every_tense_is_asked():
    contexts = [item.context for item in load_task("verb_tense")]
    assert len(contexts) == 600
    assert any(" will __" in c for c in contexts)                         # future
    assert any(c.startswith(("Yesterday", "Last")) for c in contexts)     # past
    assert any(c.startswith(("Every", "Usually")) for c in contexts)      # habitual


def test_unknown_split_lists_the_valid_ones():
    with pytest.raises(ValueError, match="train, test"):
        verbs_text("validation")
