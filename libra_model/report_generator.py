"""Draft findings text from a current chest radiograph and an optional prior, with the Libra model.

`ReportGenerator` loads a checkpoint once and turns DICOM data sets or PIL images into a
`GeneratedReport`. It caches the per-image connector features by SOP Instance UID (in memory,
and on disk when given a folder), so an image seen before (typically the prior of a later
study) never runs the vision encoder again. `generate_batch` writes several reports in one
batch, with left-padded prompts, and gives the same greedy text as one report at a time.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pydicom
import structlog
import torch
from PIL import Image
from transformers import StoppingCriteria, StoppingCriteriaList

from libra_model import preprocessing
from libra_model.feature_cache import FeatureCache
from libra_model.loading import compute_checkpoint_sha256, resolve_dtype
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
# Text tokens of the libra_v1 prompt without an indication, rounded up; used for memory estimates.
DEFAULT_PROMPT_TOKENS = 64
# Share of the free device memory that a batch may plan to use (the rest is headroom for
# allocator fragmentation and other processes).
BATCH_MEMORY_SHARE = 0.8
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
    batch_size : int
        Number of reports generated together in one batch. The times above are those of the
        whole batch.
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
    batch_size: int = 1


@dataclass(frozen=True)
class ReportRequest:
    """One report to write: the current image, an optional prior and their cache keys.

    Attributes
    ----------
    current : pydicom.Dataset, PIL.Image.Image or torch.Tensor
        The current frontal image, in the forms `ReportGenerator.generate` accepts.
    prior : pydicom.Dataset, PIL.Image.Image or torch.Tensor, optional
        The prior frontal image; None uses the current image as its own prior.
    current_key, prior_key : str, optional
        Cache keys, normally the SOP Instance UIDs. An image without a key is not cached.
    indication : str, optional
        Clinical indication appended to the question.
    """

    current: pydicom.Dataset | Image.Image | torch.Tensor
    prior: pydicom.Dataset | Image.Image | torch.Tensor | None = None
    current_key: str | None = None
    prior_key: str | None = None
    indication: str | None = None


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
        Number of images whose connector features are kept in memory. 0 keeps none in memory.
    feature_cache_dir : str or pathlib.Path, optional
        Folder where every cached image's features are also written, so that they outlive
        this process. The generator uses a subfolder named after the model identity
        (checkpoint, RAD-DINO weights, DICOM conversion, dtype). None keeps them in memory only.

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
        feature_cache_dir: str | Path | None = None,
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
        cache_folder = Path(feature_cache_dir) / self._model_identity() if feature_cache_dir is not None else None
        self.feature_cache = FeatureCache(feature_cache_size, cache_folder)

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
        feature_cache_dir: str | Path | None = None,
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
            Number of images whose connector features are cached in memory.
        feature_cache_dir : str or pathlib.Path, optional
            Folder for cached features on disk, as in `ReportGenerator`.

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
            feature_cache_dir=feature_cache_dir,
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
        request = ReportRequest(current, prior, current_key, prior_key, indication)
        return self.generate_batch([request], max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)[0]

    @torch.no_grad()
    def generate_batch(
        self,
        requests: list[ReportRequest],
        *,
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        top_p: float | None = None,
    ) -> list[GeneratedReport]:
        """Write the findings of several requests in one batch.

        The images that are not cached are encoded in one vision tower call, the prompts are
        left-padded to one length with an attention mask that hides the padding, and the LLM
        generates for all of them at once. With greedy decoding each report equals the one
        `generate` writes for its request alone. A sequence that has finished is padded until
        the last one finishes, so the decode time is that of the longest report.

        Parameters
        ----------
        requests : list of ReportRequest
            The reports to write, at least one.
        max_new_tokens, temperature, top_p
            As in `generate`, for every request.

        Returns
        -------
        list of GeneratedReport
            One report per request, in the same order, each with the batch's times.

        Raises
        ------
        TypeError
            If an image is of an unsupported type.
        ValueError
            If `requests` is empty, `temperature` is negative, `max_new_tokens` is below 1 or a
            tensor has the wrong shape.
        """
        if not requests:
            raise ValueError("generate_batch got no requests: pass at least one ReportRequest.")
        if temperature < 0:
            raise ValueError(f"temperature {temperature} is negative: use 0 for greedy decoding or a positive value.")
        if max_new_tokens is None:
            max_new_tokens = DEFAULT_MAX_NEW_TOKENS
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens {max_new_tokens} is below 1: request at least one new token.")
        started = time.perf_counter()

        image_embeddings, conversions = self._batch_image_embeddings(requests)
        _synchronize(self.device)
        vision_done = time.perf_counter()

        prompts = [
            tokenize_prompt(self.template.render(build_question(request.indication)), self.tokenizer)
            for request in requests
        ]
        input_ids, attention_mask = self._left_padded(prompts)
        sampling = temperature > 0
        sampling_kwargs = {"do_sample": True, "temperature": temperature, "top_p": top_p} if sampling else {"do_sample": False}
        finish_recorder = _FinishRecorder(
            StopStringCriteria(self.template.stop_string, self.tokenizer), self.tokenizer.eos_token_id, len(requests)
        )

        with _FirstForwardTimer(self.model.lm_head, self.device) as prefill_timer:
            new_ids = self.model.generate(
                input_ids,
                image_embeddings=image_embeddings,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                stopping_criteria=StoppingCriteriaList([finish_recorder]),
                eos_token_id=self.tokenizer.eos_token_id,
                pad_token_id=self._pad_token_id(),
                **sampling_kwargs,
            )
        finished = time.perf_counter()
        prefill_done = prefill_timer.first_forward_done or finished

        reports = []
        for index, request in enumerate(requests):
            length = finish_recorder.lengths[index] or new_ids.shape[1]
            generated = new_ids[index, :length].tolist()
            text = self.tokenizer.decode(generated, skip_special_tokens=True)
            reports.append(
                GeneratedReport(
                    findings_text=clean_generated_text(text, self.template.stop_string),
                    model_name=self.model_name,
                    checkpoint_sha256=self.model.checkpoint_sha256 or "",
                    is_demo_checkpoint=self.model.is_demo_checkpoint,
                    dicom_conversion=conversions[index],
                    used_real_prior=request.prior is not None,
                    conv_mode=self.conv_mode,
                    prompt_tokens=len(prompts[index]) - 1 + image_embeddings.shape[1],
                    generated_tokens=len(generated),
                    vision_seconds=vision_done - started,
                    prefill_seconds=prefill_done - vision_done,
                    decode_seconds=finished - prefill_done,
                    total_seconds=finished - started,
                    device=str(self.device),
                    dtype=str(self.dtype).removeprefix("torch."),
                    batch_size=len(requests),
                )
            )
        log.debug(
            "report_generator.reports_generated",
            batch_size=len(requests),
            generated_tokens=[report.generated_tokens for report in reports],
            total_seconds=round(finished - started, 4),
        )
        return reports

    def batch_capacity(self, max_batch_size: int, max_new_tokens: int) -> int:
        """Return how many reports fit in one batch on this device, from 1 to `max_batch_size`.

        The estimate per report is its key/value cache over the prompt, the image patches and
        `max_new_tokens`, plus the prompt step's largest activations. It is compared with 80 %
        of the free memory, which is `torch.cuda.mem_get_info` on CUDA and the machine's free
        pages on the CPU. NOTE: this is an estimate, not a measurement, so a batch can still run out of
        memory when other processes allocate at the same time.
        """
        if max_batch_size <= 1:
            return 1
        config = self.model.config
        element_bytes = torch.finfo(self.dtype).bits // 8
        num_patches = self._num_image_patches()
        sequence_length = num_patches + DEFAULT_PROMPT_TOKENS + max_new_tokens
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        key_value_bytes = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * sequence_length * element_bytes
        activation_bytes = sequence_length * (config.intermediate_size * 3 + config.hidden_size * 4) * element_bytes
        logits_bytes = config.vocab_size * 4 * 2
        per_report_bytes = key_value_bytes + activation_bytes + logits_bytes
        if self.device.type == "cuda":
            free_bytes, _ = torch.cuda.mem_get_info(self.device)
        else:
            free_bytes = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        fitting = int(free_bytes * BATCH_MEMORY_SHARE // per_report_bytes)
        return max(1, min(max_batch_size, fitting))

    def clear_feature_cache(self) -> None:
        """Drop all image features held in memory (files in the cache folder stay)."""
        self.feature_cache.clear()

    def _model_identity(self) -> str:
        """Return a short digest of what the image features depend on, naming the cache subfolder."""
        tower = self.model.get_vision_tower()
        tower_files = [
            path
            for path in sorted(tower.folder.iterdir())
            if path.suffix in (".safetensors", ".bin") or path.name == "preprocessor_config.json"
        ]
        tower_sha256 = compute_checkpoint_sha256(tower.folder / "config.json", tower_files)
        parts = [self.model.checkpoint_sha256 or "unsaved", tower_sha256, self.dicom_conversion, str(self.dtype)]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]

    def _num_image_patches(self) -> int:
        crop_size = self.model.get_vision_tower().image_processor.crop_size["height"]
        patch_size = self.model.get_vision_tower().vision_tower.config.patch_size
        return (crop_size // patch_size) ** 2

    def _pad_token_id(self) -> int:
        pad_token_id = self.model.generation_config.pad_token_id
        return pad_token_id if pad_token_id is not None else self.tokenizer.eos_token_id

    def _left_padded(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-pad prompt ids to one length; return ids and a mask with zeros at the padding."""
        length = max(len(prompt) for prompt in prompts)
        pad_token_id = self._pad_token_id()
        input_ids = torch.full((len(prompts), length), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), length), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, length - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            attention_mask[row, length - len(prompt) :] = 1
        return input_ids.to(self.device), attention_mask.to(self.device)

    def _batch_image_embeddings(self, requests: list[ReportRequest]) -> tuple[torch.Tensor, list[str]]:
        """Encode the images that are not cached in one tower call, then fuse each current/prior pair.

        Returns image embeddings of shape (batch, num_patches, hidden_size) and each request's
        DICOM conversion.
        """
        reference = next(self.model.model.mm_projector.parameters())
        features: dict[str, torch.Tensor] = {}
        pending: dict[str, torch.Tensor] = {}
        pending_keys: dict[str, str | None] = {}
        slots = []
        for index, request in enumerate(requests):
            pair = []
            for role, image, key in (("current", request.current, request.current_key), ("prior", request.prior, request.prior_key)):
                if image is None:
                    pair.append(pair[0])
                    continue
                slot = f"key:{key}" if key is not None else f"{role}:{index}"
                if slot not in features and slot not in pending:
                    cached = self.feature_cache.get(key, reference.device, reference.dtype) if key is not None else None
                    if cached is not None:
                        features[slot] = cached
                    else:
                        pending[slot] = self._pixel_values(image)
                        pending_keys[slot] = key
                pair.append(slot)
            slots.append(pair)
        if pending:
            encoded = self.model.extract_image_features(torch.stack(list(pending.values())))
            for row, slot in enumerate(pending):
                features[slot] = encoded[row : row + 1]
                if pending_keys[slot] is not None:
                    self.feature_cache.put(pending_keys[slot], features[slot])
        current_features = torch.cat([features[current] for current, _ in slots])
        prior_features = torch.cat([features[prior] for _, prior in slots])
        image_embeddings = self.model.fuse_image_features(current_features, prior_features)
        conversions = [
            self.dicom_conversion if isinstance(request.current, pydicom.Dataset) else NO_DICOM_CONVERSION
            for request in requests
        ]
        return image_embeddings, conversions

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


class _FinishRecorder(StoppingCriteria):
    """Stop on the stop string or EOS, and record each sequence's length when it first finished.

    In a batch, transformers pads a finished sequence until the last one finishes; the
    recorded lengths tell where each report ends.
    """

    def __init__(self, stop_criteria: StopStringCriteria, eos_token_id: int | None, batch_size: int) -> None:
        self.stop_criteria = stop_criteria
        self.eos_token_id = eos_token_id
        self.lengths: list[int | None] = [None] * batch_size

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        """Return one flag per sequence, True where that sequence is finished."""
        finished = self.stop_criteria(input_ids, scores)
        if self.eos_token_id is not None:
            finished = finished | (input_ids[:, -1] == self.eos_token_id)
        for index, is_finished in enumerate(finished.tolist()):
            if is_finished and self.lengths[index] is None:
                self.lengths[index] = input_ids.shape[1]
        return finished


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


__all__ = ["GeneratedReport", "ReportGenerator", "ReportRequest", "resolve_generation_device", "resolve_generation_dtype"]
