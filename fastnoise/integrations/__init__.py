"""Hooks into the trainers language-model users train with; each imports the package, never the
other way round, and its framework only when it is imported:

- :mod:`fastnoise.integrations.hf`: Hugging Face ``Trainer`` (``NoiseStateCallback``: the noise
  seed and every layer's call counters in each checkpoint, so ``resume_from_checkpoint``
  continues the same noise; ``NoisyTrainer``: that callback, plus token-level KD from a teacher);
- :mod:`fastnoise.integrations.lightning`: a Lightning ``Callback`` (``NoiseStateCallback``: the
  same state in Lightning checkpoints).
"""
