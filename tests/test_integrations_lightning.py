"""Lightning: a converted model trained 2 epochs equals 1 epoch + a resume from its checkpoint
(losses and weights) with fastnoise's callback; without it the resumed run draws other noise."""

import os

import pytest
import torch

L = pytest.importorskip("lightning", reason="Lightning is optional (pip install lightning)")
from _lm_models import BigramLM, token_data  # noqa: E402

import fastnoise  # noqa: E402
from fastnoise.integrations.lightning import CHECKPOINT_KEY, NoiseStateCallback  # noqa: E402
from fastnoise.lm import as_batch, logits_of, shifted_targets, token_stats  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


class LitLM(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = fastnoise.convert(BigramLM(), fastnoise.NoiseSpec(eta=0.1))
        self.losses = []

    def training_step(self, batch, batch_idx):
        b = as_batch(batch)
        nll, tokens, _ = token_stats(logits_of(self.net, b), shifted_targets(b))
        loss = nll / tokens.to(nll.dtype)
        self.losses.append(float(loss))
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def _fit(out, epochs, ckpt=None, callbacks=(NoiseStateCallback,), noise_seed=0):
    fastnoise.manual_seed(noise_seed)
    module = LitLM()
    loader = torch.utils.data.DataLoader(token_data(16), batch_size=4, shuffle=False)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=out,
                        callbacks=[c() for c in callbacks], enable_checkpointing=True)
    trainer.fit(module, loader, ckpt_path=ckpt)
    return module, trainer


def _ckpt(out):
    folder = os.path.join(out, "checkpoints")
    return os.path.join(folder, sorted(os.listdir(folder))[-1])


def test_resume_continues_the_same_noise(tmp_path):
    full, _ = _fit(str(tmp_path / "full"), 2)
    split = str(tmp_path / "split")
    _fit(split, 1)
    path = _ckpt(split)
    saved = torch.load(path, weights_only=False)[CHECKPOINT_KEY]
    assert all(v["calls"] == 4 for v in saved["noise"].values())
    resumed, _ = _fit(str(tmp_path / "resumed"), 2, ckpt=path, noise_seed=99)
    assert len(full.losses) == 8 and resumed.losses == full.losses[4:]
    wa, wb = full.state_dict(), resumed.state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_without_the_callback_the_resume_differs_or_is_refused(tmp_path):
    full, _ = _fit(str(tmp_path / "full"), 2)
    split = str(tmp_path / "split")
    _fit(split, 1, callbacks=())  # a checkpoint without the noise state
    with pytest.raises(KeyError, match=CHECKPOINT_KEY):
        _fit(str(tmp_path / "r1"), 2, ckpt=_ckpt(split))
    plain, _ = _fit(str(tmp_path / "r2"), 2, ckpt=_ckpt(split), callbacks=(), noise_seed=99)
    assert plain.losses != full.losses[4:]
