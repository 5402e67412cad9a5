"""Random tiny models for smoke runs and tests (`lm=tiny`): seconds per step, nothing downloaded.

The weights are random, so a tiny LM's evidence carries no knowledge; it exercises the
code path, not the method.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from scheduler.lm import DEFAULT_REFUSAL

DEFAULT_CORPUS = (DEFAULT_REFUSAL, "Sure, here is how to do it step by step.", "The answer is positive.",
                  "Please convert the question into an SQL query.", "What is the capital of France?")


def build_tiny_lm(folder: str | Path, corpus: Sequence[str] = DEFAULT_CORPUS, vocab_size: int = 500,
                  seed: int = 0) -> Path:
    """A random 4-layer Llama with a byte-level BPE tokenizer trained on `corpus` (any text still tokenizes)."""
    import torch
    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = Path(folder)
    torch.manual_seed(seed)
    tokenizer = Tokenizer(BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(list(corpus) * 3, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<unk>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")
    config = LlamaConfig(vocab_size=fast.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                         pad_token_id=fast.pad_token_id, eos_token_id=fast.eos_token_id, bos_token_id=None)
    LlamaForCausalLM(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def build_tiny_embedder(folder: str | Path, corpus: Sequence[str] = DEFAULT_CORPUS, dim: int = 32,
                        seed: int = 0) -> Path:
    """A random 2-layer BERT sentence-transformer (mean pooling, unit norm) with a WordPiece vocabulary from `corpus`.
    Seeded: unseeded, its weights followed whatever had drawn random numbers before, and a test passed or failed
    with the tests that ran before it."""
    import torch
    from sentence_transformers import SentenceTransformer, models
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, trainers
    from tokenizers.models import WordPiece
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = Path(folder)
    torch.manual_seed(seed)
    tokenizer = Tokenizer(WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.train_from_iterator(list(corpus) * 3, trainers.WordPieceTrainer(
        vocab_size=400, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    fast = BertTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                             sep_token="[SEP]", mask_token="[MASK]")
    config = BertConfig(vocab_size=fast.vocab_size, hidden_size=dim, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=2 * dim, max_position_embeddings=128)
    BertModel(config).save_pretrained(folder / "hf")
    fast.save_pretrained(folder / "hf")
    transformer = models.Transformer(str(folder / "hf"), max_seq_length=64)
    SentenceTransformer(modules=[transformer, models.Pooling(dim, "mean"), models.Normalize()], device="cpu").save(str(folder / "st"))
    return folder / "st"
