"""The commands as a user runs them: ``python -m mdistiller_blockkd``, short config names,
registries extended from outside, and the refusal to overwrite a finished run."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mdistiller_blockkd import cli
from mdistiller_blockkd.config import config_dir, list_configs, load_cfg, resolve_config
from mdistiller_blockkd.errors import ConfigError, run_cli
from mdistiller_blockkd.registry import DISTILLERS, MODELS

REPO = Path(__file__).resolve().parents[1]
TINY = ["DATASET.SYNTHETIC.TRAIN_SIZE", "32", "DATASET.SYNTHETIC.TEST_SIZE", "16", "SOLVER.BATCH_SIZE", "16",
        "DATASET.TEST.BATCH_SIZE", "16", "SOLVER.EPOCHS", "1", "LOG.PROGRESS", "False"]


def run(args, cwd, extra_path=()):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), *map(str, extra_path)]))
    return subprocess.run([sys.executable, "-m", "mdistiller_blockkd", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_short_config_names_resolve_to_the_shipped_files():
    assert config_dir() is not None
    names = list_configs()
    assert "cifar100/blockkd/res56_res20" in names and "demo/teacher" in names and len(names) >= 80
    path = resolve_config("cifar100/blockkd/res56_res20")
    assert os.path.samefile(path, resolve_config("configs/cifar100/blockkd/res56_res20.yaml"))
    assert load_cfg("cifar100/blockkd/res56_res20").DISTILLER.TYPE == "BLOCKKD"
    with pytest.raises(ConfigError, match="'cifar100/blockkd/nope' not found; shipped configs there: .*res56_res20"):
        load_cfg("cifar100/blockkd/nope")
    with pytest.raises(ConfigError, match="python -m mdistiller_blockkd configs"):
        load_cfg("no_such_folder/x")


def test_dispatcher_lists_commands_and_rejects_unknown(capsys):
    assert cli.main(["--help"]) == 0 and "train" in capsys.readouterr().out
    assert cli.main(["nope"]) == 2 and "unknown command 'nope'" in capsys.readouterr().err
    assert cli.main(["configs"]) == 0 and "cifar100/kd/res56_res20" in capsys.readouterr().out
    for name in cli.COMMANDS:
        mod = cli.command_module(name)
        assert callable(mod.main) and callable(mod.cli)


def test_train_by_short_name_then_a_rerun_is_refused(tmp_path):
    args = ["train", "--cfg", "synthetic/vanilla_resnet8", "LOG.PREFIX", str(tmp_path), *TINY]
    proc = run(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    folder = tmp_path / "synthetic" / "vanilla_resnet8"
    assert (folder / "latest").is_file()
    stamp = (folder / "latest").stat().st_mtime_ns
    again = run(args, cwd=tmp_path)
    lines = again.stderr.strip().splitlines()
    assert again.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: ")
    assert "--resume" in lines[0] and "EXPERIMENT.NAME" in lines[0] and "--overwrite" in lines[0]
    assert (folder / "latest").stat().st_mtime_ns == stamp
    both = run(args + ["--resume", "--overwrite"], cwd=tmp_path)
    assert both.returncode != 0 and both.stderr.strip().startswith("error: --resume continues")
    assert run(args + ["--overwrite"], cwd=tmp_path).returncode == 0


def test_an_outside_package_registers_a_model_and_a_distiller(tmp_path):
    """Decorators in another package extend both registries; --import loads it (no edit of this package)."""
    plugin = tmp_path / "site" / "my_kd_plugin.py"
    plugin.parent.mkdir()
    plugin.write_text(textwrap.dedent('''
        import torch.nn.functional as F
        from mdistiller_blockkd.distillers import Distiller
        from mdistiller_blockkd.models import build_model
        from mdistiller_blockkd.registry import register_distiller, register_model

        @register_model("tiny_outside", teacher_ckpt=False)
        def tiny_outside(num_classes=100, **kw):
            return build_model("resnet8", num_classes=num_classes)

        @register_distiller("MYCE")
        class MyCE(Distiller):
            def forward_train(self, image, target, **kwargs):
                logits, _ = self.student(image)
                soft = self.teacher_forward(image)[0].softmax(dim=1)
                return logits, {"loss_my": F.cross_entropy(logits, target) + F.cross_entropy(logits, soft)}
        '''))
    import torch

    from mdistiller_blockkd.models import build_model

    teacher = tmp_path / "teacher.pth"
    torch.save({"model": build_model("resnet8", num_classes=10).state_dict()}, teacher)
    args = ["train", "--import", "my_kd_plugin", "--cfg", "synthetic/vanilla_resnet8", "LOG.PREFIX", str(tmp_path),
            "DISTILLER.TYPE", "MYCE", "DISTILLER.STUDENT", "tiny_outside", "DISTILLER.TEACHER", "tiny_outside",
            "DISTILLER.TEACHER_CKPT", str(teacher), *TINY]
    proc = run(args, cwd=tmp_path, extra_path=[plugin.parent])
    assert proc.returncode == 0, proc.stderr
    assert "loss_my" in (tmp_path / "synthetic" / "vanilla_resnet8" / "metrics.jsonl").read_text()
    missing = run(["train", "--import", "no_such_plugin_xyz", "--cfg", "synthetic/vanilla_resnet8"], cwd=tmp_path)
    assert missing.returncode != 0 and missing.stderr.startswith("error: cannot import 'no_such_plugin_xyz'")
    assert "tiny_outside" not in MODELS and "MYCE" not in DISTILLERS  # this process was not touched


def test_registry_refuses_a_silent_replacement():
    from mdistiller_blockkd.registry import Registry

    reg = Registry("thing")
    reg.register("a")(len)
    reg.register("a")(len)  # the same object again (a module imported twice): fine
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a")(sum)
    reg.register("a", override=True)(sum)
    assert reg.lookup("a") is sum
    with pytest.raises(ConfigError, match="unknown thing 'b'; known things: a"):
        reg.lookup("b")


def test_study_expands_patterns_of_short_names(tmp_path, monkeypatch):
    from mdistiller_blockkd.cluster.local import expand_configs

    monkeypatch.chdir(tmp_path)  # no configs/ here: the pattern is matched against the shipped configs
    got = expand_configs(["fmnist/study/teachers/*", "configs/synthetic/*.yaml"])
    assert [os.path.basename(p) for p in got[-1:]] == ["vanilla_resnet8.yaml"] and len(got) >= 3
    assert all(os.path.isfile(p) for p in got)
    with pytest.raises(ConfigError, match="'nope/\\*' matches no config"):
        expand_configs(["nope/*"])


def test_entry_point_plugins_are_loaded_without_any_flag(tmp_path):
    """A package that declares the entry point group mdistiller_blockkd.plugins is imported on first need."""
    site = tmp_path / "site"
    (site / "ep_plugin_demo-0.1.dist-info").mkdir(parents=True)
    (site / "ep_plugin_demo-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-plugin-demo\nVersion: 0.1\n")
    (site / "ep_plugin_demo-0.1.dist-info" / "entry_points.txt").write_text(
        "[mdistiller_blockkd.plugins]\ndemo = ep_plugin_demo\n")
    (site / "ep_plugin_demo.py").write_text(textwrap.dedent('''
        from mdistiller_blockkd.models import build_model
        from mdistiller_blockkd.registry import register_model

        @register_model("ep_resnet8", teacher_ckpt=False)
        def ep_resnet8(num_classes=100, **kw):
            return build_model("resnet8", num_classes=num_classes)
        '''))
    code = ("from mdistiller_blockkd.models import build_model, list_models\n"
            "m = build_model('ep_resnet8', num_classes=7)\n"
            "print('ep_resnet8' in list_models(), m.fc.out_features)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(site)]))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "7"]


def test_import_modules_names_a_missing_module(tmp_path, monkeypatch):
    from mdistiller_blockkd.registry import import_modules

    (tmp_path / "imp_demo_mod.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import_modules(["imp_demo_mod"])
    assert sys.modules["imp_demo_mod"].X == 1
    with pytest.raises(ConfigError, match="cannot import 'nope_nope_mod'"):
        import_modules(["nope_nope_mod"])


def test_stone_grads_measures_the_first_blocks_gradient(tmp_path):
    """Unbiased single-stone gradients average to all's exactly without the cross term; bad input is one error."""
    from mdistiller_blockkd.cli import stone_grads
    from mdistiller_blockkd.config import load_cfg
    from mdistiller_blockkd.distillers.blockkd_grads import first_block_parameters, stone_gradients
    from mdistiller_blockkd.distillers import distiller_dict
    from mdistiller_blockkd.models import build_model

    torch.manual_seed(0)
    cfg = load_cfg(None, ["DISTILLER.TYPE", "BLOCKKD", "BLOCKKD.GAMMA", 0.0, "BLOCKKD.WARMUP", 0])
    d = distiller_dict["BLOCKKD"](build_model("resnet8", num_classes=5), build_model("resnet14", num_classes=5), cfg)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 5, (4,), generator=g)) for _ in range(2)]
    params = first_block_parameters(d, batches[0][0])
    names = {n for n, p in d.student.named_parameters() if any(p is q for q in params)}
    assert "conv1.weight" in names and any(n.startswith("layer1.") for n in names)
    assert not any(n.startswith(("layer2.", "layer3.", "fc.")) for n in names)
    out = stone_gradients(d, batches, params)
    assert out["num_stones"] == 3 and out["batches"] == 2
    assert out["unbiased_mean_error"] < 1e-4
    assert out["relative_error_vs_all"]["sample1_unbiased"] > 0.01
    assert set(out["stone_gradient_norm_unbiased"]) == {"stone1", "stone2", "stone3"}
    with pytest.raises(ConfigError, match="stone-grads measures a BLOCKKD config"):
        stone_grads.main(["--cfg", "synthetic/vanilla_resnet8"])


def test_stone_grads_refuses_a_training_state_of_another_distiller(tmp_path, capsys):
    """A --ckpt whose weights do not fit (a weight of another shape, a missing one) is one error line."""
    from mdistiller_blockkd.cli import stone_grads
    from mdistiller_blockkd.config import load_cfg
    from mdistiller_blockkd.distillers import distiller_dict
    from mdistiller_blockkd.models import build_model
    from mdistiller_blockkd.utils.checkpoint import save_checkpoint

    d = distiller_dict["BLOCKKD"](build_model("resnet8", num_classes=10), build_model("resnet8", num_classes=10),
                                  load_cfg(None, ["DISTILLER.TYPE", "BLOCKKD"]))
    save_checkpoint({"model": d.teacher.state_dict()}, str(tmp_path / "teacher.pth"))
    weights = {k: v for k, v in d.state_dict().items() if not k.startswith("teacher.")}
    argv = ["--cfg", "synthetic/vanilla_resnet8", "--batches", "1", "--ckpt", str(tmp_path / "state"),
            "DISTILLER.TYPE", "BLOCKKD", "DISTILLER.TEACHER", "resnet8", "DISTILLER.TEACHER_CKPT", str(tmp_path / "teacher.pth")]
    for change, words in (({"student.fc.weight": torch.zeros(3, 3)}, "size mismatch"),
                          ({"student.fc.weight": None}, "1 missing, 0 unexpected keys, e.g. student.fc.weight")):
        bad = {k: v for k, v in {**weights, **change}.items() if v is not None}
        save_checkpoint({"model": bad}, str(tmp_path / "state"))
        with pytest.raises(SystemExit) as ended:
            run_cli(stone_grads.main, argv)
        assert ended.value.code != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: '{tmp_path / 'state'}' does not fit this config's distiller")
        assert words in err[0] and "another DISTILLER.TYPE / STUDENT / TEACHER" in err[0]
