"""Draft findings text from a current chest radiograph and an optional prior, with the Libra model.

`ReportGenerator` loads a checkpoint once and turns DICOM data sets or PIL images into a
`GeneratedReport`. It caches the per-image connector features by SOP Instance UID, so an image
seen before (typically the prior of a later study) never runs the vision encoder again.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import pydicom
import structlog
import torch
from PIL import Image
from transformers import StoppingCriteriaList

from libra_model import preprocessing
from libra_model.loading import resolve_dtype
from libra_model.modeling_libra import LibraForCausalLM
from libra_model.prompts import (
    StopStringCriteria,
    build_question,
    clean_generated_text,
    get_template,
    select_conv_mode,
    tokenize_prompt,
)
from libra_model.tokenization_libra import LibraTokenizer

log = structlog.get_logger(__name__)

DEMO_MODEL_NAME = "libra-tiny-demo"
DEFAULT_MAX_NEW_TOKENS = 128
DEFAULT_FEATURE_CACHE_SIZE = 32
DICOM_CONVERSIONS = ("mimic", "released")
NO_DICOM_CONVERSION = "none"


@dataclass(frozen=True)
class GeneratedReport:
    """Findings text written by the model, with what produced it and how long it took.

    Attributes
    ----------
    findings_text : str
        The generated findings, stripped and without the stop string.
    model_name : str
        Checkpoint folder name, or "libra-tiny-demo" for the demo checkpoint.
    checkpoint_sha256 : str
        SHA-256 (hex) over config.json and the weight files.
    is_demo_checkpoint : bool
        True for the tiny random checkpoint, whose text is meaningless.
    dicom_conversion : str
        How the current image was rendered: "mimic" or "released" for DICOM input, "none" for
        a PIL image or a tensor.
    used_real_prior : bool
        False when no prior was given and the current image was used as the prior.
    conv_mode : str
        Conversation template, "libra_v1" or "libra_llama_3".
    prompt_tokens : int
        Length of the sequence the LLM read in the prompt step: the text ids plus one position
        per image patch.
    generated_tokens : int
        Number of new ids, including a final stop token.
    vision_seconds : float
        Image preprocessing, vision encoder and connector time, in seconds.
    prefill_seconds : float
        Time of the prompt step up to the first logits, in seconds.
    decode_seconds : float
        Time of the remaining generation steps, in seconds.
    total_seconds : float
        Wall time of the whole `ReportGenerator.generate` call, in seconds.
    device : str
        Device the model ran on, for example "cpu" or "cuda:0".
    dtype : str
        Parameter dtype, for example "float32" or "bfloat16".
    """

    findings_text: str
    model_name: str
    checkpoint_sha256: str
    is_demo_checkpoint: bool
    dicom_conversion: str
    used_real_prior: bool
    conv_mode: str
    prompt_tokens: int
    generated_tokens: int
    vision_seconds: float
    prefill_seconds: float
    decode_seconds: float
    total_seconds: float
    device: str
    dtype: str


class ReportGenerator:
    """Write draft findings for a current image and an optional prior with a loaded Libra model.

    One generator serves one thread at a time, because the model and the feature cache are
    shared without a lock.

    Parameters
    ----------
    model : LibraForCausalLM
        Loaded model with its vision tower attached.
    tokenizer : LibraTokenizer
        Tokenizer of the same checkpoint.
    dicom_conversion : str
        How DICOM data sets become pictures: "mimic" (the MIMIC-CXR-JPG conversion the model was
        trained on) or "released" (the released inference code's conversion).
    conv_mode : str, optional
        Conversation template, chosen from the checkpoint folder name when None.
    feature_cache_size : int
        Number of images whose connector features are kept in memory. 0 disables the cache.

    Raises
    ------
    ValueError
        If `dicom_conversion` or `conv_mode` is unknown.
    """

    def __init__(
        self,
        model: LibraForCausalLM,
        tokenizer: LibraTokenizer,
        *,
        dicom_conversion: str = "mimic",
        conv_mode: str | None = None,
        feature_cache_size: int = DEFAULT_FEATURE_CACHE_SIZE,
    ) -> None:
        dicom_conversion = str(dicom_conversion)
        if dicom_conversion not in DICOM_CONVERSIONS:
            raise ValueError(
                f"dicom_conversion {dicom_conversion!r} is unknown: use \"mimic\" or \"released\"."
            )
        folder_name = model.checkpoint_folder.name if model.checkpoint_folder is not None else ""
        self.model = model
        self.tokenizer = tokenizer
        self.dicom_conversion = dicom_conversion
        self.conv_mode = conv_mode or select_conv_mode(folder_name)
        self.template = get_template(self.conv_mode)
        self.model_name = DEMO_MODEL_NAME if model.is_demo_checkpoint else folder_name
        self.feature_cache_size = feature_cache_size
        self._feature_cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        vision_tower_dir: str | Path | None = None,
        device: str = "auto",
        dtype: str | torch.dtype = "auto",
        dicom_conversion: str = "mimic",
        conv_mode: str | None = None,
        feature_cache_size: int = DEFAULT_FEATURE_CACHE_SIZE,
    ) -> ReportGenerator:
        """Load a Libra checkpoint, its tokenizer and RAD-DINO from local folders.

        Parameters
        ----------
        model_dir : str or pathlib.Path
            Libra checkpoint folder.
        vision_tower_dir : str or pathlib.Path, optional
            Local RAD-DINO folder, or None for `mm_vision_tower` from config.json.
        device : str
            "auto" (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N".
        dtype : str or torch.dtype
            "auto" (bfloat16 on CUDA when supported, else float16 on CUDA, float32 on CPU) or a
            torch dtype name such as "float32".
        dicom_conversion : str
            "mimic" or "released", as in `ReportGenerator`.
        conv_mode : str, optional
            Conversation template, chosen from the folder name when None.
        feature_cache_size : int
            Number of images whose connector features are cached.

        Returns
        -------
        ReportGenerator
        """
        resolved_device = resolve_generation_device(device)
        resolved_dtype = resolve_generation_dtype(dtype, resolved_device)
        # The tokenizer loads in milliseconds, so a missing tokenizer file fails before the weights are read.
        tokenizer = LibraTokenizer.from_folder(model_dir)
        model = LibraForCausalLM.from_pretrained(
            model_dir,
            vision_tower=vision_tower_dir,
            torch_dtype=resolved_dtype,
            device_map=resolved_device,
        )
        return cls(
            model,
            tokenizer,
            dicom_conversion=dicom_conversion,
            conv_mode=conv_mode,
            feature_cache_size=feature_cache_size,
        )

    @property
    def device(self) -> torch.device:
        """Device of the model parameters."""
        return self.model.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """Parameter dtype of the model."""
        return self.model.lm_head.weight.dtype

    @torch.no_grad()
    def generate(
        self,
        current: pydicom.Dataset | Image.Image | torch.Tensor,
        prior: pydicom.Dataset | Image.Image | torch.Tensor | None = None,
        *,
        max_new_tokens: int | None = None,
        indication: str | None = None,
        temperature: float = 0.0,
        top_p: float | None = None,
        current_key: str | None = None,
        prior_key: str | None = None,
    ) -> GeneratedReport:
        """Write the findings for `current`, compared with `prior` when one is given.

        Without a prior, the current image is used as the prior too, as in the released
        inference code. Its features are computed once and used for both slots, which gives
        the same result as encoding it twice.

        Parameters
        ----------
        current : pydicom.Dataset, PIL.Image.Image or torch.Tensor
            The current frontal image. A data set is rendered with the generator's DICOM
            conversion. A tensor must already be preprocessed, shape (3, size, size).
        prior : pydicom.Dataset, PIL.Image.Image or torch.Tensor, optional
            The prior frontal image, in the same forms.
        max_new_tokens : int, optional
            Maximum number of new tokens, or None for 128 (the released default).
        indication : str, optional
            Clinical indication appended to the question.
        temperature : float
            0 for deterministic greedy decoding (the default here). A positive value samples,
            with transformers' default top_k of 50 as in the release, whose command line
            samples at 0.2.
        top_p : float, optional
            Nucleus sampling threshold when sampling.
        current_key, prior_key : str, optional
            Cache keys, normally the SOP Instance UIDs. An image without a key is not cached.

        Returns
        -------
        GeneratedReport

        Raises
        ------
        TypeError
            If an image is of an unsupported type.
        ValueError
            If `temperature` is negative, `max_new_tokens` is below 1 or a tensor has the wrong
            shape.
        """
        if temperature < 0:
            raise ValueError(f"temperature {temperature} is negative: use 0 for greedy decoding or a positive value.")
        if max_new_tokens is None:
            max_new_tokens = DEFAULT_MAX_NEW_TOKENS
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens {max_new_tokens} is below 1: request at least one new token.")
        started = time.perf_counter()

        current_features, dicom_conversion = self._image_features(current, current_key)
        if prior is None:
            prior_features = current_features
        else:
            prior_features, _ = self._image_features(prior, prior_key)
        image_embeddings = self.model.fuse_image_features(current_features, prior_features)
        _synchronize(self.device)
        vision_done = time.perf_counter()

        question = build_question(indication)
        prompt_ids = tokenize_prompt(self.template.render(question), self.tokenizer)
        input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
        sampling = temperature > 0
        sampling_kwargs = {"do_sample": True, "temperature": temperature, "top_p": top_p} if sampling else {"do_sample": False}
        stopping_criteria = StoppingCriteriaList([StopStringCriteria(self.template.stop_string, self.tokenizer)])

        with _FirstForwardTimer(self.model.lm_head, self.device) as prefill_timer:
            new_ids = self.model.generate(
                input_ids,
                image_embeddings=image_embeddings,
                max_new_tokens=max_new_tokens,
                stopping_criteria=stopping_criteria,
                eos_token_id=self.tokenizer.eos_token_id,
                **sampling_kwargs,
            )
        finished = time.perf_counter()

        generated = new_ids[0].tolist()
        text = self.tokenizer.decode(generated, skip_special_tokens=True)
        prefill_done = prefill_timer.first_forward_done or finished
        report = GeneratedReport(
            findings_text=clean_generated_text(text, self.template.stop_string),
            model_name=self.model_name,
            checkpoint_sha256=self.model.checkpoint_sha256 or "",
            is_demo_checkpoint=self.model.is_demo_checkpoint,
            dicom_conversion=dicom_conversion,
            used_real_prior=prior is not None,
            conv_mode=self.conv_mode,
            prompt_tokens=len(prompt_ids) - 1 + image_embeddings.shape[1],
            generated_tokens=len(generated),
            vision_seconds=vision_done - started,
            prefill_seconds=prefill_done - vision_done,
            decode_seconds=finished - prefill_done,
            total_seconds=finished - started,
            device=str(self.device),
            dtype=str(self.dtype).removeprefix("torch."),
        )
        log.debug(
            "report_generator.report_generated",
            generated_tokens=report.generated_tokens,
            used_real_prior=report.used_real_prior,
            total_seconds=round(report.total_seconds, 4),
        )
        return report

    def clear_feature_cache(self) -> None:
        """Drop all cached image features."""
        self._feature_cache.clear()

    def _image_features(
        self, image: pydicom.Dataset | Image.Image | torch.Tensor, key: str | None
    ) -> tuple[torch.Tensor, str]:
        """Return connector-ready features (1, num_patches, mm_hidden_size) and the DICOM conversion used."""
        conversion = self.dicom_conversion if isinstance(image, pydicom.Dataset) else NO_DICOM_CONVERSION
        if key is not None and key in self._feature_cache:
            self._feature_cache.move_to_end(key)
            return self._feature_cache[key], conversion

        pixel_values = self._pixel_values(image)
        features = self.model.extract_image_features(pixel_values[None])
        if key is not None and self.feature_cache_size > 0:
            self._feature_cache[key] = features
            while len(self._feature_cache) > self.feature_cache_size:
                self._feature_cache.popitem(last=False)
        return features, conversion

    def _pixel_values(self, image: pydicom.Dataset | Image.Image | torch.Tensor) -> torch.Tensor:
        """Turn one image into the tower input, shape (3, size, size)."""
        image_processor = self.model.get_vision_tower().image_processor
        if isinstance(image, pydicom.Dataset):
            picture = preprocessing.dicom_to_image(image, self.dicom_conversion)
            return preprocessing.preprocess_image(picture, image_processor)
        if isinstance(image, Image.Image):
            return preprocessing.preprocess_image(image, image_processor)
        if isinstance(image, torch.Tensor):
            if image.dim() != 3 or image.shape[0] != 3:
                raise ValueError(
                    f"a preprocessed image tensor must have shape (3, size, size), got {tuple(image.shape)}: "
                    "pass a PIL image or a pydicom data set to have it preprocessed."
                )
            return image
        raise TypeError(
            f"images must be pydicom data sets, PIL images or preprocessed tensors, got {type(image).__name__}."
        )


class _FirstForwardTimer:
    """Record when the first call of `module` ends, which is the end of the prompt step.

    On CUDA the first call is followed by one device synchronisation, so the time includes the
    queued kernels.
    """

    def __init__(self, module: torch.nn.Module, device: torch.device) -> None:
        self.module = module
        self.device = device
        self.first_forward_done: float | None = None
        self._handle = None

    def __enter__(self) -> _FirstForwardTimer:
        self._handle = self.module.register_forward_hook(self._record)
        return self

    def __exit__(self, *exc_info) -> None:
        self._handle.remove()

    def _record(self, module, inputs, output) -> None:
        if self.first_forward_done is None:
            _synchronize(self.device)
            self.first_forward_done = time.perf_counter()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolve_generation_device(device: str | torch.device) -> torch.device:
    """Turn "auto" into CUDA when available, else the CPU. Other values name a device.

    Raises
    ------
    ValueError
        If CUDA is requested but not available.
    """
    if str(device) == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was requested but CUDA is not available: use \"cpu\" or \"auto\".")
    return resolved


def resolve_generation_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """Turn "auto" into bfloat16 or float16 on CUDA and float32 on the CPU. Other values name a dtype.

    The released inference code runs in float16, so bfloat16 outputs can differ from it in the
    last digits and, through greedy decoding, in the occasional token.

    Raises
    ------
    ValueError
        If the name is not a floating-point torch dtype.
    """
    if str(dtype) != "auto":
        return resolve_dtype(dtype, config=None)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


__all__ = ["GeneratedReport", "ReportGenerator", "resolve_generation_device", "resolve_generation_dtype"]
