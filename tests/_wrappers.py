"""Modules that give torch's attention and recurrent layers a one-tensor output, for the tests
that build every layer kind (``test_coverage.py``, ``test_generic_paths.py``)."""

from torch import nn


class MHA(nn.Module):
    """``nn.MultiheadAttention`` (batch first) called as ``f(q, k, v)``, its output only."""

    def __init__(self, width: int, **kw):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, 2, batch_first=True, **kw)

    def forward(self, q, k, v):
        return self.attn(q, k, v)[0]


class RNNOutput(nn.Module):
    """An RNN, LSTM, GRU or cell, its output without the hidden state."""

    def __init__(self, rnn: nn.Module):
        super().__init__()
        self.rnn = rnn

    def forward(self, x):
        out = self.rnn(x)
        return out[0] if isinstance(out, tuple) else out
