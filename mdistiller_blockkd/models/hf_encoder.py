"""Hugging Face BERT-family encoders as staged models (``build_model("hf:<folder>")``).

``hf:<folder>`` loads a local Hugging Face model folder (``config.json`` plus
``model.safetensors`` or ``pytorch_model.bin``; nothing is downloaded) with
``AutoModel.from_pretrained(folder, local_files_only=True)``, for any encoder shaped
``embeddings -> encoder.layer[...] -> pooler`` (BERT, MiniLM, ...):

* **stem** -- the embeddings (token + position + segment);
* **blocks** -- consecutive groups of encoder layers: one block per layer by default,
  ``blocks=N`` groups them into N blocks of equal size (N must divide the layer count);
* **head** -- the pooler (dense + tanh on the first token), dropout (the config's
  ``classifier_dropout``, else ``hidden_dropout_prob``, as BERT's classifier) and a new
  ``Linear(hidden, num_classes)`` classifier.

The state between blocks is :class:`~.tokens.TokenStates` ``(hidden, mask)``: the
attention mask travels with the hidden states into every layer, and each block builds
its model's own 4-D attention mask from it. The input is the packed ``(B, 3, L)`` text
batch of :mod:`mdistiller_blockkd.utils.text_batch`. ``feature_info``: ``num_chs`` =
hidden size, ``reduction`` = 1, ``kind`` = ``"tokens"``.

Options (``hf:<folder>,key=value,...``, see :mod:`.spec`)
    ``blocks=N``  N blocks of ``layers / N`` encoder layers (default: one per layer).
    ``layers=K``  keep K encoder layers of the folder's model, chosen by ``pick``:
                  ``first`` (default: layers 1..K) or ``every_other`` (layers 1, 3, 5, ...,
                  DistilBERT's initialisation); a student built from the teacher's own
                  folder this way starts from the teacher's embeddings, layers and pooler.
    ``init=random``  random weights from ``config.json`` alone (the folder needs no
                  weights file; ``layers=K`` then sets the layer count). Without it a
                  folder that has no weights file is an error naming the missing file.

State-dict keys are those of ``AutoModelForSequenceClassification`` for BERT
(``bert.embeddings...``, ``bert.encoder.layer.<i>...``, ``bert.pooler...``,
``classifier.weight``): the base model sits under its ``base_model_prefix``.

At construction one small eval-mode forward checks that stem, blocks and pooler
reproduce the base model's own outputs; an encoder whose forward does more (ELECTRA's
embedding projection, relative-position models...) is refused with a :class:`ConfigError`.

Tokenizer and vocabulary: :func:`load_tokenizer` reads a folder's tokenizer (local files
only; the text data use the teacher's); :func:`check_student_vocabulary` refuses a
student whose vocabulary differs from the teacher's; :func:`check_max_length` refuses a
maximum length beyond a model's position embeddings.

Needs the ``[nlp]`` extra (``pip install 'mdistiller_blockkd[nlp]'``: transformers >= 5,
tokenizers, safetensors); without it ``hf:`` is one :class:`ConfigError` naming it.
"""

from __future__ import annotations

import contextlib
import os
from typing import List, Optional

import torch
from torch import Tensor, nn

from ..errors import CheckpointError, ConfigError
from ..utils.text_batch import unpack_text_batch
from .spec import split_model_spec
from .staged import StagedModel, outputs_close
from .tokens import TokenStates

__all__ = ["HFEncoderStagedModel", "build_hf_model", "hf_folder", "load_tokenizer", "check_student_vocabulary",
           "check_max_length", "NLP_EXTRA_HINT"]

#: How to install what ``hf:`` needs.
NLP_EXTRA_HINT = "pip install 'mdistiller_blockkd[nlp]'"
#: Weights files ``from_pretrained`` reads (single file or sharded index), in its order of preference.
WEIGHTS_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
#: Files that hold a tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model")
OPTIONS = ("blocks", "layers", "pick", "init")
PICKS = ("first", "every_other")


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise ConfigError(f"hf: models need Hugging Face transformers, tokenizers and safetensors ({e}); install the "
                          f"[nlp] extra: {NLP_EXTRA_HINT}") from None
    major = int(str(transformers.__version__).split(".")[0])
    if major < 5:
        raise ConfigError(f"hf: models need transformers >= 5, found {transformers.__version__}; install the [nlp] "
                          f"extra: {NLP_EXTRA_HINT}")
    return transformers


@contextlib.contextmanager
def _no_progress_bars(tf):
    """transformers' loading progress bars off (restored after): they would fill the run's log."""
    log = tf.utils.logging
    was = log.is_progress_bar_enabled()
    log.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            log.enable_progress_bar()


def hf_folder(name: str) -> str:
    """The folder of model name ``hf:<folder>[,options]`` (``~`` expanded)."""
    base, _ = split_model_spec(name)
    if not base.startswith("hf:") or not base[3:]:
        raise ConfigError(f"'{name}' is not an hf: model name; write hf:<folder of a Hugging Face model>")
    return os.path.expanduser(base[3:])


def _check_folder(folder: str) -> None:
    if not os.path.isdir(folder):
        raise ConfigError(f"hf: model folder '{folder}' not found; give the local folder of a Hugging Face model "
                          "(config.json plus model.safetensors or pytorch_model.bin), e.g. a BERT-base or the "
                          "unzipped all-MiniLM-L6-v2 (docs/nlp.md)")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise ConfigError(f"hf: model folder '{folder}' has no config.json; give the folder that save_pretrained "
                          "wrote (config.json plus model.safetensors or pytorch_model.bin)")


def _load_config(folder: str):
    _check_folder(folder)
    tf = _transformers()
    try:
        return tf.AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"hf: could not read '{os.path.join(folder, 'config.json')}': {e}") from None


def _weights_file(folder: str) -> Optional[str]:
    for name in WEIGHTS_FILES:
        if os.path.isfile(os.path.join(folder, name)):
            return name
    return None


def _int_option(name: str, key: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"model '{name}': {key}={value!r}; use an integer >= {minimum}")
    return value


class HFEncoderStagedModel(StagedModel):
    """A BERT-family encoder plus a classifier, seen as ``stem -> blocks -> head`` (see the module docstring).

    Args:
        encoder: the base model (``AutoModel``: ``embeddings``, ``encoder.layer``, ``pooler``).
        num_classes: outputs of the new classifier.
        blocks: number of blocks (0: one per encoder layer); must divide the layer count.
        name: the model name, for messages (``hf_name``).
    """

    def __init__(self, encoder: nn.Module, num_classes: int, blocks: int = 0, name: str = ""):
        super().__init__()
        label = name or type(encoder).__name__
        layers = getattr(getattr(encoder, "encoder", None), "layer", None)
        missing = [a for a in ("embeddings", "pooler") if getattr(encoder, a, None) is None]
        if not isinstance(layers, nn.ModuleList) or missing:
            what = ", ".join(missing + ([] if isinstance(layers, nn.ModuleList) else ["encoder.layer"]))
            raise ConfigError(f"hf model '{label}' ({type(encoder).__name__}) has no {what}; only BERT-family "
                              "encoders (embeddings -> encoder.layer -> pooler) can be staged")
        n = len(layers)
        blocks = blocks or n
        if n % blocks:
            raise ConfigError(f"model '{label}': blocks={blocks} does not divide its {n} encoder layers; use a "
                              f"divisor of {n}")
        cfg = encoder.config
        self.prefix = str(getattr(encoder, "base_model_prefix", "") or "encoder")
        self.add_module(self.prefix, encoder)
        p = getattr(cfg, "classifier_dropout", None)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob if p is None else p)
        self.classifier = nn.Linear(cfg.hidden_size, num_classes)
        nn.init.normal_(self.classifier.weight, std=float(getattr(cfg, "initializer_range", 0.02)))
        nn.init.zeros_(self.classifier.bias)
        self.hf_name = name
        self.num_classes = num_classes
        self.num_blocks = blocks
        per = n // blocks
        self._groups: List[range] = [range(k * per, (k + 1) * per) for k in range(blocks)]
        hidden = int(cfg.hidden_size)
        self.feature_info = [dict(num_chs=hidden, reduction=1, module=f"{self.prefix}.embeddings", kind="tokens")] + [
            dict(num_chs=hidden, reduction=1, module=f"{self.prefix}.encoder.layer.{g[-1]}", kind="tokens")
            for g in self._groups]
        self._probe(label)

    @property
    def encoder_model(self) -> nn.Module:
        """The Hugging Face base model (embeddings, encoder, pooler)."""
        return getattr(self, self.prefix)

    @property
    def config(self):
        return self.encoder_model.config

    @torch.no_grad()
    def _probe(self, label: str) -> None:
        """Check stem, blocks and pooler against the base model's own forward (eval mode, one padded row)."""
        enc = self.encoder_model
        modes = {m: m.training for m in self.modules()}
        self.eval()
        try:
            cfg = enc.config
            gen = torch.Generator().manual_seed(0)
            ids = torch.randint(0, int(cfg.vocab_size), (2, 6), generator=gen)
            mask = torch.ones_like(ids)
            mask[1, 4:] = 0
            types = torch.zeros_like(ids)
            if int(getattr(cfg, "type_vocab_size", 1)) > 1:
                types[:, 3:] = 1
            param = next(enc.parameters())
            ids, mask, types = (t.to(param.device) for t in (ids, mask, types))
            ref = enc(input_ids=ids, attention_mask=mask, token_type_ids=types)
            h = self.forward_stem(torch.stack([ids, mask, types], 1))[0]
            for i in range(self.num_blocks):
                h = self.forward_block(i, h)[0]
            ok = outputs_close(h.hidden, ref.last_hidden_state) and outputs_close(
                enc.pooler(h.hidden), ref.pooler_output)
        except Exception as e:
            raise ConfigError(f"hf model '{label}' failed a probe forward ({type(e).__name__}: {e}); it cannot be "
                              "staged") from None
        finally:
            for m, mode in modes.items():
                m.training = mode
        if not ok:
            raise ConfigError(f"hf model '{label}' ({type(enc).__name__}): embeddings, encoder layers and pooler run "
                              "in order do not reproduce its forward; only BERT-family encoders can be staged")

    # -- StagedModel protocol ------------------------------------------------------------
    def forward_stem(self, x):
        ids, mask, types = unpack_text_batch(x)
        h = self.encoder_model.embeddings(input_ids=ids, token_type_ids=types)
        state = TokenStates(h, mask)
        return state, state

    def forward_block(self, i: int, h: TokenStates):
        self.check_block_index(i)
        if not isinstance(h, TokenStates):
            raise TypeError(f"block {i} of a text encoder takes TokenStates (hidden, mask), got {type(h).__name__}")
        from transformers.masking_utils import create_bidirectional_mask

        enc = self.encoder_model
        attn = create_bidirectional_mask(config=enc.config, inputs_embeds=h.hidden, attention_mask=h.mask)
        hidden = h.hidden
        for k in self._groups[i]:
            hidden = enc.encoder.layer[k](hidden, attention_mask=attn)
        state = h.with_hidden(hidden)
        return state, state

    def forward_head(self, h: TokenStates, pre_logits: bool = False) -> Tensor:
        """The pooler (first token, dense, tanh), dropout, then the classifier (skipped when ``pre_logits``)."""
        pooled = self.dropout(self.encoder_model.pooler(h.hidden))
        return pooled if pre_logits else self.classifier(pooled)

    def get_classifier(self) -> nn.Module:
        return self.classifier


def _select_layers(base: nn.Module, name: str, layers: int, pick: str) -> None:
    n = len(base.encoder.layer)
    idx = list(range(layers)) if pick == "first" else list(range(0, 2 * layers - 1, 2))
    if idx[-1] >= n:
        need = layers if pick == "first" else 2 * layers - 1
        raise ConfigError(f"model '{name}': layers={layers} with pick={pick} needs {need} encoder layers, the folder's "
                          f"model has {n}")
    base.encoder.layer = nn.ModuleList(base.encoder.layer[i] for i in idx)
    base.config.num_hidden_layers = layers


def build_hf_model(name: str, num_classes: int, pretrained=False, **kwargs) -> HFEncoderStagedModel:
    """Build ``hf:<folder>[,options]`` (see the module docstring) with ``num_classes`` outputs.

    ``kwargs`` may give the same options as the name (``blocks``, ``layers``, ``pick``,
    ``init``). ``pretrained`` must be false: the folder's own weights are loaded unless
    ``init=random`` (a fine-tuned checkpoint loads with ``DISTILLER.TEACHER_CKPT``).
    Raises :class:`ConfigError` for a bad folder, option or architecture and
    :class:`CheckpointError` when the weights are missing or do not load.
    """
    folder = hf_folder(name)
    _, options = split_model_spec(name)
    for key, value in kwargs.items():
        if key in options:
            raise ConfigError(f"model '{name}': option '{key}' is given both in the name and as an argument")
        options[key] = value
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ConfigError(f"model '{name}': unknown option(s) {', '.join(unknown)}; hf: models take "
                          f"{', '.join(OPTIONS)} (docs/nlp.md)")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
    if pretrained:
        raise ConfigError(f"model '{name}' loads the weights of its folder; DISTILLER.TEACHER_PRETRAINED applies to "
                          "timm models only (a fine-tuned checkpoint loads with DISTILLER.TEACHER_CKPT)")
    blocks = _int_option(name, "blocks", options.get("blocks", 0), 0)
    layers = _int_option(name, "layers", options["layers"], 1) if "layers" in options else 0
    pick = str(options.get("pick", "first"))
    init = str(options.get("init", "pretrained"))
    if pick not in PICKS:
        raise ConfigError(f"model '{name}': pick={pick}; use one of {', '.join(PICKS)}")
    if init not in ("pretrained", "random"):
        raise ConfigError(f"model '{name}': init={init}; use init=random (random weights from config.json) or leave "
                          "it out (the folder's weights)")
    if "pick" in options and not layers:
        raise ConfigError(f"model '{name}': pick={pick} chooses among the folder's layers; give layers=K with it")
    config = _load_config(folder)
    tf = _transformers()
    if init == "random":
        if "pick" in options:
            raise ConfigError(f"model '{name}': pick={pick} copies pretrained layers, init=random has none; drop one")
        if layers:
            config.num_hidden_layers = layers
        base = tf.AutoModel.from_config(config)
    else:
        if _weights_file(folder) is None:
            raise CheckpointError(
                f"hf: model folder '{folder}' has config.json but no weights file ({' or '.join(WEIGHTS_FILES[::2])}); "
                f"copy the weights there, or ask for random weights explicitly with 'hf:{folder},init=random'")
        try:
            with _no_progress_bars(tf):
                base = tf.AutoModel.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
        except (OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"hf: could not load the weights in '{folder}': {type(e).__name__}: {e}") from None
        if layers:
            _select_layers(base, name, layers, pick)
    return HFEncoderStagedModel(base, num_classes, blocks=blocks, name=name)


# -- tokenizer and vocabulary -------------------------------------------------------------
def _has_tokenizer(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES)


def load_tokenizer(name: str):
    """The tokenizer of ``hf:<folder>`` (or of a plain folder), read with local files only."""
    folder = hf_folder(name) if str(name).startswith("hf:") else os.path.expanduser(str(name))
    _check_folder(folder)
    if not _has_tokenizer(folder):
        raise ConfigError(f"no tokenizer in '{folder}' (none of {', '.join(TOKENIZER_FILES)}); the text data are "
                          "tokenised with the teacher's tokenizer: give a teacher folder that has one")
    tf = _transformers()
    try:
        return tf.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"could not load the tokenizer in '{folder}': {type(e).__name__}: {e}") from None


def check_student_vocabulary(student: str, teacher: str) -> None:
    """Refuse (:class:`ConfigError`) an ``hf:`` student whose vocabulary differs from the ``hf:`` teacher's.

    The text is tokenised once, with the teacher's tokenizer, and the stepping stones feed
    the student's token states to the teacher: the two must number tokens alike. Compared:
    the vocabulary sizes and pad ids of the configs, and, when the student's folder has a
    tokenizer of its own, the two vocabularies token by token.
    """
    s_folder, t_folder = hf_folder(student), hf_folder(teacher)
    s_cfg, t_cfg = _load_config(s_folder), _load_config(t_folder)
    for key in ("vocab_size", "pad_token_id"):
        a, b = getattr(s_cfg, key, None), getattr(t_cfg, key, None)
        if a != b:
            raise ConfigError(f"the student '{student}' has {key} {a} but the teacher '{teacher}' has {b}; the student "
                              "must use the teacher's vocabulary (the data are tokenised with the teacher's tokenizer)")
    if _has_tokenizer(s_folder) and os.path.realpath(s_folder) != os.path.realpath(t_folder):
        s_vocab, t_vocab = load_tokenizer(s_folder).get_vocab(), load_tokenizer(t_folder).get_vocab()
        if s_vocab != t_vocab:
            differ = len(set(s_vocab.items()) ^ set(t_vocab.items()))
            raise ConfigError(f"the student folder '{s_folder}' has a tokenizer whose vocabulary differs from the "
                              f"teacher's in '{t_folder}' ({differ} token entries differ); the student must use the "
                              "teacher's vocabulary")


def check_max_length(name: str, max_length: int, option: str = "DATASET.TEXT.MAX_LENGTH") -> None:
    """Refuse a maximum text length beyond the position embeddings of model ``hf:<folder>`` (the error names
    ``option``, the setting that gave the length)."""
    limit = int(getattr(_load_config(hf_folder(name)), "max_position_embeddings", max_length))
    if max_length > limit:
        raise ConfigError(f"{option} is {max_length} but '{name}' has position embeddings for {limit} "
                          f"tokens; use at most {limit}")
