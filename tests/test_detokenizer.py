"""IncrementalDetokenizer: whole characters only, stop sequences cut and held back, prompt context."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from engine.core.detokenizer import IncrementalDetokenizer

MULTIBYTE_TEXTS = [
    "Hi 👋🏽 there 🎉",
    "日本語のテキスト、中文文本",
    "café\nnaïve résumé\n\n  crème brûlée 🇫🇷\n",
]


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def metaspace_tokenizer():
    """A sentencepiece-style tokenizer: decoding strips the leading space of the first token."""
    vocab = {"▁Hello": 0, "▁world": 1, "▁again": 2, "<unk>": 3}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    """Add tokens one at a time, taking the text that may be shown after each; then flush."""
    taken = []
    for token_id in ids:
        detok.add_token(token_id)
        taken.append(detok.take_text())
    taken.append(detok.take_text(final=True))
    return taken


@pytest.mark.parametrize("text", MULTIBYTE_TEXTS)
def test_deltas_concatenate_to_the_full_decode(tokenizer, text):
    ids = encode(tokenizer, text)
    detok = IncrementalDetokenizer(tokenizer, prompt_ids=[])
    deltas = [detok.add_token(i) for i in ids]
    assert "".join(deltas) == tokenizer.decode(ids) == text


@pytest.mark.parametrize("text", MULTIBYTE_TEXTS)
def test_deltas_never_contain_half_a_character(tokenizer, text):
    ids = encode(tokenizer, text)
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # the text does split characters
    detok = IncrementalDetokenizer(tokenizer, prompt_ids=[])
    deltas = [detok.add_token(i) for i in ids]
    assert not any("\ufffd" in d for d in deltas)


@pytest.mark.parametrize("text", MULTIBYTE_TEXTS)
def test_taken_text_without_stop_sequences_is_the_full_decode(tokenizer, text):
    ids = encode(tokenizer, text)
    taken = stream(IncrementalDetokenizer(tokenizer, prompt_ids=[]), ids)
    assert "".join(taken) == text
    assert not any("\ufffd" in t for t in taken)


def test_stop_sequence_spanning_tokens_cuts_output_before_it(tokenizer):
    ids = encode(tokenizer, "The cat sat on the mat.")  # "at on t" spans " sat", " on", " the"
    detok = IncrementalDetokenizer(tokenizer, prompt_ids=[], stop_sequences=("at on t",))
    taken = stream(detok, ids)
    assert detok.stopped
    assert "".join(taken) == "The cat s"


def test_text_after_a_stop_sequence_is_never_returned(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, prompt_ids=[], stop_sequences=(" sat",))
    stream(detok, encode(tokenizer, "The cat sat"))
    later = [detok.add_token(i) for i in encode(tokenizer, " on the mat")]
    assert later  # add_token still reports deltas...
    assert detok.take_text() == "" and detok.take_text(final=True) == ""  # ...but none is shown


def test_possible_start_of_a_stop_sequence_is_held_back(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, prompt_ids=[], stop_sequences=(" cats!",))
    for token_id in encode(tokenizer, "the cat"):
        detok.add_token(token_id)
    assert detok.take_text() == "the"


def test_held_back_text_is_released_once_it_is_not_a_stop(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, prompt_ids=[], stop_sequences=(" cats!",))
    taken = []
    for token_id in encode(tokenizer, "the cat sat"):
        detok.add_token(token_id)
        taken.append(detok.take_text())
    assert taken == ["the", "", " cat sat"]
    assert not detok.stopped


def test_final_take_flushes_held_back_text(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, prompt_ids=[], stop_sequences=("STOP",))
    for token_id in encode(tokenizer, "I said STO"):
        detok.add_token(token_id)
    assert detok.take_text() == "I said "
    assert detok.take_text(final=True) == "STO"
    assert not detok.stopped


def test_earliest_of_two_stop_sequences_wins(tokenizer):
    # Both complete with the token " world"; the one listed second starts earlier in the text.
    detok = IncrementalDetokenizer(tokenizer, prompt_ids=[], stop_sequences=("world", "lo world"))
    taken = stream(detok, encode(tokenizer, "Hello world"))
    assert detok.stopped
    assert "".join(taken) == "Hel"


def test_output_after_a_prompt_keeps_its_leading_space(tokenizer):
    prompt = encode(tokenizer, "The answer is")
    output = encode(tokenizer, " forty-two, of course.")
    detok = IncrementalDetokenizer(tokenizer, prompt)
    deltas = [detok.add_token(i) for i in output]
    after_prompt = tokenizer.decode(prompt + output)[len(tokenizer.decode(prompt)) :]
    assert "".join(deltas) == after_prompt == " forty-two, of course."


def test_output_after_a_prompt_decodes_as_in_the_whole_sequence_for_sentencepiece_spaces(metaspace_tokenizer):
    tok = metaspace_tokenizer
    prompt, output = [0], [1, 2]  # "▁Hello" then "▁world", "▁again"
    assert tok.decode(output) == "world again"  # decoded alone, the leading space is lost
    detok = IncrementalDetokenizer(tok, prompt)
    deltas = [detok.add_token(i) for i in output]
    assert "".join(deltas) == tok.decode(prompt + output)[len(tok.decode(prompt)) :] == " world again"
