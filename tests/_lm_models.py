"""Tiny causal LMs and token data for the language-model tests (built in code, nothing downloaded)."""

from __future__ import annotations

import torch
from torch import nn

VOCAB = 64


def quiet_transformers() -> None:
    from transformers.utils import logging

    logging.set_verbosity_error()


def tiny_llama(seed: int = 0, vocab: int = VOCAB, positions: int = 64, layers: int = 2):
    import transformers

    quiet_transformers()
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=positions, bos_token_id=0, eos_token_id=1,
                                   pad_token_id=None)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg)


def tiny_gpt2(seed: int = 0, vocab: int = VOCAB, positions: int = 32):
    import transformers

    quiet_transformers()
    cfg = transformers.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=positions,
                                  bos_token_id=0, eos_token_id=1)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(cfg)


class BigramLM(nn.Module):
    """A plain module returning logits [B, T, V] (no Hugging Face, no attention_mask argument)."""

    def __init__(self, vocab: int = VOCAB, hidden: int = 24):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.body = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh())
        self.head = nn.Linear(hidden, vocab)

    def forward(self, ids):
        return self.head(self.body(self.embed(ids)))


def token_data(n: int = 32, length: int = 12, seed: int = 1, vocab: int = VOCAB) -> list:
    """``n`` sequences with structure to learn: each token is the previous one plus 1 or 2 (mod vocab)."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (n, 1), generator=g)
    steps = torch.randint(1, 3, (n, length - 1), generator=g)
    seqs = torch.cat([start, start + steps.cumsum(1)], 1) % vocab
    return list(seqs)


def padded(seqs: list, keep: int, pad: int = 0) -> list:
    """Dicts with the tail after ``keep`` tokens padded (``pad``) and masked."""
    out = []
    for s in seqs:
        ids = s.clone()
        ids[keep:] = pad
        mask = torch.ones_like(s)
        mask[keep:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out
