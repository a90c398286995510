"""Tiny models, tokenizers, batches and sentences for fast tests (built from configs, no downloads)."""

from __future__ import annotations

import random

import torch

WORDS = (
    "the a cat dog sat on mat ran fast slow big small red blue green tree house car road sun moon "
    "is was and or not yes no happy sad news man woman city river sky"
).split()


def make_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["[PAD]", "[UNK]", "</s>", *WORDS, ":", "?", "."])}
    core = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", eos_token="</s>")


def tiny_llama(vocab_size: int = 48, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=0, eos_token_id=2, bos_token_id=2)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def tiny_bert_cls(vocab_size: int = 48, num_labels: int = 2):
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=128, num_labels=num_labels, pad_token_id=0)
    torch.manual_seed(0)
    return BertForSequenceClassification(cfg)


def random_batches(n: int, batch_size: int = 4, length: int = 12, vocab: int = 48, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (batch_size, length), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10))) for _ in range(n)]
