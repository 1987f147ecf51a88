"""The unpadded vocabulary: read from the archive's own tokenizer, and refused when it cannot belong to the weights."""

from __future__ import annotations

import io

import pytest

from fedllm.checkpoint import CheckpointError, convert
from fedllm.checkpoint.vocab import sentencepiece_size
from tests.support.nemo_files import load_ranks
from tests.support.synthetic_checkpoint import TinyGPT


def _sentencepiece_model(vocab_size: int) -> tuple[bytes, int]:
    """A real SentencePiece model trained here, and the piece count sentencepiece itself reports."""
    import sentencepiece as spm

    text = [f"the site {i} holds sentence number {i * 7} about finance and markets" for i in range(400)]
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_writer=out, vocab_size=vocab_size, model_type="bpe", hard_vocab_limit=False
    )
    model = out.getvalue()
    return model, spm.SentencePieceProcessor(model_proto=model).get_piece_size()


def test_a_tokenizer_that_cannot_belong_to_the_embedding_is_refused(tmp_path):
    # 300 entries padded ×8 at TP1 → 304 rows; a vocab.json of 100 entries would pad to 104.
    src = TinyGPT(vocab_size=300, tokenizer_vocab=100).write(tmp_path / "src.nemo", 1)
    with pytest.raises(CheckpointError) as err:
        convert(src, tmp_path / "dst.nemo", 2, progress=False)
    msg = str(err.value)
    assert "a1b2c3_vocab.json gives a vocabulary of 100" in msg and "pads to 104 rows" in msg
    assert "embedding has 304 rows" in msg and "would drop trained rows" in msg and "between 297 and 304" in msg
    assert not (tmp_path / "dst.nemo").exists()
    with pytest.raises(CheckpointError, match=r"--vocab-size gives a vocabulary of 200"):
        convert(src, tmp_path / "dst.nemo", 2, vocab_size=200, progress=False)
    # The right size given by hand keeps every trained row.
    result = convert(src, tmp_path / "dst.nemo", 2, vocab_size=300, progress=False)
    assert (result.vocab_size, result.target_padded_vocab) == (300, 304)


def test_sentencepiece_vocabulary_is_read_from_the_model_file(tmp_path):
    model, pieces = _sentencepiece_model(vocab_size=120)
    assert sentencepiece_size(model) == pieces
    gpt = TinyGPT(vocab_size=pieces, sentencepiece_model=model, make_vocab_size_divisible_by=8)
    src = gpt.write(tmp_path / "spm.nemo", 2)
    result = convert(src, tmp_path / "tp1.nemo", 1, progress=False)  # no --vocab-size needed
    assert result.vocab_size == pieces and result.target_padded_vocab == gpt.padded_vocab(1)
    _, (rank,) = load_ranks(tmp_path / "tp1.nemo")
    emb = rank["model.language_model.embedding.word_embeddings.weight"]
    assert emb.shape[0] == gpt.padded_vocab(1)
    assert emb[:pieces].equal(gpt.full_weights()["model.language_model.embedding.word_embeddings.weight"])


def test_a_truncated_sentencepiece_model_is_not_counted():
    model, _ = _sentencepiece_model(vocab_size=60)
    with pytest.raises(ValueError, match="truncated"):
        sentencepiece_size(model[: len(model) // 2 + 1])
