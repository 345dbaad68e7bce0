"""Tests of ReportGenerator: report fields, greedy determinism, prior handling, feature cache, batching and stopping."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import torch
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from libra_model.prompts import DEFAULT_QUESTION, build_question, tokenize_prompt
from libra_model.report_generator import GeneratedReport, ReportGenerator, ReportRequest
from libra_model.tokenization_libra import TokenizerFilesNotFoundError
from tests.libra_model.sample_images import make_radiograph

pytestmark = pytest.mark.usefixtures("block_network")

MAX_NEW_TOKENS = 8
NUM_TINY_PATCHES = 16


@pytest.fixture
def generator(tiny_checkpoint) -> ReportGenerator:
    return ReportGenerator.from_pretrained(tiny_checkpoint)


class TowerCallCounter:
    """Count the images that the vision tower encodes (several may share one forward call)."""

    def __init__(self, generator: ReportGenerator) -> None:
        self.calls = 0
        generator.model.get_vision_tower().register_forward_hook(self._count)

    def _count(self, module, inputs, output) -> None:
        self.calls += inputs[0].shape[0]


def make_dicom_radiograph(seed: int) -> pydicom.Dataset:
    """Return an in-memory 12-bit MONOCHROME2 DX-like data set with a synthetic picture."""
    pixels = (np.asarray(make_radiograph(seed), dtype=np.uint16) * 16).astype(np.uint16)
    dataset = pydicom.Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    dataset.SOPInstanceUID = generate_uid()
    dataset.Modality = "DX"
    dataset.Rows, dataset.Columns = pixels.shape
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME2"
    dataset.BitsAllocated = 16
    dataset.BitsStored = 12
    dataset.HighBit = 11
    dataset.PixelRepresentation = 0
    dataset.PixelData = pixels.tobytes()
    return dataset


def test_generate_returns_report_fields(generator):
    report = generator.generate(make_radiograph(1), make_radiograph(2), max_new_tokens=MAX_NEW_TOKENS)
    assert isinstance(report, GeneratedReport)
    assert report.model_name == "libra-tiny-demo"
    assert report.is_demo_checkpoint is True
    assert report.checkpoint_sha256 == generator.model.checkpoint_sha256
    assert report.dicom_conversion == "none"
    assert report.used_real_prior is True
    assert report.conv_mode == "libra_v1"
    assert 1 <= report.generated_tokens <= MAX_NEW_TOKENS
    assert report.device == "cpu"
    assert report.dtype == "float32"


def test_generate_counts_image_positions_in_prompt(generator):
    report = generator.generate(make_radiograph(1), max_new_tokens=2)
    prompt_ids = tokenize_prompt(generator.template.render(DEFAULT_QUESTION), generator.tokenizer)
    assert report.prompt_tokens == len(prompt_ids) - 1 + NUM_TINY_PATCHES


def test_generate_timings_are_consistent(generator):
    report = generator.generate(make_radiograph(1), max_new_tokens=MAX_NEW_TOKENS)
    assert report.vision_seconds > 0
    assert report.prefill_seconds > 0
    assert report.decode_seconds >= 0
    assert report.vision_seconds + report.prefill_seconds + report.decode_seconds == pytest.approx(report.total_seconds)


def test_generate_is_frozen_dataclass(generator):
    report = generator.generate(make_radiograph(1), max_new_tokens=2)
    with pytest.raises(AttributeError):
        report.findings_text = "edited"


def test_greedy_generation_is_deterministic(generator):
    first = generator.generate(make_radiograph(1), make_radiograph(2), max_new_tokens=MAX_NEW_TOKENS)
    second = generator.generate(make_radiograph(1), make_radiograph(2), max_new_tokens=MAX_NEW_TOKENS)
    assert first.findings_text == second.findings_text
    assert first.generated_tokens == second.generated_tokens


def test_sampling_follows_torch_seed(generator):
    torch.manual_seed(11)
    first = generator.generate(make_radiograph(1), max_new_tokens=MAX_NEW_TOKENS, temperature=0.2, top_p=0.9)
    torch.manual_seed(11)
    second = generator.generate(make_radiograph(1), max_new_tokens=MAX_NEW_TOKENS, temperature=0.2, top_p=0.9)
    assert first.findings_text == second.findings_text


def test_no_prior_matches_current_as_prior(generator):
    without_prior = generator.generate(make_radiograph(1), max_new_tokens=MAX_NEW_TOKENS)
    current_as_prior = generator.generate(make_radiograph(1), make_radiograph(1), max_new_tokens=MAX_NEW_TOKENS)
    assert without_prior.findings_text == current_as_prior.findings_text
    assert without_prior.used_real_prior is False
    assert current_as_prior.used_real_prior is True


def test_no_prior_runs_tower_once(generator):
    counter = TowerCallCounter(generator)
    generator.generate(make_radiograph(1), max_new_tokens=2)
    assert counter.calls == 1


def test_prior_without_keys_runs_tower_twice(generator):
    counter = TowerCallCounter(generator)
    generator.generate(make_radiograph(1), make_radiograph(2), max_new_tokens=2)
    assert counter.calls == 2


def test_cached_images_skip_tower(generator):
    counter = TowerCallCounter(generator)
    first = generator.generate(
        make_radiograph(1), make_radiograph(2), max_new_tokens=MAX_NEW_TOKENS, current_key="1.2.3.1", prior_key="1.2.3.2"
    )
    calls_after_first = counter.calls
    second = generator.generate(
        make_radiograph(1), make_radiograph(2), max_new_tokens=MAX_NEW_TOKENS, current_key="1.2.3.1", prior_key="1.2.3.2"
    )
    assert calls_after_first == 2
    assert counter.calls == 2
    assert second.findings_text == first.findings_text


def test_cached_prior_of_new_study_runs_tower_once(generator):
    generator.generate(make_radiograph(2), max_new_tokens=2, current_key="1.2.3.2")
    counter = TowerCallCounter(generator)
    generator.generate(make_radiograph(1), make_radiograph(2), max_new_tokens=2, current_key="1.2.3.1", prior_key="1.2.3.2")
    assert counter.calls == 1


def test_feature_cache_evicts_least_recent(tiny_checkpoint):
    generator = ReportGenerator.from_pretrained(tiny_checkpoint, feature_cache_size=1)
    generator.generate(make_radiograph(1), max_new_tokens=1, current_key="1.2.3.1")
    generator.generate(make_radiograph(2), max_new_tokens=1, current_key="1.2.3.2")
    counter = TowerCallCounter(generator)
    generator.generate(make_radiograph(1), max_new_tokens=1, current_key="1.2.3.1")
    assert counter.calls == 1


def test_generation_stops_at_eos(generator):
    eos_token_id = generator.tokenizer.eos_token_id
    stop_after_calls = 3
    calls = 0

    def force_eos(module, inputs, logits):
        nonlocal calls
        calls += 1
        if calls == stop_after_calls:
            logits = logits.clone()
            logits[..., eos_token_id] = 1e4
            return logits
        return None

    generator.model.lm_head.register_forward_hook(force_eos)
    report = generator.generate(make_radiograph(1), max_new_tokens=20)

    assert report.generated_tokens == stop_after_calls
    assert "</s>" not in report.findings_text


def test_dicom_input_records_conversion(generator):
    report = generator.generate(make_dicom_radiograph(1), max_new_tokens=2)
    assert report.dicom_conversion == "mimic"


def test_released_conversion_is_recorded(tiny_checkpoint):
    generator = ReportGenerator.from_pretrained(tiny_checkpoint, dicom_conversion="released")
    report = generator.generate(make_dicom_radiograph(1), make_radiograph(2), max_new_tokens=2)
    assert report.dicom_conversion == "released"


def test_tensor_input_skips_preprocessing(generator):
    report = generator.generate(torch.zeros(3, 56, 56), max_new_tokens=2)
    assert report.dicom_conversion == "none"


def test_generate_rejects_unknown_image_type(generator):
    with pytest.raises(TypeError, match="got ndarray"):
        generator.generate(np.zeros((56, 56)), max_new_tokens=2)


def test_generate_rejects_negative_temperature(generator):
    with pytest.raises(ValueError, match="temperature -0.5 is negative"):
        generator.generate(make_radiograph(1), temperature=-0.5)


def test_generate_rejects_zero_new_tokens(generator):
    with pytest.raises(ValueError, match="max_new_tokens 0 is below 1"):
        generator.generate(make_radiograph(1), max_new_tokens=0)


def test_unknown_dicom_conversion_raises(tiny_checkpoint):
    with pytest.raises(ValueError, match="dicom_conversion 'jpeg' is unknown"):
        ReportGenerator.from_pretrained(tiny_checkpoint, dicom_conversion="jpeg")


def test_missing_tokenizer_raises_before_weights(tiny_checkpoint_copy):
    (tiny_checkpoint_copy / "tokenizer.model").unlink()
    with pytest.raises(TokenizerFilesNotFoundError, match="tokenizer.model"):
        ReportGenerator.from_pretrained(tiny_checkpoint_copy)


def test_explicit_conv_mode_is_used(tiny_checkpoint):
    generator = ReportGenerator.from_pretrained(tiny_checkpoint, conv_mode="libra_llama_3")
    assert generator.generate(make_radiograph(1), max_new_tokens=1).conv_mode == "libra_llama_3"


BATCH_REQUESTS = [
    {"current": 1, "prior": 2, "current_key": "1.2.9.1", "prior_key": "1.2.9.2", "indication": None},
    {"current": 3, "prior": None, "current_key": "1.2.9.3", "prior_key": None, "indication": "cough"},
    {"current": 4, "prior": 5, "current_key": None, "prior_key": None, "indication": "fever and shortness of breath for three days"},
]


def _request(entry: dict) -> ReportRequest:
    return ReportRequest(
        current=make_radiograph(entry["current"]),
        prior=make_radiograph(entry["prior"]) if entry["prior"] is not None else None,
        current_key=entry["current_key"],
        prior_key=entry["prior_key"],
        indication=entry["indication"],
    )


def test_generate_batch_matches_one_by_one(tiny_checkpoint):
    batched = ReportGenerator.from_pretrained(tiny_checkpoint).generate_batch(
        [_request(entry) for entry in BATCH_REQUESTS], max_new_tokens=12
    )
    single_generator = ReportGenerator.from_pretrained(tiny_checkpoint)
    singles = [single_generator.generate_batch([_request(entry)], max_new_tokens=12)[0] for entry in BATCH_REQUESTS]
    for batch_report, single_report in zip(batched, singles):
        assert batch_report.findings_text == single_report.findings_text
        assert batch_report.generated_tokens == single_report.generated_tokens
        assert batch_report.prompt_tokens == single_report.prompt_tokens
        assert batch_report.used_real_prior == single_report.used_real_prior
        assert batch_report.batch_size == 3
        assert single_report.batch_size == 1


def test_generate_batch_prompts_differ_in_length(generator):
    lengths = {
        len(tokenize_prompt(generator.template.render(build_question(entry["indication"])), generator.tokenizer))
        for entry in BATCH_REQUESTS
    }
    assert len(lengths) == 3


def test_generate_batch_stops_each_report_at_eos(generator):
    eos_token_id = generator.tokenizer.eos_token_id
    calls = 0

    def force_eos_in_first_row(module, inputs, logits):
        nonlocal calls
        calls += 1
        if calls == 2:
            logits = logits.clone()
            logits[0, -1, eos_token_id] = 1e4
            return logits
        return None

    generator.model.lm_head.register_forward_hook(force_eos_in_first_row)
    reports = generator.generate_batch([_request(entry) for entry in BATCH_REQUESTS[:2]], max_new_tokens=8)
    assert reports[0].generated_tokens == 2
    assert reports[1].generated_tokens > 2


def test_generate_batch_encodes_shared_prior_once(generator):
    counter = TowerCallCounter(generator)
    requests = [
        ReportRequest(make_radiograph(1), make_radiograph(9), current_key="1.2.8.1", prior_key="1.2.8.9"),
        ReportRequest(make_radiograph(2), make_radiograph(9), current_key="1.2.8.2", prior_key="1.2.8.9"),
    ]
    generator.generate_batch(requests, max_new_tokens=2)
    assert counter.calls == 3


def test_generate_batch_rejects_empty_list(generator):
    with pytest.raises(ValueError, match="got no requests"):
        generator.generate_batch([])


def test_feature_cache_folder_outlives_generator(tiny_checkpoint, tmp_path):
    first = ReportGenerator.from_pretrained(tiny_checkpoint, feature_cache_dir=tmp_path)
    first.generate(make_radiograph(2), max_new_tokens=2, current_key="1.2.7.2")
    expected = first.generate(make_radiograph(1), make_radiograph(2), max_new_tokens=MAX_NEW_TOKENS)

    second = ReportGenerator.from_pretrained(tiny_checkpoint, feature_cache_dir=tmp_path)
    counter = TowerCallCounter(second)
    report = second.generate(make_radiograph(1), make_radiograph(2), max_new_tokens=MAX_NEW_TOKENS, prior_key="1.2.7.2")
    assert counter.calls == 1
    assert report.findings_text == expected.findings_text


def test_feature_cache_folder_is_per_conversion(tiny_checkpoint, tmp_path):
    mimic = ReportGenerator.from_pretrained(tiny_checkpoint, feature_cache_dir=tmp_path, dicom_conversion="mimic")
    released = ReportGenerator.from_pretrained(tiny_checkpoint, feature_cache_dir=tmp_path, dicom_conversion="released")
    assert mimic.feature_cache.folder != released.feature_cache.folder
    assert mimic.feature_cache.folder.parent == tmp_path


def test_batch_capacity_stays_within_limits(generator):
    assert generator.batch_capacity(1, max_new_tokens=64) == 1
    assert 1 <= generator.batch_capacity(8, max_new_tokens=64) <= 8
