"""The pieces of fastnoise.train.runfolder on their own (the whole-run tests are in test_train_faults)."""

import errno
import os

import pytest
import torch

from fastnoise.train import runfolder as rf
from fastnoise.train.recipes import DEFAULTS, ConfigError
from fastnoise.train.runfolder import dump_config


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    p = str(tmp_path / "a.txt")
    rf.write_text(p, "old")
    with pytest.raises(KeyError), rf.atomic_path(p) as tmp:
        with open(tmp, "w") as f:
            f.write("half of the new")
        raise KeyError("the writer fails half way")
    assert open(p).read() == "old" and os.listdir(tmp_path) == ["a.txt"]
    rf.write_text(p, "new")
    assert open(p).read() == "new" and os.listdir(tmp_path) == ["a.txt"]


def test_a_full_disk_is_said_so_and_leaves_nothing(tmp_path, monkeypatch):
    p = str(tmp_path / "last.pt")
    monkeypatch.setenv("FASTNOISE_FAULT", "temp:last.pt:enospc")
    with pytest.raises(rf.DiskFullError, match="no space left on device while writing .*last.pt.*--resume"):
        rf.save_torch({"x": torch.ones(3)}, p)
    assert os.listdir(tmp_path) == []


def test_torch_save_failure_keeps_the_os_error():
    class Full:  # a disk with 600 bytes left
        n = 0

        def write(self, b):
            self.n += len(b)
            if self.n > 600:
                raise OSError(errno.ENOSPC, "No space left on device")
            return len(b)

        def flush(self):
            pass

    rec = rf._RecordingFile(Full())
    with pytest.raises((RuntimeError, OSError)):  # torch may turn it into a RuntimeError without a cause
        torch.save({"x": torch.ones(1000)}, rec)
    assert rec.error is not None and rec.error.errno == errno.ENOSPC  # which save_torch raises instead


def test_fault_spec_parsing():
    assert rf._parse_fault("after:last.pt") == ("after:last.pt", 1, "kill")
    assert rf._parse_fault("after:last.pt:3") == ("after:last.pt", 3, "kill")
    assert rf._parse_fault("temp:teacher/last.pt:2:enospc") == ("temp:teacher/last.pt", 2, "enospc")
    assert rf._parse_fault("step:7:stop") == ("step", 7, "stop")


def _csv(path, text):
    with open(path, "wb") as f:
        f.write(text.encode() if isinstance(text, str) else text)


@pytest.mark.parametrize("text,limit,want,kept", [
    ("step,loss\n1,0.5\n2,0.4\n", 9, "step,loss\n1,0.5\n2,0.4\n", (2, 0)),          # intact: untouched
    ("step,loss\n1,0.5\n2,0.4\n3,0.", 9, "step,loss\r\n1,0.5\r\n2,0.4\r\n", (2, 1)),  # torn last row
    ("step,loss\n1,0.5\n2,0.4\n3,0.3\n", 2, "step,loss\r\n1,0.5\r\n2,0.4\r\n", (2, 1)),  # past the checkpoint
    ("step,loss\n1,0.5\n2,0.43,0.3\n3,0.3\n", 9, "step,loss\r\n1,0.5\r\n3,0.3\r\n", (2, 1)),  # glued rows
    (b"step,loss\n1,0.5\n\xff\xfe\n1,0.1\n2,0.4\n", 9, "step,loss\r\n1,0.5\r\n2,0.4\r\n", (2, 2)),  # garbage
    ("ste", 9, None, (0, 1)),                                                          # torn header
    ("step,loss\n5,0.1\n", 2, None, (0, 1)),                                           # nothing left
])
def test_repair_csv(tmp_path, text, limit, want, kept):
    p = str(tmp_path / "steps.csv")
    _csv(p, text)
    assert rf.repair_csv(p, "step", limit) == kept
    if want is None:
        assert not os.path.exists(p)
    else:
        assert open(p, newline="").read() == want
    assert rf.repair_csv(str(tmp_path / "none.csv"), "step", 1) is None


def test_append_row_writes_a_header_once(tmp_path):
    p = str(tmp_path / "s.csv")
    rf.append_row(p, {"step": 1, "loss": 0.5})
    rf.append_row(p, {"step": 2, "loss": 0.25})
    assert open(p, newline="").read() == "step,loss\r\n1,0.5\r\n2,0.25\r\n"


def test_lock_names_its_holder_and_is_released(tmp_path):
    folder = str(tmp_path)
    with rf.RunLock(folder):
        with pytest.raises(rf.FolderBusyError, match=f"in use by process {os.getpid()} on .* \\(started "):
            rf.RunLock(folder).acquire()
        with pytest.raises(rf.FolderBusyError):
            rf.check_not_busy(folder)
    rf.check_not_busy(folder)  # released: no error
    with rf.RunLock(folder) as again:
        assert again.held
    assert rf.user_entries(folder) == []  # the lock file is not a user's file


def test_stray_temps_are_told_apart_from_user_files(tmp_path):
    for name in (".last.pt.tmp-123", "best.pt.tmp4567", "notes.tmp", "last.pt", "my.tmp-x"):
        (tmp_path / name).write_text("x")
    assert rf.user_entries(str(tmp_path)) == ["last.pt", "my.tmp-x", "notes.tmp"]
    assert rf.remove_stray_temps(str(tmp_path)) == [".last.pt.tmp-123", "best.pt.tmp4567"]
    assert sorted(os.listdir(tmp_path)) == ["last.pt", "my.tmp-x", "notes.tmp"]


def test_a_config_must_be_complete(tmp_path):
    p = str(tmp_path / "config.yaml")
    dump_config(DEFAULTS, p)
    assert rf.load_complete_config(p) == DEFAULTS
    text = open(p).read()
    with open(p, "w") as f:
        f.write(text[:text.index("schedule:")])
    with pytest.raises(ConfigError, match="damaged or incomplete: it lacks schedule.epochs .*and 10 more"):
        rf.load_complete_config(p)


def test_first_nonfinite_names_the_tensor():
    state = {"a": torch.ones(3), "opt": {"state": {0: {"exp_avg": torch.tensor([1.0, float("inf")])}}},
             "steps": torch.tensor([1, 2])}
    assert rf.first_nonfinite(state) == "opt.state.0.exp_avg"
    state["opt"]["state"][0]["exp_avg"][1] = 0
    assert rf.first_nonfinite(state) is None
    assert rf.first_nonfinite({"x": torch.tensor(float("nan"), dtype=torch.bfloat16)}) == "x"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16,
                                   torch.complex64, torch.float8_e5m2], ids=str)
@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_first_nonfinite_finds_each_kind_in_each_dtype(dtype, bad):
    def tensor(value=None):
        t = torch.randn(7, 5).t()  # not contiguous
        if value is not None:
            t[3, 2] = value
        return t.to(dtype)

    assert rf.first_nonfinite({"a": tensor(), "empty": torch.empty(0, dtype=dtype)}) is None
    assert rf.first_nonfinite({"a": tensor(), "b": tensor(float(bad)), "c": tensor(float(bad))}) == "b"
    if dtype.is_complex:  # in the imaginary part only
        t = tensor()
        t[1, 1] = complex(0.0, float(bad))
        assert rf.first_nonfinite([tensor(), t]) == "1"
    real = torch.float32 if dtype.is_complex else dtype  # the largest finite value is finite
    assert rf.first_nonfinite({"max": torch.full((3,), torch.finfo(real).max, dtype=real).to(dtype)}) is None
