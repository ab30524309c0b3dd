"""The ``commentaries`` command line: help, a tiny learn/train/inspect job on digits,
errors that say what to do."""
import json
import subprocess
import sys

import pytest
import torch

from commentaries_ext import cli


def test_help_explains_every_option(capsys):
    parser = cli.build_parser()
    for sub in ([], ["demo"], ["learn"], ["train"], ["inspect"]):
        with pytest.raises(SystemExit) as e:
            parser.parse_args(sub + ["--help"])
        assert e.value.code == 0
    out = capsys.readouterr().out
    assert "weighting" in out and "--inner-steps" in out and "--commentary" in out
    # every option has a help text
    for action in parser._actions:
        if hasattr(action, "choices") and isinstance(action.choices, dict):
            for sp in action.choices.values():
                for a in sp._actions:
                    assert a.help, f"{sp.prog} {a.option_strings or a.dest} has no help"


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "learn" in capsys.readouterr().out


def test_learn_train_inspect_tiny(tmp_path, capsys):
    out = tmp_path / "w.commentary"
    rc = cli.main(["learn", "weighting", "--data", "digits", "--train-size", "200", "--val-size", "100",
                   "--test-size", "100", "--inner-steps", "3", "--outer-steps", "2", "--train-steps", "6",
                   "--eval-every", "3", "--evaluate", "--quiet", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "commentary file" in text and "baseline: test acc" in text
    assert out.exists() and out.with_suffix(".png").exists()
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["learned_with"]["algorithm"] == "bptt" and len(summary["history"]) == 2
    assert {"baseline", "with_commentary"} <= set(summary["evaluation"])

    rc = cli.main(["train", "--commentary", str(out), "--data", "digits", "--train-size", "200", "--val-size", "100",
                   "--test-size", "100", "--arch", "mlp", "--train-steps", "5", "--eval-every", "5", "--quiet"])
    assert rc == 0
    res = json.loads((tmp_path / "w.train-mlp.json").read_text())
    assert 0 <= res["test"]["accuracy"] <= 1 and res["arch"] == "mlp"

    # the commentary was learned on other data: a clear error, unless asked for
    rc = cli.main(["train", "--commentary", str(out), "--data", "digits", "--train-steps", "2", "--quiet"])
    assert rc == 1
    assert "does not match" in capsys.readouterr().err

    rc = cli.main(["inspect", str(out), "--out", str(tmp_path / "i.png")])
    assert rc == 0
    assert "ExampleWeighting" in capsys.readouterr().out and (tmp_path / "i.png").exists()


@pytest.mark.parametrize("kind,extra", [("blending", []), ("mask", ["--spurious"])])
def test_learn_ift_kinds(tmp_path, capsys, kind, extra):
    out = tmp_path / f"{kind}.commentary"
    rc = cli.main(["learn", kind, "--data", "digits", "--train-size", "100", "--val-size", "50", "--test-size", "50",
                   "--steps", "2", "--quiet", "--out", str(out), *extra])
    assert rc == 0
    assert out.exists() and out.with_suffix(".png").exists()
    assert json.loads(out.with_suffix(".json").read_text())["learned_with"]["algorithm"] == "ift"


def test_neumann_k_changes_only_k(tmp_path):
    # giving the default --neumann-k 1 is the same run as not giving it (alpha: the student's --lr)
    from safetensors.torch import load_file

    runs = {}
    for name, flag in (("none", []), ("k1", ["--neumann-k", "1"]), ("k3", ["--neumann-k", "3"])):
        out = tmp_path / f"{name}.commentary"
        assert cli.main(["learn", "blending", "--data", "digits", "--train-size", "100", "--val-size", "50",
                         "--test-size", "50", "--steps", "2", "--lr", "0.02", "--quiet", "--out", str(out), *flag]) == 0
        runs[name] = (json.loads(out.with_suffix(".json").read_text())["learned_with"]["solver"],
                      load_file(str(out))["phi"])
    assert runs["k1"][0] == runs["none"][0] and "K=1," in runs["none"][0] and "alpha=0.02," in runs["none"][0]
    assert runs["k1"][1].equal(runs["none"][1])
    assert runs["k3"][0] == runs["none"][0].replace("K=1,", "K=3,")


def test_neumann_k_with_cg_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["learn", "blending", "--data", "digits", "--solver", "cg", "--neumann-k", "3", "--quiet"])
    assert e.value.code == 2 and "--neumann-k" in capsys.readouterr().err


def test_train_tracked_leaves_the_commentary_learnable():
    """train_tracked trains with the commentary fixed; its parameters required no grad for good
    after it (hparams() came back empty, so it could not be learned further)."""
    from commentaries_ext.commentary import Blending
    from commentaries_ext.data import load_dataset
    from commentaries_ext.models import make_student

    splits = load_dataset("digits", seed=0, train_size=64, val_size=32)
    com = Blending(splits.num_classes)
    r = cli.train_tracked(make_student("mlp", splits.input_shape, splits.num_classes), splits, commentary=com,
                          steps=3, batch_size=16, eval_every=3, quiet=True)
    assert len(r["curve"]) == 1
    assert all(p.requires_grad for p in com.parameters()) and com.hparams()


def test_missing_dataset_and_file(tmp_path, capsys):
    assert cli.main(["learn", "mask", "--data-dir", str(tmp_path / "none"), "--steps", "1", "--quiet"]) == 3
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err
    assert cli.main(["inspect", str(tmp_path / "none.commentary")]) == 1
    assert "no commentary file" in capsys.readouterr().err


def test_python_dash_m():
    r = subprocess.run([sys.executable, "-m", "commentaries_ext", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "commentaries" in r.stdout


def test_an_unwritable_output_fails_before_the_work(tmp_path, capsys, monkeypatch):
    """An output or checkpoint path that cannot be written (here: under a regular file; a
    read-only folder alike) is a one-line error at the start, not a traceback after the whole
    learning run with nothing saved."""
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    ran = []
    monkeypatch.setattr(cli, "learn_commentary", lambda *a, **k: ran.append(1))
    rc = cli.main(["learn", "weighting", "--data", "digits", "--train-size", "100", "--val-size", "50",
                   "--outer-steps", "1", "--quiet", "--out", str(blocker / "w.commentary")])
    assert rc == 1 and ran == []
    err = capsys.readouterr().err
    assert "cannot write" in err and str(blocker / "w.commentary") in err and "Traceback" not in err
    from commentaries_ext.checkpoint import CheckpointError, make_checkpointer

    with pytest.raises(CheckpointError, match="cannot be written"):
        make_checkpointer(blocker / "c.ckpt", "train_student", {}, total=1)


SMALL = ["--data", "digits", "--train-size", "200", "--val-size", "100", "--test-size", "100", "--quiet"]


@pytest.mark.parametrize("argv,option", [
    (["train", "--train-steps", "0"], "--train-steps"),  # IndexError on an empty curve
    (["train", "--eval-every", "0"], "--eval-every"),  # ZeroDivisionError
    (["train", "--batch-size", "0"], "--batch-size"),  # trained on empty batches, exit 0
    (["train", "--threads", "-1"], "--threads"),  # RuntimeError from torch
    (["learn", "weighting", "--truncate", "0"], "--truncate"),  # "does not require grad" after learning
    (["learn", "blending", "--val-batch-size", "-3"], "--val-batch-size"),  # randperm[:-3]: 125 of 128
    (["learn", "blending", "--val-batch-size", "0"], "--val-batch-size"),  # turned into 128
    (["learn", "blending", "--damping", "-1"], "--damping"),
])
def test_out_of_range_options_are_refused_before_any_work(argv, option, capsys, monkeypatch):
    monkeypatch.setattr(cli, "learn_commentary", lambda *a, **k: pytest.fail("learning started"))
    monkeypatch.setattr(cli, "train_tracked", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(SystemExit) as e:
        cli.main(argv + SMALL)
    assert e.value.code == 2 and f"{option} must be >=" in capsys.readouterr().err


def test_out_naming_a_folder_is_refused_before_the_work(tmp_path, capsys, monkeypatch):
    # it learned, then failed to replace the folder by the file: "[Errno 21] Is a directory"
    monkeypatch.setattr(cli, "learn_commentary", lambda *a, **k: pytest.fail("learning started"))
    assert cli.main(["learn", "blending", "--steps", "1", "--out", str(tmp_path), *SMALL]) == 1
    err = capsys.readouterr().err
    assert "it is a directory" in err and "Traceback" not in err


def test_cg_runs_on_the_gauss_newton_curvature_by_default(tmp_path):
    # on the network's indefinite Hessian CG met negative curvature at its first direction in 9 of
    # 10 hyper-steps and returned p = 0; --curvature / --damping were not offered
    import warnings

    from commentaries_ext.engine import HypergradientDivergenceWarning

    out = tmp_path / "b.commentary"
    with warnings.catch_warnings():
        warnings.simplefilter("error", HypergradientDivergenceWarning)
        assert cli.main(["learn", "blending", "--steps", "3", "--solver", "cg", "--arch", "mlp", "--out", str(out),
                         *SMALL]) == 0
    assert json.loads(out.with_suffix(".json").read_text())["learned_with"]["solver"].startswith("CGConfig")


def test_inspect_plots_only_on_the_data_it_was_told(tmp_path, capsys):
    """A file saved from Python records no dataset: inspect once assumed digits (a mask plotted on
    8x8 digits, a Fashion-MNIST teacher failing inside its network). Now it needs --data, and the
    file must fit that data."""
    from commentaries_ext.commentary import AttentionMask, Blending, ExampleWeighting
    from commentaries_ext.data import load_dataset
    from commentaries_ext.files import save_commentary

    digits = load_dataset("digits", seed=0)
    fm_like = (torch.rand(20, 1, 28, 28), torch.randint(0, 10, (20,)))
    teacher = tmp_path / "teacher.commentary"
    save_commentary(teacher, ExampleWeighting.reference((1, 28, 28), num_classes=10), data=fm_like)
    assert cli.main(["inspect", str(teacher)]) == 0
    captured = capsys.readouterr()
    assert "records no dataset; pass --data" in captured.err and not teacher.with_suffix(".inspect.png").exists()
    assert cli.main(["inspect", str(teacher), "--data", "digits"]) == 1  # 28x28 teacher, 8x8 digits
    assert "does not fit the dataset digits" in capsys.readouterr().err
    mask = tmp_path / "mask.commentary"
    save_commentary(mask, AttentionMask(1, num_classes=10), data=digits.train)
    assert cli.main(["inspect", str(mask), "--data", "digits"]) == 0
    assert mask.with_suffix(".inspect.png").exists()
    blend = tmp_path / "blend.commentary"  # its matrix needs no data
    save_commentary(blend, Blending(10), data=digits.train)
    assert cli.main(["inspect", str(blend)]) == 0 and blend.with_suffix(".inspect.png").exists()
