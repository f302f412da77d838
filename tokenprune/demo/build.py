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
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessorPil,
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
# Qwen2.5-VL's image markers; appended after the shared vocabulary (so every other id is the LLaVA fixtures')
QWEN_SPECIALS = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>"]
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


def build_tokenizer(qwen: bool = False) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: lower-cases, keeps object names (``red circle``) as one token, splits on spaces,
    ``[ ] , ?`` and a final ``.``; adds ``<s>``. ``qwen``: Qwen's image markers (``QWEN_SPECIALS``) are
    appended as special tokens, every other id unchanged."""
    vocab: dict[str, int] = {}
    for w in SPECIALS + QUESTION_WORDS + ANSWER_WORDS + [object_token(o) for o in OBJECT_NAMES]:
        vocab.setdefault(w, len(vocab))
    extra = ["<image>"]
    if qwen:
        for w in QWEN_SPECIALS:
            vocab.setdefault(w, len(vocab))
        extra += QWEN_SPECIALS
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
        extra_special_tokens=extra, model_max_length=2048, padding_side="left")
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


QWEN_PATCH = 8  # Qwen2.5-VL tower patch; the 2x2 merger makes one LLM token per 16 x 16 input pixels
QWEN_MIN_PIXELS = 144 * (2 * QWEN_PATCH) ** 2  # >= 144 visual tokens per image
QWEN_MAX_PIXELS = 40000  # a 224 x 224 image -> 192 x 192 tower input (12 x 12 = 144 tokens), 288 x 192 -> 15 x 10


def qwen2_5_vl_config(tok: PreTrainedTokenizerFast, layers: int = 8, hidden: int = 128, ffn: int = 384,
                      rope_theta: float = 1e6, vision_hidden: int = 96, vision_depth: int = 4,
                      fullatt: tuple[int, ...] = (1, 3), window: int = 64,
                      mrope_section: tuple[int, int, int] = (1, 2, 13)) -> Qwen2_5_VLConfig:
    """Qwen2.5-VL layout: windowed vision tower (patch 8, 2D RoPE, ``window`` px windows = 4 x 4 merged
    units, full attention in blocks ``fullatt``), 2x2 patch merger, Qwen2 LM (qkv biases, 4 heads / 2 KV
    heads) with M-RoPE: ``mrope_section`` splits the 16 rotary frequencies (highest first) into t, h, w.
    The tower has no absolute position embedding, so the LM learns where a token is from its h / w
    positions; with RoPE base 1e6 and 16 frequencies, Qwen's proportions ([4, 6, 6]) would leave w only
    frequencies below 2e-4 rad per token (invisible over 15 columns), so h gets frequencies 1-2 (0.42,
    0.18 rad per token) and w frequency 3 on (0.075, 0.032, ...). Text positions (equal in t, h, w) rotate
    as 1-D RoPE whatever the split."""
    text = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5,
                rope_parameters={"rope_type": "default", "rope_theta": rope_theta,
                                 "mrope_section": list(mrope_section)},
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_heads=4,
                  patch_size=QWEN_PATCH, spatial_merge_size=2, temporal_patch_size=2, window_size=window,
                  out_hidden_size=hidden, fullatt_block_indexes=list(fullatt))
    ids = tok.convert_tokens_to_ids(QWEN_SPECIALS)
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, vision_start_token_id=ids[0],
                           image_token_id=ids[1], vision_end_token_id=ids[2], video_token_id=tok.unk_token_id,
                           tie_word_embeddings=False)
    cfg.pad_token_id = tok.pad_token_id
    return cfg


def qwen_image_processor() -> Qwen2VLImageProcessorPil:
    """Qwen2-VL resizing (``smart_resize`` to multiples of 16 px, ``QWEN_MIN_PIXELS`` .. ``QWEN_MAX_PIXELS``),
    CLIP normalisation, patches of 8 px x 2 frames (a still image is repeated)."""
    return Qwen2VLImageProcessorPil(size={"shortest_edge": QWEN_MIN_PIXELS, "longest_edge": QWEN_MAX_PIXELS},
                                    patch_size=QWEN_PATCH, temporal_patch_size=2, merge_size=2,
                                    image_mean=CLIP_MEAN, image_std=CLIP_STD, do_convert_rgb=True)


class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` without a video processor: transformers' video processors need torchvision,
    which the fixtures do not. Same ``__call__`` for images and text (``<|image_pad|>`` expands to one token
    per 2x2 unit); ``from_pretrained`` loads only the image processor and the tokenizer."""

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None,
                 **kwargs: Any) -> None:
        self.image_token = "<|image_pad|>"
        self.video_token = "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.unk_token_id
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


def qwen2_5_vl_processor(tok: PreTrainedTokenizerFast) -> ImageOnlyQwen2_5_VLProcessor:
    """The Qwen2.5-VL fixture's processor: :func:`qwen_image_processor` and the word-level tokenizer."""
    return ImageOnlyQwen2_5_VLProcessor(image_processor=qwen_image_processor(), tokenizer=tok)


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


def untrained(kind: str, seed: int = 0) -> tuple[Any, Any]:
    """A random-weight model (eval mode) of fixture ``kind``'s exact architecture and its processor: for
    plumbing and MACs checks without a checkpoint (accuracies are meaningless)."""
    import torch
    from transformers import (
        LlavaForConditionalGeneration,
        LlavaNextForConditionalGeneration,
        Qwen2_5_VLForConditionalGeneration,
        ViTForImageClassification,
    )

    torch.manual_seed(seed)
    if kind == "vit":
        return ViTForImageClassification(vit_config()).eval(), vit_image_processor()
    if kind == "qwen2_5_vl":
        tok = build_tokenizer(qwen=True)
        return Qwen2_5_VLForConditionalGeneration(qwen2_5_vl_config(tok)).eval(), qwen2_5_vl_processor(tok)
    tok = build_tokenizer()
    if kind == "llava":
        return LlavaForConditionalGeneration(llava_config(tok)).eval(), llava_processor(tok)
    if kind == "llava_next":
        return LlavaNextForConditionalGeneration(llava_next_config(tok)).eval(), llava_next_processor(tok)
    raise ValueError(f"kind must be one of llava, llava_next, qwen2_5_vl, vit; got {kind!r}")
