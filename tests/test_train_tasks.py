"""Training tasks: KD + noise, consistency, plain noise / clean, against manual computations."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastnoise
from fastnoise.train.losses import kd_loss
from fastnoise.train.tasks import (
    ClassificationTask,
    ConsistencyTask,
    DistillationTask,
    FeatureCapture,
    FrozenTeacher,
)


class Tiny(nn.Module):
    def __init__(self, classes=5):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.block = nn.Sequential(nn.Conv2d(6, 7, 3, stride=2), nn.ReLU())
        self.fc = nn.Linear(7 * 3 * 3, classes)

    def forward(self, x):
        x = self.block(F.relu(self.bn(self.conv(x))))
        return self.fc(x.flatten(1))


def _batch():
    return torch.randn(4, 3, 7, 7), torch.tensor([0, 3, 1, 4])


def _student_and_teacher():
    teacher = Tiny()
    student = Tiny()
    student.load_state_dict(teacher.state_dict())
    fastnoise.convert(student, fastnoise.NoiseSpec(eta=0.1))
    return student.train(), teacher


def test_distillation_matches_kd_loss_on_the_same_noise():
    student, teacher = _student_and_teacher()
    task = DistillationTask(student, teacher, temperature=4.0, alpha=0.7)
    teacher.eval()  # the teacher's mode is its owner's (FrozenTeacher runs it in eval mode per call)
    task.train()
    assert not task.teacher.training and not teacher.training
    x, y = _batch()
    state = fastnoise.noise_state_dict(student)
    bn = {k: v.clone() for k, v in student.state_dict().items() if "running" in k}
    out = task(x, y)
    # the same call again, by hand: same counters -> same noise; same BN state
    fastnoise.load_noise_state_dict(student, state)
    student.load_state_dict({**student.state_dict(), **bn})
    s = student(x)
    with torch.no_grad():
        t = teacher(x)
    assert not torch.equal(s, t)  # the student is noisy, the teacher clean
    torch.testing.assert_close(out["output"], s)
    torch.testing.assert_close(out["teacher_output"], t)
    torch.testing.assert_close(out["loss"], kd_loss(s, t, y, temperature=4.0, alpha=0.7))
    assert set(out) >= {"loss", "output", "ce", "kd"}


def test_teacher_frozen_and_student_gets_gradients():
    student, teacher = _student_and_teacher()
    task = DistillationTask(student, teacher)
    x, y = _batch()
    task(x, y)["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())  # nothing recorded: inference mode
    assert all(p.grad is not None for p in student.parameters())
    assert not any(isinstance(m, (fastnoise.Linear, fastnoise.Conv2d)) for m in teacher.modules())
    ft = FrozenTeacher(Tiny())
    ft.train()
    assert not ft.training and ft.model.training  # the wrapper's flag only
    assert not ft(x).is_inference()  # usable in autograd-tracked losses


def test_teacher_is_left_as_the_user_had_it_after_a_kd_run():
    """The issue's reproducer: requires_grad flags and modes (mixed, set by the user) are the
    same after a few KD steps; BatchNorm statistics did not move (eval mode inside each call);
    and a student made afterwards by deepcopy of the teacher trains."""
    teacher = Tiny()
    teacher.conv.weight.requires_grad_(False)  # the user's own choices, all kept
    teacher.block.eval()
    flags = {n: p.requires_grad for n, p in teacher.named_parameters()}
    modes = {n: m.training for n, m in teacher.named_modules()}
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = copy.deepcopy(teacher)
    fastnoise.convert(student, fastnoise.NoiseSpec(eta=0.1))
    student.requires_grad_(True)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    with DistillationTask(student, teacher, temperature=2.0, alpha=0.5) as task:
        task.train()
        for _ in range(3):
            out = task(*_batch())
            opt.zero_grad()
            out["loss"].backward()
            opt.step()
    assert {n: p.requires_grad for n, p in teacher.named_parameters()} == flags
    assert {n: m.training for n, m in teacher.named_modules()} == modes
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not torch.equal(student.fc.weight, teacher.fc.weight)  # the student did train

    again = copy.deepcopy(teacher)  # made after the run
    again.conv.weight.requires_grad_(True)
    loss = F.cross_entropy(again(_batch()[0]), _batch()[1])
    loss.backward()
    assert all(p.grad is not None for p in again.parameters())


def test_consistency_task_removes_its_hooks():
    model = Tiny()
    fastnoise.convert(model, fastnoise.NoiseSpec(eta=0.1))
    with ConsistencyTask(model.train(), ["bn", "block", "fc"]) as task:
        assert model.bn._forward_hooks and model.fc._forward_hooks
        task(*_batch())["loss"].backward()
    assert all(not m._forward_hooks for m in model.modules())
    task.close()  # twice is harmless
    with pytest.raises(RuntimeError, match="closed"):
        task(*_batch())
    plain = ConsistencyTask(model, ["fc"])
    plain.close()
    assert not model.fc._forward_hooks


def test_noise_on_every_student_forward():
    student, teacher = _student_and_teacher()
    task = DistillationTask(student, teacher)
    x, y = _batch()
    a, b = task(x, y)["output"], task(x, y)["output"]
    assert not torch.equal(a, b)
    assert all(s["calls"] == 2 for s in fastnoise.noise_state_dict(student).values())


def test_consistency_matches_manual_and_leaves_no_trace_of_the_clean_pass():
    student, _ = _student_and_teacher()
    layers = ["bn", "block"]
    x, y = _batch()
    weights = {k: v.clone() for k, v in student.state_dict().items()}
    noise_state = fastnoise.noise_state_dict(student)

    task = ConsistencyTask(student, layers, lam=0.3, distance="mse")
    out = task(x, y)
    out["loss"].backward()
    task.capture.remove()
    grads = {n: p.grad.clone() for n, p in student.named_parameters()}
    stats = {k: v.clone() for k, v in student.state_dict().items() if "running" in k or "batches" in k}

    # by hand, from the same state: clean pass (noise off, no autograd), put the BN statistics
    # back, then the noisy pass on the same counters
    student.load_state_dict(weights)
    fastnoise.load_noise_state_dict(student, noise_state)
    student.zero_grad(set_to_none=True)
    feats = {}
    hooks = [getattr(student, n).register_forward_hook(lambda m, i, o, n=n: feats.__setitem__(n, o))
             for n in layers]
    with fastnoise.noise(enabled=False), torch.no_grad():
        student(x)
    clean = [feats[n] for n in layers]
    student.load_state_dict(weights)
    logits = student(x)
    noisy = [feats[n] for n in layers]
    mse = sum(F.mse_loss(a, b) for a, b in zip(noisy, clean, strict=True)) / 2
    want = F.cross_entropy(logits, y) + 0.3 * mse
    want.backward()
    for h in hooks:
        h.remove()

    torch.testing.assert_close(out["output"], logits)
    torch.testing.assert_close(out["loss"], want)
    for n, p in student.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, msg=n)
    for k, v in stats.items():  # as if only the noisy pass had run
        torch.testing.assert_close(student.state_dict()[k], v, msg=k)
    assert not torch.equal(noisy[1], clean[1])
    assert set(out) >= {"loss", "output", "ce", "consistency"}


def test_consistency_cosine_and_zero_noise_gives_zero_term():
    model = Tiny()
    fastnoise.convert(model, fastnoise.NoiseSpec(eta=0.0))
    task = ConsistencyTask(model.train(), ["block", "fc"], lam=1.0, distance="cosine")
    out = task(*_batch())
    assert out["consistency"].item() == pytest.approx(0.0, abs=1e-6)


def test_classification_clean_and_noisy():
    model = Tiny()
    fastnoise.convert(model, fastnoise.NoiseSpec(eta=0.2))
    model.train()
    x, y = _batch()
    clean = ClassificationTask(model, noisy=False)
    with fastnoise.noise(enabled=False):
        want = model(x)
    out = clean(x, y)
    torch.testing.assert_close(out["output"], want)
    torch.testing.assert_close(out["loss"], F.cross_entropy(want, y))
    noisy = ClassificationTask(model, noisy=True, label_smoothing=0.1)
    out = noisy(x, y)
    assert not torch.allclose(out["output"], want)
    torch.testing.assert_close(out["loss"], F.cross_entropy(out["output"], y, label_smoothing=0.1))


def test_feature_capture_errors():
    with pytest.raises(ValueError, match="no module named 'nope'.*'conv'"):
        FeatureCapture(Tiny(), ["conv", "nope"])
    m = Tiny()
    cap = FeatureCapture(m, ["fc"])
    with pytest.raises(RuntimeError, match="'fc' was not called"):
        with cap.recording():
            m.conv(torch.randn(1, 3, 5, 5))
