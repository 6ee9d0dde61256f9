"""pipeline.bpe: a byte-level BPE tokenizer built from a word list."""

from pipeline.bpe import build_bpe_tokenizer


def test_listed_words_are_one_token_and_any_text_stays_encodable() -> None:
    tok = build_bpe_tokenizer(["photo", "zebra", "dogs"], 77)
    assert [len(tok(w)["input_ids"]) for w in ("photo", "zebra", "dogs")] == [3, 3, 3]  # BOS, word, EOS
    text = "A photo of a Zebra — naïve café 🚀, 3 dogs!"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.eos_token_id not in ids[1:-1]  # no byte fell back to the unknown token
    assert tok.decode(ids, skip_special_tokens=True).replace(" ", "") == text.lower().replace(" ", "")
    assert tok.model_max_length == 77
