"""Transformers as staged models: hf: BERT-family encoders and timm ViTs, and Block-KD on their pairs."""

import os
import sys

import pytest
import torch

from mdistiller_blockkd.config import load_cfg
from mdistiller_blockkd.distillers.blockkd import (BlockKD, Connector, TokenConnector, build_connector,
                                                   pair_by_depth)
from mdistiller_blockkd.errors import CheckpointError, ConfigError, run_cli
from mdistiller_blockkd.models import build_model
from mdistiller_blockkd.models.fold import fold_frozen_bn
from mdistiller_blockkd.models.hf_encoder import (HFEncoderStagedModel, check_max_length, check_student_vocabulary,
                                                  load_tokenizer)
from mdistiller_blockkd.models.staged import StageInfo
from mdistiller_blockkd.models.timm_vit import TimmViTStagedModel
from mdistiller_blockkd.models.tokens import TokenStates
from mdistiller_blockkd.utils.text_batch import pack_text_batch

from test_dataparallel import check_devices, two_devices  # noqa: F401 - the fixture

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = "the a dog cat runs sat on mat good bad movie film is was very not".split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def save_bert(folder, layers, hidden, words=WORDS, weights=True, seed=0):
    """A tiny random BERT saved with save_pretrained, with a WordPiece tokenizer of ``words``."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.txt"), "w") as f:
        f.write("\n".join(SPECIAL + list(words)) + "\n")
    transformers.BertTokenizer.from_pretrained(folder).save_pretrained(folder)
    cfg = transformers.BertConfig(vocab_size=len(SPECIAL) + len(words), hidden_size=hidden, num_hidden_layers=layers,
                                  num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=64)
    transformers.utils.logging.disable_progress_bar()
    if weights:
        torch.manual_seed(seed)
        transformers.BertModel(cfg).save_pretrained(folder)
    else:
        cfg.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {
        "teacher": save_bert(root / "teacher", 4, 32),
        "student": save_bert(root / "student", 2, 24, seed=1),
        "config_only": save_bert(root / "config_only", 2, 24, weights=False),
        "other_vocab": save_bert(root / "other_vocab", 2, 24, words=WORDS[::-1]),
    }


def batch(folder, pairs=True):
    tok = load_tokenizer(f"hf:{folder}")
    first = ["the dog sat on the mat", "good movie", "a cat", "bad"]
    second = ["a cat", "very bad film", "the", "not good"] if pairs else None
    enc = tok(first, second, padding=True, return_tensors="pt")
    return pack_text_batch(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])


def test_hf_encoder_is_bert_for_sequence_classification(folders):
    m = build_model(f"hf:{folders['teacher']}", num_classes=3).eval()
    assert isinstance(m, HFEncoderStagedModel) and m.num_blocks == 4
    assert m.feature_info[0] == dict(num_chs=32, reduction=1, module="bert.embeddings", kind="tokens")
    assert [d["module"] for d in m.feature_info[1:]] == [f"bert.encoder.layer.{i}" for i in range(4)]
    # the same keys and the same logits as transformers' own classifier
    ref = transformers.BertForSequenceClassification(transformers.BertConfig.from_pretrained(folders["teacher"],
                                                                                            num_labels=3)).eval()
    ref.load_state_dict(m.state_dict(), strict=True)
    x = batch(folders["teacher"])
    with torch.no_grad():
        logits, feats = m(x)
        want = ref(input_ids=x[:, 0], attention_mask=x[:, 1], token_type_ids=x[:, 2]).logits
        torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(m.staged_view()(x), want, rtol=1e-5, atol=1e-5)
    assert all(isinstance(f, TokenStates) and f.shape == (4, x.shape[2], 32) for f in feats["feats"])
    assert feats["pooled_feat"].shape == (4, 32)


def test_the_mask_travels_into_every_block(folders):
    m = build_model(f"hf:{folders['teacher']},blocks=2", num_classes=3).eval()
    assert m.num_blocks == 2 and [d["module"] for d in m.feature_info[1:]] == ["bert.encoder.layer.1",
                                                                              "bert.encoder.layer.3"]
    x = batch(folders["teacher"], pairs=False)
    assert (x[:, 1] == 0).any()
    other = x.clone()
    other[:, 0][x[:, 1] == 0] = 7  # different ids under the padding: invisible through the mask
    with torch.no_grad():
        torch.testing.assert_close(m(x)[0], m(other)[0])
        states = m.staged_view().block_outputs(x)
    assert all(torch.equal(s.mask, x[:, 1]) for s in states)
    unmasked = x.clone()
    unmasked[:, 1] = 1
    with torch.no_grad():
        assert not torch.allclose(m(unmasked)[0], m(x)[0])


def test_hf_options_and_their_errors(folders):
    t = folders["teacher"]
    teacher = build_model(f"hf:{t}", num_classes=3)
    first = build_model(f"hf:{t},layers=2", num_classes=3)
    alt = build_model(f"hf:{t},layers=2,pick=every_other,blocks=1", num_classes=3)
    assert first.num_blocks == 2 and alt.num_blocks == 1 and alt.config.num_hidden_layers == 2
    layer = lambda m, i: m.encoder_model.encoder.layer[i].intermediate.dense.weight  # noqa: E731
    assert torch.equal(layer(first, 1), layer(teacher, 1))
    assert torch.equal(layer(alt, 0), layer(teacher, 0)) and torch.equal(layer(alt, 1), layer(teacher, 2))
    assert torch.equal(alt.encoder_model.embeddings.word_embeddings.weight,
                       teacher.encoder_model.embeddings.word_embeddings.weight)
    random = build_model(f"hf:{folders['config_only']},init=random,layers=3", num_classes=3)
    assert random.num_blocks == 3
    bad = {
        f"hf:{folders['config_only']}": (CheckpointError, "no weights file.*init=random"),
        f"hf:{t},blocks=3": (ConfigError, "blocks=3 does not divide its 4"),
        f"hf:{t},layers=3,pick=every_other": (ConfigError, "needs 5 encoder layers"),
        f"hf:{t},pick=first": (ConfigError, "give layers=K"),
        f"hf:{t},depth=2": (ConfigError, "unknown option.*depth"),
        f"hf:{t},init=zeros": (ConfigError, "init=zeros"),
        f"hf:{t},layers": (ConfigError, "not key=value"),
        f"hf:{t}/nope": (ConfigError, "not found"),
        f"hf:{os.path.dirname(t)}": (ConfigError, "no config.json"),
    }
    for name, (err, match) in bad.items():
        with pytest.raises(err, match=match):
            build_model(name, num_classes=3)
    with pytest.raises(ConfigError, match="TEACHER_PRETRAINED applies to timm"):
        build_model(f"hf:{t}", num_classes=3, pretrained=True)


def test_without_transformers_hf_names_the_nlp_extra(folders, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import fails as when it is not installed
    with pytest.raises(SystemExit) as e:
        run_cli(lambda argv: build_model(f"hf:{folders['teacher']}", num_classes=3))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code != 0 and len(err) == 1
    assert "[nlp]" in err[0] and "pip install 'mdistiller_blockkd[nlp]'" in err[0]


def test_tokenizer_vocabulary_and_length_checks(folders, tmp_path):
    assert len(load_tokenizer(f"hf:{folders['teacher']}").get_vocab()) == len(SPECIAL) + len(WORDS)
    check_student_vocabulary(f"hf:{folders['student']},layers=1", f"hf:{folders['teacher']}")
    check_student_vocabulary(f"hf:{folders['config_only']}", f"hf:{folders['teacher']}")
    with pytest.raises(ConfigError, match="vocabulary differs"):
        check_student_vocabulary(f"hf:{folders['other_vocab']}", f"hf:{folders['teacher']}")
    small = save_bert(tmp_path / "small_vocab", 1, 24, words=WORDS[:5], weights=False)
    with pytest.raises(ConfigError, match="vocab_size 10 but the teacher .* has 21"):
        check_student_vocabulary(f"hf:{small}", f"hf:{folders['teacher']}")
    os.remove(os.path.join(small, "vocab.txt"))
    os.remove(os.path.join(small, "tokenizer.json"))
    with pytest.raises(ConfigError, match="no tokenizer"):
        load_tokenizer(f"hf:{small}")
    check_max_length(f"hf:{folders['teacher']}", 64)
    with pytest.raises(ConfigError, match="MAX_LENGTH is 128 .* 64 tokens"):
        check_max_length(f"hf:{folders['teacher']}", 128)


def test_token_states_concatenate_along_the_batch():
    a = TokenStates(torch.randn(2, 5, 4), torch.ones(2, 5, dtype=torch.long))
    b = TokenStates(torch.randn(3, 5, 4), torch.zeros(3, 5, dtype=torch.long))
    c = torch.cat([a, b])
    assert isinstance(c, TokenStates) and c.shape == (5, 5, 4) and c.mask.shape == (5, 5)
    assert torch.equal(c.mask[2:], b.mask) and not c.is_cuda and c.dtype == torch.float32
    with pytest.raises(TypeError, match="along the batch"):
        torch.cat([a, b], dim=1)
    with pytest.raises(TypeError):
        torch.stack([a, b])


def test_fold_skips_models_without_batchnorm(folders):
    m = build_model(f"hf:{folders['student']}", num_classes=3)
    assert fold_frozen_bn(m, torch.zeros(2, 3, 8)) is None  # a float "probe" would break the embeddings


def test_pairing_by_relative_depth():
    assert pair_by_depth(3, 6) == [(0, 1), (1, 3), (2, 5)]
    assert pair_by_depth(4, 4) == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert pair_by_depth(4, 6) == [(0, 1), (1, 2), (2, 4), (3, 5)]
    assert pair_by_depth(6, 4) == [(0, 0), (1, 0), (2, 1), (3, 2), (4, 2), (5, 3)]
    assert pair_by_depth(5, 2) == [(1, 0), (2, 0), (3, 1), (4, 1)]  # block 1 of 5 is nearer the teacher's stem


def test_connectors_follow_the_stage_kind():
    tok, tok_t = StageInfo(24, 1, kind="tokens"), StageInfo(32, 1, kind="tokens")
    assert isinstance(build_connector(tok, tok_t, "linear_ln"), TokenConnector)
    assert isinstance(build_connector(StageInfo(16, 4), StageInfo(32, 4), "conv1x1_bn"), Connector)
    c = build_connector(tok, tok_t, "linear")
    s = c(TokenStates(torch.randn(2, 5, 24), torch.ones(2, 5, dtype=torch.long)))
    assert s.hidden.shape == (2, 5, 32) and isinstance(c.norm, torch.nn.Identity)
    with pytest.raises(ConfigError, match="transformers; use linear or linear_ln"):
        build_connector(tok, tok_t, "conv1x1_bn")
    with pytest.raises(ConfigError, match="but the student and teacher are CNNs"):
        build_connector(StageInfo(16, 4), StageInfo(32, 4), "linear")
    with pytest.raises(ConfigError, match="a CNN and a transformer"):
        build_connector(StageInfo(16, 4), tok_t, "linear")
    with pytest.raises(ConfigError, match="same token grid"):
        build_connector(StageInfo(24, 8, kind="tokens"), StageInfo(32, 16, kind="tokens"), "linear")


def blockkd_step(student, teacher, x, stones="all"):
    """One Block-KD training step; returns the distiller (gradients left in place)."""
    cfg = load_cfg(None, ["DISTILLER.TYPE", "BLOCKKD", "BLOCKKD.CONNECTOR", "linear_ln", "BLOCKKD.WARMUP", 0,
                          "BLOCKKD.STONES", stones])
    d = BlockKD(student, teacher, cfg).train()
    y = torch.arange(x.shape[0]) % 3
    _, losses = d.forward_train(x, y, epoch=1)
    sum(v.mean() for v in losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in d.connectors.parameters())  # stones train
    assert all(p.grad is None for p in teacher.parameters()) and not any(p.requires_grad for p in teacher.parameters())
    return d


def test_blockkd_trains_a_bert_pair(folders):
    torch.manual_seed(0)
    teacher = build_model(f"hf:{folders['teacher']}", num_classes=3)
    student = build_model(f"hf:{folders['student']}", num_classes=3)
    x = batch(folders["teacher"])
    d = blockkd_step(student, teacher, x)
    assert d.pairs == [(0, 1), (1, 3)]  # 2 student layers <-> 4 teacher layers by relative depth
    assert student.encoder_model.embeddings.word_embeddings.weight.grad.abs().sum() > 0  # reaches the stem
    d.eval()
    with torch.no_grad():
        apart = d.forward_stones(x)[1]
        d.batch_stones = "on"  # stones concatenated along the batch, masks with them
        together = d.forward_stones(x)[1]
    for a, b in zip(apart, together):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="BLOCKKD.CONNECTOR is 'conv1x1_bn'"):
        BlockKD(student, teacher, load_cfg(None, ["DISTILLER.TYPE", "BLOCKKD"]))


VIT = "timm:deit_tiny_patch16_224,img_size=32,patch_size=8"


@pytest.fixture(scope="module")
def vits():
    torch.manual_seed(0)
    return {"teacher": build_model(f"{VIT},depth=4,embed_dim=64,num_heads=2", num_classes=10),
            "student": build_model(f"{VIT},depth=2,embed_dim=32,num_heads=2", num_classes=10)}


def test_vit_is_staged_with_timm_keys(vits):
    import timm

    m = vits["teacher"].eval()
    assert isinstance(m, TimmViTStagedModel) and m.num_blocks == 4 and m.num_tokens == 17
    assert m.feature_info[0] == dict(num_chs=64, reduction=8, module="patch_embed", kind="tokens")
    plain = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=4, embed_dim=64, num_heads=2,
                              num_classes=10).eval()
    plain.load_state_dict(m.state_dict(), strict=True)
    assert list(plain.state_dict()) == list(m.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits, feats = m(x)
        torch.testing.assert_close(logits, plain(x), rtol=1e-5, atol=1e-5)
    assert [tuple(f.shape) for f in feats["feats"]] == [(2, 17, 64)] * 5
    grouped = build_model(f"{VIT},depth=4,embed_dim=64,num_heads=2,blocks=2", num_classes=10)
    assert grouped.num_blocks == 2 and [d["module"] for d in grouped.feature_info[1:]] == ["blocks.1", "blocks.3"]
    with pytest.raises(ConfigError, match="blocks=3 does not divide its depth 4"):
        build_model(f"{VIT},depth=4,blocks=3", num_classes=10)
    with pytest.raises(ConfigError, match="blocks=2 applies to ViTs only"):
        build_model("timm:resnet18,blocks=2", num_classes=10)


def test_vit_replica_runs_its_own_weights(vits, two_devices):  # noqa: F811 - the fixture
    """Under DataParallel with replica 1 on the meta device, replica 1 reaches only its own tensors
    (a ViT's root parameters -- class token, position embedding -- included)."""
    m = vits["student"].eval()
    dp = two_devices(m)
    with torch.no_grad():
        logits, _ = dp(torch.randn(4, 3, 32, 32))
    check_devices(dp)
    assert logits.shape == (2, 10)


def test_blockkd_trains_a_vit_pair(vits):
    student, teacher = vits["student"], vits["teacher"]
    d = blockkd_step(student, teacher, torch.randn(4, 3, 32, 32))
    assert d.pairs == [(0, 1), (1, 3)]
    assert student.patch_embed.proj.weight.grad.abs().sum() > 0 and student.cls_token.grad.abs().sum() > 0
    coarse = build_model(f"{VIT.replace('patch_size=8', 'patch_size=16')},depth=2,embed_dim=32,num_heads=2",
                         num_classes=10)
    with pytest.raises(ConfigError, match="same token grid"):
        BlockKD(coarse, teacher, load_cfg(None, ["DISTILLER.TYPE", "BLOCKKD", "BLOCKKD.CONNECTOR", "linear"]))
    with pytest.raises(ConfigError, match="got 5 tokens, it has 17"):
        teacher.forward_block(0, torch.randn(2, 5, 64))


def token_stone_grads(student, teacher, x, **keep):
    """Loss and gradients of one Block-KD step on a transformer pair, the stones keeping what ``keep`` says."""
    opts = ["DISTILLER.TYPE", "BLOCKKD", "BLOCKKD.CONNECTOR", "linear_ln", "BLOCKKD.WARMUP", 0]
    torch.manual_seed(0)
    d = BlockKD(student, teacher, load_cfg(None, opts + [x for kv in keep.items() for x in kv])).train()
    student.zero_grad(set_to_none=True)
    y = torch.arange(x.shape[0]) % 3
    loss = sum(d.forward_train(x, y, epoch=1)[1].values())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in d.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["vit", "bert"])
def test_token_stones_keeping_less_give_the_same_gradients(vits, folders, kind):
    """BLOCKKD.SAVE_MASKS (the inputs of the teacher's frozen linear layers kept as masks) and BLOCKKD.RECOMPUTE
    leave a transformer pair's loss and gradients as they are."""
    if kind == "vit":
        student, teacher, x = vits["student"], vits["teacher"], torch.randn(4, 3, 32, 32)
    else:
        torch.manual_seed(0)
        teacher = build_model(f"hf:{folders['teacher']}", num_classes=3)
        student = build_model(f"hf:{folders['student']}", num_classes=3)
        x = batch(folders["teacher"])
    want = token_stone_grads(student, teacher, x, **{"BLOCKKD.SAVE_MASKS": False})
    for keep in ({"BLOCKKD.SAVE_MASKS": True}, {"BLOCKKD.RECOMPUTE": True}):
        got = token_stone_grads(student, teacher, x, **keep)
        torch.testing.assert_close(got[0], want[0])
        assert set(got[1]) == set(want[1]) and any(n.startswith("connectors.") for n in want[1])
        for name in want[1]:
            torch.testing.assert_close(got[1][name], want[1][name], msg=name)


def test_cnn_transformer_pair_is_one_clear_error(vits):
    cnn = build_model("resnet8", num_classes=10)
    cfg = load_cfg(None, ["DISTILLER.TYPE", "BLOCKKD", "BLOCKKD.CONNECTOR", "linear"])
    with pytest.raises(ConfigError, match="cannot connect a CNN .* student .* to a transformer"):
        BlockKD(cnn, vits["teacher"], cfg)
    with pytest.raises(ConfigError, match="cannot connect a transformer .* student .* to a CNN"):
        BlockKD(vits["student"], cnn, cfg)


def test_reviewkd_refuses_transformers(vits, folders):
    from mdistiller_blockkd.distillers.reviewkd import ReviewKD

    cfg = load_cfg(None, ["DISTILLER.TYPE", "REVIEWKD"])
    with pytest.raises(ConfigError, match="REVIEWKD fuses CNN feature maps, but the student .* is a transformer"):
        ReviewKD(vits["student"], vits["teacher"], cfg, input_size=32)
    bert = build_model(f"hf:{folders['student']}", num_classes=3)
    with pytest.raises(ConfigError, match="the teacher HFEncoderStagedModel is a transformer.*KD, DKD, LSKD or BLOCKKD"):
        ReviewKD(build_model("resnet8", num_classes=3), bert, cfg, input_size=32)


@pytest.mark.parametrize("kind", ["NONE", "KD", "DKD", "LSKD"])
def test_logit_distillers_run_on_a_bert_pair(folders, kind):
    from mdistiller_blockkd.distillers import distiller_dict

    teacher = build_model(f"hf:{folders['teacher']}", num_classes=3)
    student = build_model(f"hf:{folders['student']}", num_classes=3)
    d = distiller_dict[kind](student, teacher, load_cfg(None, ["DISTILLER.TYPE", kind])).train()
    logits, losses = d.forward_train(batch(folders["teacher"]), torch.tensor([0, 1, 2, 1]), epoch=30)
    sum(v.mean() for v in losses.values()).backward()
    assert logits.shape == (4, 3) and student.classifier.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())


def test_a_deit_pair_trains_blockkd_through_the_train_command(tmp_path):
    """timm DeiTs at 32 px (synthetic images): Block-KD from the train command, stones scored, teacher frozen."""
    import json

    from mdistiller_blockkd.cli import train
    from mdistiller_blockkd.utils.checkpoint import load_checkpoint, save_checkpoint

    teacher = f"{VIT},depth=4,embed_dim=64,num_heads=2"
    torch.manual_seed(0)
    save_checkpoint({"model": build_model(teacher, num_classes=10).state_dict()}, tmp_path / "teacher")
    train.main(["--cfg", "synthetic/vanilla_resnet8", "--brief", "LOG.PREFIX", str(tmp_path), "LOG.PROGRESS", "False",
                "DATASET.SYNTHETIC.TRAIN_SIZE", "32", "DATASET.SYNTHETIC.TEST_SIZE", "16", "SOLVER.BATCH_SIZE", "8",
                "DISTILLER.TYPE", "BLOCKKD", "BLOCKKD.CONNECTOR", "linear", "BLOCKKD.WARMUP", "0",
                "DISTILLER.TEACHER", teacher, "DISTILLER.TEACHER_CKPT", str(tmp_path / "teacher"),
                "DISTILLER.STUDENT", f"{VIT},depth=2,embed_dim=32,num_heads=2", "SOLVER.TYPE", "AdamW",
                "SOLVER.LR", "1.0e-3", "SOLVER.SCHEDULER", "cosine", "SOLVER.WARMUP_EPOCHS", "0.5",
                "SOLVER.CLIP_GRAD_NORM", "1.0", "LOG.EVAL_HEADS_FREQ", "1"])
    folder = tmp_path / "synthetic" / "vanilla_resnet8"
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all({"acc_stone1", "acc_stone2", "acc_teacher", "loss_kd"} <= set(r) for r in rows)
    assert rows[0]["acc_teacher"] == rows[1]["acc_teacher"]  # frozen
    latest = load_checkpoint(folder / "latest")["model"]
    assert not any(k.startswith("teacher.") for k in latest) and any(k.startswith("connectors.") for k in latest)
