"""Offline builders for the fixture models: word-level tokenizer, configs and processors.

All objects are stock transformers classes; nothing is downloaded. The training scripts in
``evals/fixtures/`` build untrained models from these configs, train them and ``save_pretrained`` them into
``tokenprune/demo/checkpoints/<kind>/``.
"""

from __future__ import annotations

from typing import Any

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaNextConfig,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    ViTConfig,
    ViTImageProcessorPil,
)

from .generator import CELL_NAMES, COLOR_NAMES, MAX_SHAPES, SHAPE_NAMES

VISION_SIZE = 112  # vision-tower input (one tile), pixels
PATCH = 8  # -> 14 x 14 = 196 patch tokens per tile
GRID = VISION_SIZE // PATCH
N_PATCH = GRID * GRID
NEXT_PINPOINTS = [[112, 224], [224, 112], [224, 224]]  # a square 224 image -> base + 2x2 tiles
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
NUMBERS = [f"{i / 100:.2f}" for i in range(101)]  # box coordinates, one token each
COUNT_WORDS = [str(i) for i in range(MAX_SHAPES + 1)]
QUESTION_WORDS = ["user:", "assistant:", "what", "color", "is", "the", "shape", "object", "how", "many",
                  "are", "there", "shapes", "where", "a", "give", "bounding", "box", "of", "?", ".",
                  *[s + "s" for s in SHAPE_NAMES]]
ANSWER_WORDS = [*COLOR_NAMES, *SHAPE_NAMES, *CELL_NAMES, *COUNT_WORDS, "yes", "no", "[", "]", ",", *NUMBERS]
# An object name ("red circle") is one token, as multi-word entity names often are in real vocabularies. The
# fixture LM then finds "the red circle" by one key instead of a conjunction of two, which a small LM learns
# on a CPU budget (see the model card).
OBJECT_NAMES = [f"{c} {s}" for c in COLOR_NAMES for s in SHAPE_NAMES]


def object_token(name: str) -> str:
    """Vocabulary entry of an object name: ``"red circle"`` -> ``"red_circle"``."""
    return name.replace(" ", "_")


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer: lower-cases, keeps object names (``red circle``) as one token, splits on spaces,
    ``[ ] , ?`` and a final ``.``; adds ``<s>``."""
    vocab: dict[str, int] = {}
    for w in SPECIALS + QUESTION_WORDS + ANSWER_WORDS + [object_token(o) for o in OBJECT_NAMES]:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence(
        [normalizers.Lowercase(), *[normalizers.Replace(o, object_token(o)) for o in OBJECT_NAMES]])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Split(Regex(r"[\[\],?]|\.(?!\d)"), behavior="isolated"),
    ])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces, tidies " ," " ?"
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens=["<image>"], model_max_length=2048, padding_side="left")
    return fast


def text_config(tok: PreTrainedTokenizerFast, layers: int = 8, hidden: int = 128,
                ffn: int = 384, tie: bool = False, rope_theta: float = 10000.0) -> LlamaConfig:
    """Llama-style LM: RoPE, GQA (4 query heads / 2 KV heads), head tied to the input embeddings if ``tie``."""
    return LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, rope_theta=rope_theta,
        rms_norm_eps=1e-5, tie_word_embeddings=tie, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def vision_config(hidden: int = 96, layers: int = 3) -> CLIPVisionConfig:
    """CLIP ViT tower, 112 px, patch 8 -> 196 patch tokens + CLS."""
    return CLIPVisionConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                            num_attention_heads=4, image_size=VISION_SIZE, patch_size=PATCH,
                            projection_dim=hidden)


def llava_config(tok: PreTrainedTokenizerFast, **lm: Any) -> LlavaConfig:
    """LLaVA-1.5 layout: ``vision_feature_layer=-2``, ``default`` strategy (no CLS), GELU MLP projector."""
    cfg = LlavaConfig(vision_config=vision_config(), text_config=text_config(tok, **lm),
                      image_token_id=tok.convert_tokens_to_ids("<image>"), image_seq_length=N_PATCH,
                      vision_feature_layer=-2, vision_feature_select_strategy="default",
                      projector_hidden_act="gelu")
    cfg.pad_token_id = tok.pad_token_id
    return cfg


def llava_next_config(tok: PreTrainedTokenizerFast, **lm: Any) -> LlavaNextConfig:
    """LLaVA-NeXT layout: anyres tiles (``NEXT_PINPOINTS``), ``image_newline``, same towers as LLaVA."""
    cfg = LlavaNextConfig(vision_config=vision_config(), text_config=text_config(tok, **lm),
                          image_token_id=tok.convert_tokens_to_ids("<image>"), image_seq_length=N_PATCH,
                          vision_feature_layer=-2, vision_feature_select_strategy="default",
                          projector_hidden_act="gelu", image_grid_pinpoints=NEXT_PINPOINTS)
    cfg.pad_token_id = tok.pad_token_id
    return cfg


def clip_image_processor() -> CLIPImageProcessorPil:
    """Resize the 224-px image to the 112-px tower input (bicubic), CLIP normalisation."""
    return CLIPImageProcessorPil(size={"shortest_edge": VISION_SIZE},
                                 crop_size={"height": VISION_SIZE, "width": VISION_SIZE},
                                 image_mean=CLIP_MEAN, image_std=CLIP_STD, do_convert_rgb=True)


def llava_processor(tok: PreTrainedTokenizerFast) -> LlavaProcessor:
    """``LlavaProcessor`` expanding ``<image>`` to 196 placeholders."""
    return LlavaProcessor(image_processor=clip_image_processor(), tokenizer=tok, patch_size=PATCH,
                          vision_feature_select_strategy="default", image_token="<image>",
                          num_additional_image_tokens=1, chat_template=None)


def llava_next_processor(tok: PreTrainedTokenizerFast) -> LlavaNextProcessor:
    """``LlavaNextProcessor``: a 224-px square image -> base 112 view + 2x2 tiles of 112 px."""
    ip = LlavaNextImageProcessorPil(size={"shortest_edge": VISION_SIZE},
                                    crop_size={"height": VISION_SIZE, "width": VISION_SIZE},
                                    image_grid_pinpoints=NEXT_PINPOINTS, image_mean=CLIP_MEAN,
                                    image_std=CLIP_STD, do_convert_rgb=True)
    return LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=PATCH,
                              vision_feature_select_strategy="default", image_token="<image>",
                              num_additional_image_tokens=1)


VIT_LABELS = [str(i) for i in range(1, MAX_SHAPES + 1)]  # ViT task: number of shapes in the image


def vit_config(hidden: int = 64, layers: int = 10) -> ViTConfig:
    """``ViTForImageClassification`` config: 112 px, patch 8 (196 tokens + CLS), 5 classes (1-5 shapes)."""
    return ViTConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                     num_attention_heads=4, image_size=VISION_SIZE, patch_size=PATCH,
                     num_labels=len(VIT_LABELS),
                     id2label=dict(enumerate(VIT_LABELS)), label2id={k: i for i, k in enumerate(VIT_LABELS)})


def vit_image_processor() -> ViTImageProcessorPil:
    """Resize to 112 px (bicubic), CLIP normalisation."""
    return ViTImageProcessorPil(size={"height": VISION_SIZE, "width": VISION_SIZE}, resample=3,
                                image_mean=CLIP_MEAN, image_std=CLIP_STD, do_convert_rgb=True)
