"""Hugging Face ``Trainer`` integration: the same noise after ``resume_from_checkpoint``, and
token-level KD with a frozen clean teacher.

A converted model (:func:`fastnoise.convert`) trains under any ``Trainer`` as it is: its layers
draw fresh noise each training forward and none in evaluation. What the Trainer does not know is
where the noise stands: the noise seed and each layer's call counter (which noise the next
forward draws). :class:`NoiseStateCallback` writes them into every checkpoint folder
(``checkpoint-N/fastnoise_noise.pt``) and reads them back when a run resumes from one, so a
resumed run draws the noise an uninterrupted run draws (the Trainer itself restores the
weights, optimizer, scheduler, torch's RNG and the data position).

:class:`NoisyTrainer` is a ``Trainer`` with that callback, and with ``teacher=`` the loss
``(1 - alpha) * CE + alpha * T^2 * KL(softmax(t/T) || softmax(s/T))`` per next-token place
(padding and ``-100`` labels masked; ``top_k`` keeps the teacher's k most likely tokens only), as
:class:`fastnoise.train.lm.LMDistillationTask` computes it::

    trainer = NoisyTrainer(model=student, teacher=teacher, temperature=2.0, alpha=0.5, args=args,
                           train_dataset=data)
    trainer.train()                               # or train(resume_from_checkpoint=True)
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from transformers import Trainer, TrainerCallback

from .. import lm, rng
from ..convert import load_noise_state_dict, noise_state_dict, noisy_layers
from ..train.lm import FrozenLMTeacher
from ..train.losses import DEFAULT_ALPHA, token_kd_loss

__all__ = ["NoiseStateCallback", "NoisyTrainer", "NOISE_FILE"]

NOISE_FILE = "fastnoise_noise.pt"


def _unwrap(model):
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


class NoiseStateCallback(TrainerCallback):
    """Saves the noise seed and the noisy layers' ids and call counters in each checkpoint
    folder, and restores them at the start of a run that resumed from a checkpoint.

    The folder read on resume is ``resume_from`` when set (:class:`NoisyTrainer` sets it from
    ``train(resume_from_checkpoint=...)``), else ``OUTPUT_DIR/checkpoint-STEP`` of the step the
    Trainer resumed at; a resumed run without that file is an error (its noise would not be the
    uninterrupted run's)."""

    def __init__(self):
        self.resume_from: Optional[str] = None

    def on_save(self, args, state, control, model=None, **kwargs):
        if model is None or not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        os.makedirs(folder, exist_ok=True)
        base = _unwrap(model)
        torch.save({"noise_seed": rng.initial_seed(), "noise": noise_state_dict(base),
                    "global_step": state.global_step}, os.path.join(folder, NOISE_FILE))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0 or model is None:
            return
        base = _unwrap(model)
        if not noisy_layers(base):
            return
        folder = self.resume_from or os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        path = os.path.join(folder, NOISE_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"resuming at step {state.global_step}, but {path} is missing: without "
                                    "the noise state the resumed run would draw other noise (was the "
                                    "checkpoint written with fastnoise's NoiseStateCallback?)")
        saved = torch.load(path, map_location="cpu", weights_only=True)
        rng.manual_seed(int(saved["noise_seed"]))
        load_noise_state_dict(base, saved["noise"])


class NoisyTrainer(Trainer):
    """A ``Trainer`` that keeps the noise state in its checkpoints (:class:`NoiseStateCallback`)
    and, given a ``teacher``, adds token-level KD to a causal LM's loss.

    Args:
        teacher: a clean causal LM with the student's vocabulary (not modified: run in eval mode
            under ``torch.inference_mode``, noise off), or None: the model's own loss.
        temperature, alpha, top_k: the KD term's ``T``, its weight and the teacher's top-k.
        Everything else: ``transformers.Trainer``'s arguments.
    """

    def __init__(self, *args, teacher: Optional[torch.nn.Module] = None, temperature: float = 2.0,
                 alpha: float = DEFAULT_ALPHA, top_k: Optional[int] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.noise_callback = NoiseStateCallback()
        self.add_callback(self.noise_callback)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        self.temperature, self.alpha = temperature, alpha
        self.teacher = None
        if teacher is not None:
            sv, tv = lm.vocab_size_of(self.model), lm.vocab_size_of(teacher)
            if sv is not None and tv is not None and sv != tv:
                raise ValueError(f"the teacher has a vocabulary of {tv} tokens, the model {sv}")
            self.teacher = FrozenLMTeacher(teacher, top_k, temperature)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        folder = resume_from_checkpoint
        if folder is True:
            from transformers.trainer_utils import get_last_checkpoint

            folder = get_last_checkpoint(self.args.output_dir)
        self.noise_callback.resume_from = folder if isinstance(folder, str) else None
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        if self.teacher is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        batch = lm.as_batch(inputs)
        self.teacher.model.to(batch["input_ids"].device)
        t, t_idx = self.teacher(batch)
        logits = lm.logits_of(model, batch)
        nll, tokens, _ = lm.token_stats(logits, lm.shifted_targets(batch))
        ce = nll / tokens.clamp_min(1.0).to(nll.dtype)
        mask = lm.shifted_targets(batch) != lm.IGNORE_INDEX
        kd = token_kd_loss(logits[:, :-1], t[:, :-1], mask, self.temperature,
                           None if t_idx is None else t_idx[:, :-1])
        loss = (1.0 - self.alpha) * ce + self.alpha * kd
        return (loss, {"logits": logits}) if return_outputs else loss
