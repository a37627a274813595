"""Lightning integration: the noise state in Lightning checkpoints.

A LightningModule whose model was converted (:func:`fastnoise.convert`) trains as it is; add
:class:`NoiseStateCallback` to the ``Trainer``'s callbacks and every checkpoint holds, under
``checkpoint["fastnoise"]``, the noise seed and each noisy layer's id and call counter, which
``trainer.fit(..., ckpt_path=...)`` restores, so a resumed run draws the noise an uninterrupted
run draws::

    import lightning as L
    from fastnoise.integrations.lightning import NoiseStateCallback

    trainer = L.Trainer(max_epochs=2, callbacks=[NoiseStateCallback()])
    trainer.fit(module, loader, ckpt_path="last.ckpt")

Imports ``lightning`` (or, failing that, ``pytorch_lightning``).
"""

from __future__ import annotations

from .. import rng
from ..convert import load_noise_state_dict, noise_state_dict, noisy_layers

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # the older package name
    from pytorch_lightning.callbacks import Callback

__all__ = ["NoiseStateCallback", "CHECKPOINT_KEY"]

CHECKPOINT_KEY = "fastnoise"


class NoiseStateCallback(Callback):
    """Writes the noise seed and the noisy layers' call counters of the LightningModule into
    each checkpoint and reads them back when training resumes from one. A checkpoint without
    them (written without this callback) is refused: the resumed run would draw other noise."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        checkpoint[CHECKPOINT_KEY] = {"noise_seed": rng.initial_seed(), "noise": noise_state_dict(pl_module)}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        saved = checkpoint.get(CHECKPOINT_KEY)
        if saved is None:
            if noisy_layers(pl_module):
                raise KeyError(f"the checkpoint has no {CHECKPOINT_KEY!r} noise state (it was written "
                               "without fastnoise's NoiseStateCallback): the resumed run would draw other "
                               "noise")
            return
        rng.manual_seed(int(saved["noise_seed"]))
        load_noise_state_dict(pl_module, saved["noise"])
