"""Checkpoint and resume (commentaries_ext.checkpoint and the loops' checkpoint_path=).

The kill/resume tests run tests/_checkpoint_job.py in subprocesses: an
uninterrupted run, a run SIGKILLed between two checkpoints (or in the middle of
writing one), and a resumed run, whose final commentary (and student, history)
must be bit-identical to the uninterrupted run's.
"""
import copy
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from commentaries_ext import checkpoint as C
from commentaries_ext.checkpoint import (
    CheckpointError,
    CheckpointWarning,
    load_checkpoint,
    previous_path,
    read_checkpoint,
    save_checkpoint,
)

JOB = Path(__file__).with_name("_checkpoint_job.py")
ROOT = JOB.parent.parent


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def _start(job, ckpt, out, *extra):
    return subprocess.Popen([sys.executable, str(JOB), job, str(ckpt), str(out), *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(), cwd=str(ROOT))


def _finish(p, timeout=120):
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, f"job failed ({p.returncode}):\n{out}\n{err[-3000:]}"
    return out


def _kill_at(p, marker, timeout=120):
    """Read the job's stdout until ``marker``, then SIGKILL it; returns the lines read."""
    lines, found = [], threading.Event()

    def reader():
        for line in p.stdout:
            lines.append(line)
            if line.startswith(marker):
                found.set()
                return

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    ok = found.wait(timeout)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    err = p.stderr.read()
    assert ok, f"the job never printed {marker!r}: {''.join(lines)}\n{err[-3000:]}"
    assert p.returncode == -signal.SIGKILL
    return lines


def _assert_same(ref, got):
    a, b = torch.load(ref, weights_only=True), torch.load(got, weights_only=True)
    assert a["commentary"].keys() == b["commentary"].keys()
    for k, v in a["commentary"].items():
        assert torch.equal(v, b["commentary"][k]), f"commentary {k} differs after resume"
    for k, v in a.get("student", {}).items():
        assert torch.equal(v, b["student"][k]), f"student {k} differs after resume"
    for k in ("history", "losses", "skipped"):
        assert a.get(k) == b.get(k), f"{k} differs after resume"
    return a


def _resumed_step(stdout):
    lines = [ln.split() for ln in stdout.splitlines() if ln.startswith("RESUMED")]
    assert len(lines) == 1, f"the run did not resume: {stdout}"
    return int(lines[0][1]), lines[0][2]


@pytest.mark.parametrize("job, every, total", [("bptt", 2, 8), ("ift_blend", 3, 14), ("train", 3, 14)])
def test_sigkill_between_checkpoints_then_resume_is_bit_exact(tmp_path, job, every, total):
    ckpt = tmp_path / "job.ckpt"
    ref = _start(job, "-", tmp_path / "ref.pt")  # uninterrupted, no checkpointing at all
    killed = _start(job, ckpt, tmp_path / "killed.pt", "--every", str(every), "--pause-after", "2", "1")
    _kill_at(killed, "PAUSED")  # after the 2nd checkpoint and one more step
    _finish(ref)
    assert not (tmp_path / "killed.pt").exists()
    st = read_checkpoint(ckpt)
    assert st["step"] == 2 * every and read_checkpoint(previous_path(ckpt))["step"] == every
    out = _finish(_start(job, ckpt, tmp_path / "resumed.pt", "--every", str(every)))
    assert _resumed_step(out) == (2 * every, str(ckpt))
    res = _assert_same(tmp_path / "ref.pt", tmp_path / "resumed.pt")
    assert len(res["history"] if "history" in res else res["losses"]) == total
    assert read_checkpoint(ckpt)["step"] == total  # the final state is saved too


def test_sigkill_mid_write_keeps_the_old_checkpoint_and_ift_weighting_resumes_bit_exact(tmp_path):
    """IFT with a weighting network and power-iteration alpha (re-estimated every 3
    hyper-steps): killed while writing its 3rd checkpoint, resumed from the 2nd."""
    ckpt, every = tmp_path / "w.ckpt", 2
    ref = _start("ift_weight", "-", tmp_path / "ref.pt")
    killed = _start("ift_weight", ckpt, tmp_path / "killed.pt", "--every", str(every), "--pause-mid-write", "3")
    _kill_at(killed, "MIDWRITE")
    _finish(ref)
    tmp = ckpt.with_name(f".{ckpt.name}.tmp")
    assert tmp.exists() and tmp.stat().st_size > 0  # the interrupted write
    with pytest.raises(CheckpointError, match="truncated"):
        read_checkpoint(tmp)
    st = read_checkpoint(ckpt)  # untouched by the interrupted write
    assert st["step"] == 2 * every
    es = st["teacher"]["engine_state"]
    assert es["lambda_max"] is not None and es["eigvec"] is not None and es["calls"] == 2 * every
    out = _finish(_start("ift_weight", ckpt, tmp_path / "resumed.pt", "--every", str(every)))
    assert _resumed_step(out) == (2 * every, str(ckpt))
    _assert_same(tmp_path / "ref.pt", tmp_path / "resumed.pt")
    assert not tmp.exists()


# --------------------------------------------------------------------------- the file format


def _two_checkpoints(tmp_path):
    path = tmp_path / "c.ckpt"
    save_checkpoint(path, {"step": 1, "w": torch.arange(1000.0)})
    save_checkpoint(path, {"step": 2, "w": torch.arange(1000.0) * 2})
    return path


def test_save_rotates_and_reads_back(tmp_path):
    path = _two_checkpoints(tmp_path)
    assert read_checkpoint(path)["step"] == 2 and read_checkpoint(previous_path(path))["step"] == 1
    assert torch.equal(read_checkpoint(path)["w"], torch.arange(1000.0) * 2)
    assert path.read_bytes()[:8] == C.MAGIC
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("damage, problem", [
    (lambda b: b[: len(b) // 2], "truncated: the payload has"),
    (lambda b: b[:20], "truncated: 20 bytes"),
    (lambda b: b[:-200] + bytes([b[-200] ^ 0x10]) + b[-199:], "corrupted: payload sha256"),
    (lambda b: b"XXXXXXXX" + b[8:], "not a commentaries_ext checkpoint"),
    (lambda b: b + b"junk", "unexpected trailing bytes"),
])
def test_a_damaged_newest_checkpoint_is_refused_and_the_previous_one_used(tmp_path, damage, problem):
    path = _two_checkpoints(tmp_path)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CheckpointError, match=problem) as e:
        read_checkpoint(path)
    assert str(path) in str(e.value)
    with pytest.warns(CheckpointWarning, match=problem) as w:
        state, used = load_checkpoint(path)
    assert used == previous_path(path) and state["step"] == 1
    assert str(path) in str(w[0].message)
    with pytest.raises(CheckpointError, match=problem):
        load_checkpoint(path, fallback=False)
    # the next save keeps the good previous checkpoint instead of rotating the bad one into its place
    with pytest.warns(CheckpointWarning, match="not kept as the previous"):
        save_checkpoint(path, {"step": 3})
    assert read_checkpoint(path)["step"] == 3 and read_checkpoint(previous_path(path))["step"] == 1


def test_both_damaged_is_an_error_naming_both(tmp_path):
    path = _two_checkpoints(tmp_path)
    for p in (path, previous_path(path)):
        p.write_bytes(p.read_bytes()[:-1])
    with pytest.raises(CheckpointError, match="previous checkpoint is unusable too") as e:
        load_checkpoint(path)
    assert str(path) in str(e.value) and str(previous_path(path)) in str(e.value)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "none.ckpt")


def test_a_crash_mid_write_leaves_the_old_checkpoints_intact(tmp_path, monkeypatch):
    path = _two_checkpoints(tmp_path)
    before, prev_before = path.read_bytes(), previous_path(path).read_bytes()
    real = C._write_all

    def crash(f, data):
        if len(data) > C.HEADER_SIZE:  # the payload: half of it, then the "crash"
            real(f, data[: len(data) // 2])
            raise OSError("disk full (simulated)")
        real(f, data)

    monkeypatch.setattr(C, "_write_all", crash)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(path, {"step": 3, "w": torch.zeros(1000)})
    assert path.read_bytes() == before and previous_path(path).read_bytes() == prev_before
    assert not list(tmp_path.glob(".*.tmp"))
    assert load_checkpoint(path)[0]["step"] == 2


@pytest.mark.parametrize("tmp_complete", [True, False])
def test_a_crash_between_the_two_renames_uses_the_complete_new_version(tmp_path, tmp_complete):
    """Killed after the current file was rotated to .prev and before the new one was renamed into
    place: the newest complete state is the temporary file's, and loading uses it (a truncated
    temporary file is not used: then .prev)."""
    path = _two_checkpoints(tmp_path)  # path: step 2, .prev: step 1
    staged = save_checkpoint(tmp_path / "staged.ckpt", {"step": 3, "w": torch.arange(1000.0) * 3},
                             keep_previous=False)
    blob = staged.read_bytes()
    tmp = C._temp_path(path)
    tmp.write_bytes(blob if tmp_complete else blob[:-100])
    os.replace(path, previous_path(path))  # the rotation that happened before the kill
    with pytest.warns(CheckpointWarning, match="missing") as w:
        state, used = load_checkpoint(path)
    if tmp_complete:
        assert used == tmp and state["step"] == 3 and torch.equal(state["w"], torch.arange(1000.0) * 3)
        assert str(tmp) in str(w[0].message)
    else:
        assert used == previous_path(path) and state["step"] == 2
    with pytest.raises(FileNotFoundError):
        load_checkpoint(path, fallback=False)
    # the next save replaces the leftover temporary file and leaves the newest intact .prev alone
    save_checkpoint(path, {"step": 4})
    assert read_checkpoint(path)["step"] == 4 and read_checkpoint(previous_path(path))["step"] == 2
    assert not tmp.exists()


def test_concurrent_writers_of_one_path_take_turns(tmp_path):
    """Two writers of the same checkpoint path (two jobs given one path) each save in turn: the
    fixed temporary file was truncated and renamed under the other writer, which then crashed
    (FileNotFoundError); the file left behind verifies."""
    path = tmp_path / "shared.ckpt"
    errors = []

    def writer(who):
        for i in range(40):
            try:
                save_checkpoint(path, {"who": who, "i": i, "x": torch.full((20000,), float(who))})
            except Exception as e:  # noqa: BLE001
                errors.append(e)

    threads = [threading.Thread(target=writer, args=(w,)) for w in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    state = read_checkpoint(path)
    assert state["i"] == 39 and torch.equal(state["x"], torch.full((20000,), float(state["who"])))
    read_checkpoint(previous_path(path))


def test_an_older_format_version_is_refused(tmp_path):
    path = tmp_path / "v.ckpt"
    save_checkpoint(path, {"a": 1}, keep_previous=False)
    blob = bytearray(path.read_bytes())
    blob[8:12] = (0).to_bytes(4, "little")
    path.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="format version 0 is older"):
        read_checkpoint(path)


def test_payload_loads_weights_only_and_unsafe_state_is_refused_at_save(tmp_path):
    path = _two_checkpoints(tmp_path)
    with pytest.raises(CheckpointError, match="weights_only"):
        save_checkpoint(path, {"step": 3, "obj": nn.Linear(2, 2)})  # a module, not a state dict
    assert read_checkpoint(path)["step"] == 2
    # a well-formed file whose (hash-correct) payload would run code is refused by torch.load(weights_only=True)
    import hashlib
    import io

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    buf = io.BytesIO()
    torch.save({"x": Evil()}, buf)
    payload = buf.getvalue()
    bad = tmp_path / "evil.ckpt"
    bad.write_bytes(C._HEADER.pack(C.MAGIC, C.FORMAT_VERSION, len(payload), hashlib.sha256(payload).digest()) + payload)
    with pytest.raises(CheckpointError, match="weights_only"):
        read_checkpoint(bad)


def test_rng_state_round_trip():
    import random

    import numpy as np

    g = torch.Generator().manual_seed(3)
    st = C.rng_state({"gen": g})
    a = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(3, generator=g))
    torch.manual_seed(99), np.random.seed(99), random.seed(99), g.manual_seed(99)
    C.set_rng_state(read_back(st), {"gen": g})
    b = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(3, generator=g))
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2] and torch.equal(a[3], b[3])


def read_back(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# --------------------------------------------------------------------------- the loops, in process


@pytest.fixture
def deterministic():
    n, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    yield
    torch.set_num_threads(n)
    torch.use_deterministic_algorithms(det)


def _train(ckpt=None, steps=6, lr=0.05, **kw):
    from commentaries_ext.commentary import Blending
    from commentaries_ext.learn import train_student

    sys.path.insert(0, str(JOB.parent))
    try:
        from _checkpoint_job import data, student
    finally:
        sys.path.pop(0)
    torch.manual_seed(0)
    c, s = Blending(3), student()
    losses = train_student(s, data(), commentary=c, steps=steps, batch_size=8, lr=lr, checkpoint_path=ckpt,
                           checkpoint_every=2, **kw)
    return losses, s.state_dict()


def test_resume_after_a_truncated_newest_checkpoint_uses_the_previous(tmp_path, deterministic):
    ref_losses, ref_student = _train()
    ckpt = tmp_path / "t.ckpt"
    _train(ckpt)
    assert read_checkpoint(ckpt)["step"] == 6 and read_checkpoint(previous_path(ckpt))["step"] == 4
    ckpt.write_bytes(ckpt.read_bytes()[:-7])
    with pytest.warns(CheckpointWarning, match="truncated"):
        losses, s = _train(ckpt)  # resumes at step 4 from .prev and redoes steps 5-6
    assert losses == ref_losses and all(torch.equal(v, s[k]) for k, v in ref_student.items())
    assert read_checkpoint(ckpt)["step"] == 6


def test_another_configuration_is_refused_and_no_resume_starts_afresh(tmp_path, deterministic):
    ckpt = tmp_path / "t.ckpt"
    ref_losses, _ = _train(ckpt, steps=4)
    # lists are compared entry by entry (the whole group list, cut to 120 characters, hid the change)
    with pytest.raises(CheckpointError, match=r"another configuration:\n  - optimizer.groups\[0\].lr: checkpoint 0.05, now 0.1") as e:
        _train(ckpt, steps=4, lr=0.1)
    assert str(ckpt) in str(e.value) and "resume=False" in str(e.value)
    with pytest.raises(CheckpointError, match="steps: checkpoint 4, now 6"):
        _train(ckpt, steps=6)
    losses, _ = _train(ckpt, steps=4, lr=0.1, resume=False)
    assert losses != ref_losses and read_checkpoint(ckpt)["config"]["optimizer"]["groups"][0]["lr"] == 0.1


def test_a_changed_commentary_or_fresh_student_is_refused(tmp_path):
    """The run configuration holds the commentary's constructor arguments and, with fresh
    students (same_init=False), the shapes of the students the factory builds: resuming with
    another sigma or another student size is refused (it resumed silently, continuing weights
    learned under the old setting); the same setting resumes."""
    from commentaries_ext.commentary import AttentionMask, Blending
    from commentaries_ext.learn import learn_bptt, learn_ift

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 1, 8, 8, generator=g), torch.arange(16) % 3

    def ift(sigma, steps):
        torch.manual_seed(0)
        student = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
        return learn_ift(AttentionMask(1, num_classes=3, sigma=sigma, width=4), student, (x, y), (x, y),
                         steps=steps, batch_size=8, checkpoint_path=tmp_path / "ift.ckpt", checkpoint_every=1)

    ift(0.2, 2)
    with pytest.raises(CheckpointError, match="commentary.config.sigma: checkpoint 0.2, now 0.6"):
        ift(0.6, 2)
    ift(0.2, 2)  # the same setting: resumes

    def bptt(hidden):
        torch.manual_seed(0)
        return learn_bptt(Blending(3), lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(),
                                                           nn.Linear(hidden, 3)),
                          (x, y), (x, y), inner_steps=2, outer_steps=2, batch_size=8, same_init=False,
                          checkpoint_path=tmp_path / "bptt.ckpt", checkpoint_every=1)

    bptt(8)
    with pytest.raises(CheckpointError, match=r"student.1.bias: checkpoint \[8\], now \[16\]"):
        bptt(16)


def test_wrapper_state_dict_restores_the_engine_state(deterministic):
    from commentaries_ext.commentary import Blending
    from commentaries_ext.engine import NeumannConfig
    from commentaries_ext.wrapper import CommentaryOptimizer

    sys.path.insert(0, str(JOB.parent))
    try:
        from _checkpoint_job import data, student
    finally:
        sys.path.pop(0)
    x, y = data()

    def make():
        torch.manual_seed(0)
        s, c = student(), Blending(3)
        return CommentaryOptimizer(torch.optim.SGD(s.parameters(), lr=0.1), s, c, val_loader=[data(seed=1)],
                                   solver=NeumannConfig(K=2, alpha=None, reestimate_every=5, damping=1.0),
                                   generator=torch.Generator().manual_seed(0)), s

    t, s = make()
    for _ in range(2):
        t.zero_grad()
        t.loss(x, y).backward()
        t.step()
    sd = read_back({"t": t.state_dict(), "s": s.state_dict()})
    es = sd["t"]["engine_state"]
    assert es["calls"] == 2 and es["estimated_at"] == 0 and es["lambda_max"] > 0
    assert len(es["eigvec"]) == len(list(s.parameters()))
    t2, s2 = make()
    s2.load_state_dict(sd["s"])
    t2.load_state_dict(sd["t"])
    e1, e2 = t._engine_state, t2._engine_state
    assert (e1.calls, e1.lambda_max, e1.estimated_at) == (e2.calls, e2.lambda_max, e2.estimated_at)
    assert all(torch.equal(a, b) for a, b in zip(e1.eigvec, e2.eigvec))
    t2.generator.set_state(t.generator.get_state())
    for tt in (t, t2):  # the next hyper-step is the same (no re-estimation was due: the state was used)
        tt.zero_grad()
        tt.loss(x, y).backward()
        tt.step()
    assert t2._engine_state.estimated_at == 0 and t2._engine_state.calls == 3
    assert torch.equal(t.commentary.phi, t2.commentary.phi)


# --------------------------------------------------------------------------- CLI


def test_cli_flags_and_resume(tmp_path, capsys, deterministic):
    from commentaries_ext.cli import build_parser, main

    for sub in ("learn", "train"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([sub, "--help"] if sub == "train" else [sub, "weighting", "--help"])
        text = capsys.readouterr().out
        assert "--checkpoint-path PATH" in text and "--checkpoint-every N" in text and "--no-resume" in text
    ckpt = tmp_path / "t.ckpt"
    args = ["train", "--data", "digits", "--arch", "mlp", "--train-steps", "6", "--eval-every", "3",
            "--batch-size", "16", "--quiet", "--train-size", "200", "--val-size", "100", "--test-size", "100",
            "--checkpoint-path", str(ckpt), "--checkpoint-every", "2"]
    assert main(args + ["--out", str(tmp_path / "a.json")]) == 0
    assert read_checkpoint(ckpt)["step"] == 6 and read_checkpoint(ckpt)["kind"] == "train_tracked"
    assert main(args + ["--out", str(tmp_path / "b.json")]) == 0  # resumes at the end: the same results
    import json

    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert a["curve"] == b["curve"] and len(a["curve"]) == 2
    capsys.readouterr()
    assert main(args + ["--train-lr", "0.01", "--out", str(tmp_path / "c.json")]) == 1
    err = capsys.readouterr().err
    assert "another configuration" in err and str(ckpt) in err and "optimizer.groups" in err
    assert main(args + ["--train-lr", "0.01", "--no-resume", "--out", str(tmp_path / "c.json")]) == 0
    assert read_checkpoint(ckpt)["config"]["optimizer"]["groups"][0]["lr"] == 0.01


def test_bptt_checkpoints_from_before_adamw_still_resume():
    """The learn_bptt checkpoint records the inner optimizer's options and refuses any that
    changed; Adam's decoupled_weight_decay (added later) at its old behaviour stays out, so a
    checkpoint written before it still matches."""
    from commentaries_ext.engine import Adam
    from commentaries_ext.learn import _engine_opt_config

    before = {"type": "Adam", "lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False,
              "maximize": False}
    assert _engine_opt_config(Adam(lr=1e-3)) == before
    assert _engine_opt_config(Adam(lr=1e-3, decoupled_weight_decay=True))["decoupled_weight_decay"] is True


def test_a_torch_optimizer_setting_added_later_does_not_refuse_a_checkpoint(tmp_path):
    """torch adds param-group keys between releases (Adam's decoupled_weight_decay): a checkpoint
    from before such a key resumes (the missing key counts at its default), a changed one does not."""
    opt = torch.optim.Adam([nn.Parameter(torch.zeros(2))], lr=0.1)
    cfg = {"optimizer": C.optimizer_config(opt)}
    old = copy.deepcopy(cfg)
    del old["optimizer"]["groups"][0]["decoupled_weight_decay"]
    ckpt = tmp_path / "o.ckpt"
    C.Checkpointer(ckpt, "job", old).save(1, {"x": 1})
    assert C.Checkpointer(ckpt, "job", cfg).load()["x"] == 1
    # AdamW fixes decoupled_weight_decay=True without taking it in its constructor
    adamw = {"optimizer": C.optimizer_config(torch.optim.AdamW([nn.Parameter(torch.zeros(2))], lr=0.1))}
    old = copy.deepcopy(adamw)
    del old["optimizer"]["groups"][0]["decoupled_weight_decay"]
    C.Checkpointer(tmp_path / "w.ckpt", "job", old).save(1, {"x": 2})
    assert C.Checkpointer(tmp_path / "w.ckpt", "job", adamw).load()["x"] == 2
    changed = {"optimizer": C.optimizer_config(torch.optim.Adam([nn.Parameter(torch.zeros(2))], lr=0.1,
                                                                 betas=(0.8, 0.999)))}
    with pytest.raises(CheckpointError, match=r"optimizer.groups\[0\].betas: checkpoint \[0.9, 0.999\], now \[0.8, 0.999\]"):
        C.Checkpointer(ckpt, "job", changed).load()


def test_fresh_students_from_a_seeded_factory_resume_bit_exact(tmp_path, deterministic):
    """learn_bptt(same_init=False) with models.student_factory(seed=): the run configuration called
    the factory once to read shapes, which used up its one-time seed, so checkpoint_path= changed
    the result; a resume re-seeded at its first student. Now: the same commentary with or without
    checkpoints, and after a crash and a resume."""
    from commentaries_ext.commentary import ExampleWeighting
    from commentaries_ext.learn import learn_bptt
    from commentaries_ext.models import student_factory

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 1, 4, 4, generator=g), torch.arange(32) % 3

    def run(ckpt=None, crash_at=None):
        torch.manual_seed(123)
        com = ExampleWeighting(nn.Sequential(nn.Flatten(), nn.Linear(16, 1)), call="x", num_classes=3)

        def crash(step, record):
            if step == crash_at:
                raise KeyboardInterrupt

        fac = student_factory("mlp", (1, 4, 4), 3, seed=0)
        learn_bptt(com, fac, (x, y), (x, y), inner_steps=2, outer_steps=3, batch_size=8, same_init=False,
                   checkpoint_path=ckpt, checkpoint_every=1, callback=crash)
        return com.state_dict()

    ref = run()
    # a checkpoint in the layout before this change (fresh students' shapes in the configuration, not
    # in the state) still resumes: the loop upgrades it before the comparison
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "old.ckpt", crash_at=1)
    st = read_checkpoint(tmp_path / "old.ckpt")
    st["config"]["student"] = st.pop("student_shapes")
    C.save_checkpoint(tmp_path / "old.ckpt", st, keep_previous=False)
    assert all(torch.equal(v, run(tmp_path / "old.ckpt")[k]) for k, v in ref.items())
    for got in (run(tmp_path / "a.ckpt"), None):
        if got is None:
            with pytest.raises(KeyboardInterrupt):
                run(tmp_path / "b.ckpt", crash_at=1)
            got = run(tmp_path / "b.ckpt")
        assert all(torch.equal(v, got[k]) for k, v in ref.items())


def test_the_wrapper_resumes_where_its_loaders_and_generator_were(deterministic):
    """A CommentaryOptimizer in a user's loop, checkpointed as the README says (teacher and student
    state dicts, rng_state): the hyper-steps' position in val_loader and hyper_train_loader and the
    wrapper's own generator were not saved, so a resume restarted both loaders (the commentary
    differed by up to 0.04 in a review). 3 validation batches, 4 hyper-training batches, a crash
    after 5 of 8 steps."""
    from commentaries_ext.checkpoint import rng_state, set_rng_state
    from commentaries_ext.commentary import Blending
    from commentaries_ext.wrapper import CommentaryOptimizer

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 6, generator=g), torch.arange(96) % 3
    val = [(x[i:i + 8] + 0.5, y[i:i + 8]) for i in range(0, 24, 8)]
    hyper_train = [(x[i:i + 8], y[i:i + 8]) for i in range(24, 56, 8)]
    train = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 64, 8)]

    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        com = Blending(3)
        teacher = CommentaryOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, com, val_loader=val,
                                      hyper_train_loader=hyper_train, hyper_lr=0.1, total_steps=8,
                                      generator=torch.Generator().manual_seed(5))
        return model, com, teacher

    def run(teacher, steps):
        for xb, yb in steps:
            teacher.zero_grad()
            teacher.loss(xb, yb).backward()
            teacher.step()

    model, com, teacher = build()
    run(teacher, train)
    full = [p.detach().clone() for p in com.parameters()]
    model, com, teacher = build()
    run(teacher, train[:5])
    ck = read_back({"model": model.state_dict(), "teacher": teacher.state_dict(), "rng": rng_state()})
    model, com, teacher = build()  # a fresh process
    model.load_state_dict(ck["model"])
    teacher.load_state_dict(ck["teacher"])
    set_rng_state(ck["rng"])
    run(teacher, train[5:])
    assert teacher.hyper_steps == 8
    assert all(torch.equal(a, b) for a, b in zip(full, com.parameters()))


def test_cli_learn_resumes_with_its_progress_and_time(tmp_path, capsys, monkeypatch, deterministic):
    """`learn` interrupted and run again: it says it resumed and where, the progress bar starts
    there (it restarted at 0/N), learned_with.seconds counts both runs (it counted the last) and the
    commentary equals an uninterrupted run's. --checkpoint-every or --no-resume without
    --checkpoint-path is refused (they were accepted and did nothing)."""
    import json

    from commentaries_ext import cli

    base = ["learn", "weighting", "--data", "digits", "--arch", "mlp", "--outer-steps", "4", "--inner-steps", "2",
            "--batch-size", "8", "--train-size", "64", "--val-size", "32", "--test-size", "32"]
    assert cli.main(base + ["--quiet", "--out", str(tmp_path / "ref.commentary")]) == 0
    ckpt = tmp_path / "l.ckpt"
    args = base + ["--checkpoint-path", str(ckpt), "--out", str(tmp_path / "r.commentary")]
    advance = cli._advance

    def crash(bar, step, a):
        if step == 2:
            raise KeyboardInterrupt
        advance(bar, step, a)

    monkeypatch.setattr(cli, "_advance", crash)
    with pytest.raises(KeyboardInterrupt):
        cli.main(args)
    first_run = read_checkpoint(ckpt)["seconds"]
    assert first_run > 0
    monkeypatch.setattr(cli, "_advance", advance)
    capsys.readouterr()
    assert cli.main(args) == 0
    err = capsys.readouterr().err
    assert f"resumed from {ckpt} at step 2" in err and "2/4" not in err.split("resumed")[0]
    ref, res = (json.loads((tmp_path / f"{s}.json").read_text()) for s in ("ref", "r"))
    assert res["learned_with"]["resumed_at_step"] == 2 and "resumed_at_step" not in ref["learned_with"]
    assert res["learned_with"]["seconds"] > first_run
    from commentaries_ext.files import load_commentary

    a, b = load_commentary(tmp_path / "ref.commentary"), load_commentary(tmp_path / "r.commentary")
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    for flag in (["--checkpoint-every", "2"], ["--no-resume"]):
        with pytest.raises(SystemExit) as e:
            cli.main(base + flag)
        assert e.value.code == 2 and "needs --checkpoint-path" in capsys.readouterr().err


def test_atomic_files_get_the_usual_mode(tmp_path):
    """mkstemp's temporary file is 0600: commentary files came out readable by their owner only."""
    from commentaries_ext._atomic import write_atomic

    umask = os.umask(0o022)
    try:
        p = write_atomic(tmp_path / "f.bin", lambda f: f.write(b"x"))
    finally:
        os.umask(umask)
    assert p.stat().st_mode & 0o777 == 0o644
    os.chmod(p, 0o600)  # a private file stays private when rewritten (and a 0o664 keeps its group bit)
    assert write_atomic(p, lambda f: f.write(b"y")).stat().st_mode & 0o777 == 0o600
    os.chmod(p, 0o664)
    assert write_atomic(p, lambda f: f.write(b"z")).stat().st_mode & 0o777 == 0o664 and p.read_bytes() == b"z"
    assert not list(tmp_path.glob(".*.tmp"))


def test_temporaries_of_a_killed_writer_are_cleaned_up(tmp_path):
    """A process killed while writing a commentary file left its .<name>.*.tmp for good; the next
    write of that path removes those untouched for an hour (a fresh one may be a live writer's)."""
    from commentaries_ext import _atomic

    stale, fresh = tmp_path / ".c.commentary.dead.tmp", tmp_path / ".c.commentary.live.tmp"
    other = tmp_path / ".d.commentary.dead.tmp"  # another file's
    for t in (stale, fresh, other):
        t.write_bytes(b"partial")
    hours_ago = time.time() - 2 * _atomic.STALE_SECONDS
    os.utime(stale, (hours_ago, hours_ago))
    os.utime(other, (hours_ago, hours_ago))
    _atomic.write_atomic(tmp_path / "c.commentary", lambda f: f.write(b"new"))
    assert not stale.exists() and fresh.exists() and other.exists()
    assert (tmp_path / "c.commentary").read_bytes() == b"new"
