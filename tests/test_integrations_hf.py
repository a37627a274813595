"""Hugging Face Trainer: a converted tiny Llama trained 4 steps equals 2 steps + a resume from
the step-2 checkpoint (losses and weights), because the noise state travels in the checkpoint;
without it the resumed run draws other noise (so the test can tell). NoisyTrainer adds
token-level KD from a teacher."""

import math
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate (in the dev extra)")
from _lm_models import tiny_llama, token_data  # noqa: E402
from transformers import TrainerCallback, TrainingArguments  # noqa: E402

import fastnoise  # noqa: E402
from fastnoise.integrations.hf import NOISE_FILE, NoiseStateCallback, NoisyTrainer  # noqa: E402

SPEC = fastnoise.NoiseSpec(eta=0.1)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


class _StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def _args(out):
    return TrainingArguments(output_dir=out, max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                             save_strategy="steps", save_steps=2, logging_steps=1, report_to="none",
                             use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0)


def _data():
    return [{"input_ids": s, "labels": s.clone()} for s in token_data(16)]


def _model():
    fastnoise.manual_seed(0)
    return fastnoise.convert(tiny_llama(seed=0), SPEC)


def _losses(trainer):
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def _train(out, stop=None, resume=None, cls=NoisyTrainer, noise_seed=0, callback=False, **kw):
    model = _model()
    fastnoise.manual_seed(noise_seed)  # a fresh process's noise seed; the checkpoint's replaces it
    callbacks = ([_StopAt(stop)] if stop else []) + ([NoiseStateCallback()] if callback else [])
    trainer = cls(model=model, args=_args(out), train_dataset=_data(), callbacks=callbacks, **kw)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


@pytest.mark.slow
@pytest.mark.parametrize("kd", [False, True], ids=["trainer_with_callback", "noisy_trainer_kd"])
def test_resume_from_checkpoint_continues_the_same_noise(tmp_path, kd):
    """A plain Trainer with NoiseStateCallback (noise only), and NoisyTrainer with a teacher."""
    from transformers import Trainer

    kw = ({"teacher": tiny_llama(seed=5), "temperature": 2.0, "alpha": 0.5, "top_k": 8} if kd
          else {"cls": Trainer, "callback": True})
    full = _train(str(tmp_path / "full"), **kw)
    split = str(tmp_path / "split")
    _train(split, stop=2, **kw)
    assert os.path.isfile(os.path.join(split, "checkpoint-2", NOISE_FILE))
    resumed = _train(split, resume=True, noise_seed=99, **kw)
    a, b = _losses(full), _losses(resumed)
    assert len(a) == 4 and all(math.isfinite(v) for v in a.values())
    assert [b[s] for s in (3, 4)] == [a[s] for s in (3, 4)]
    wa, wb = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    state = torch.load(os.path.join(split, "checkpoint-4", NOISE_FILE), weights_only=True)
    assert all(v["calls"] == 4 for v in state["noise"].values())


@pytest.mark.slow
def test_without_the_noise_state_the_resume_differs(tmp_path):
    """The control: a checkpoint without the noise file is refused; with the file deleted and a
    plain callback-free resume, the noise (and so the losses) differ from the uninterrupted run."""
    from transformers import Trainer

    full = _train(str(tmp_path / "full"))
    split = str(tmp_path / "split")
    _train(split, stop=2)
    os.remove(os.path.join(split, "checkpoint-2", NOISE_FILE))
    with pytest.raises(FileNotFoundError, match=NOISE_FILE):
        _train(split, resume=True)
    plain = _train(split, resume=True, cls=Trainer)
    assert _losses(plain)[3] != _losses(full)[3]


def test_kd_needs_the_same_vocabulary(tmp_path):
    with pytest.raises(ValueError, match="vocabulary of 80 tokens, the model 64"):
        NoisyTrainer(model=_model(), teacher=tiny_llama(vocab=80), args=_args(str(tmp_path)),
                     train_dataset=_data())
    assert isinstance(NoiseStateCallback(), TrainerCallback)
