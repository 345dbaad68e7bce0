"""Model benchmark: vision, prefill and per-token decode time of a random Libra-shaped model.

The model is built in memory with random weights, so nothing is downloaded or read. It has a
ViT-B-sized RAD-DINO tower (Dinov2, hidden 768, 12 layers, 12 heads, patch 14, 518 px) and an
LLM of hidden 1024 with 8 layers, or a 7B-shaped LLM with `--preset 7b` (for a GPU). Each case
runs in its own process, so its peak resident memory (getrusage maxrss) is its own:

- no prior, cold: the current image is encoded and used as its own prior;
- prior, cold: current and prior are encoded;
- follow-up, prior cached: the prior was encoded as an earlier study's current image, so only
  the new current image runs the vision tower;
- repeat, both cached: no image runs the vision tower;
- batch of 4 follow-ups: four cached priors and four new current images in one batch.

The text is meaningless (random weights), so the end-of-sequence token is suppressed and every
case decodes exactly `--new-tokens` tokens. Run from the repository root:

    .venv/bin/python -m bench.model_bench                  # CPU, mid-size preset
    .venv/bin/python -m bench.model_bench --preset 7b --device cuda --dtype bfloat16 --bandwidth-gbs 4800
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PRESETS = {
    "mid": {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8, "num_attention_heads": 16},
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32},
}
VISION_TOWER = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "patch_size": 14, "image_size": 518}
VOCAB_SIZE = 32000
CASES = ("no prior, cold", "prior, cold", "follow-up, prior cached", "repeat, both cached", "batch of 4 follow-ups")
# RAD-DINO's image mean and std as the tiny checkpoint writes them.
IMAGE_MEAN = [0.5307, 0.5307, 0.5307]
IMAGE_STD = [0.2583, 0.2583, 0.2583]


def build_generator(preset: str, device: str, dtype_name: str, work_dir: Path):
    """Build a ReportGenerator around a random model of the preset's shape, in memory."""
    import torch
    from transformers import AutoImageProcessor, Dinov2Config, Dinov2Model

    from libra_model.configuration_libra import LibraConfig
    from libra_model.modeling_libra import LibraForCausalLM
    from libra_model.report_generator import ReportGenerator
    from libra_model.tiny import build_tiny_checkpoint
    from libra_model.tokenization_libra import LibraTokenizer
    from libra_model.vision_tower import LibraVisionTower

    dtype = getattr(torch, dtype_name)
    # The tiny checkpoint supplies a tokenizer; its ids are all below the random model's vocabulary.
    tokenizer_folder = build_tiny_checkpoint(work_dir / "tokenizer")
    tokenizer = LibraTokenizer.from_folder(tokenizer_folder)
    processor_folder = work_dir / "processor"
    processor_folder.mkdir(exist_ok=True)
    size = VISION_TOWER["image_size"]
    (processor_folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "BitImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": size, "width": size}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": IMAGE_MEAN, "image_std": IMAGE_STD,
        "do_convert_rgb": True,
    }))
    image_processor = AutoImageProcessor.from_pretrained(processor_folder, local_files_only=True, backend="pil")

    torch.manual_seed(0)
    shape = PRESETS[preset]
    config = LibraConfig(
        vocab_size=VOCAB_SIZE, num_key_value_heads=shape["num_attention_heads"], max_position_embeddings=4096,
        rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
        mm_hidden_size=VISION_TOWER["hidden_size"], mm_projector_type="TAC", mm_vision_select_layer="all",
        libra_demo_checkpoint=True, **shape,
    )
    with torch.device(device):
        model = LibraForCausalLM(config).to(dtype).eval()
        encoder = Dinov2Model(Dinov2Config(mlp_ratio=4, layerscale_value=1.0, **VISION_TOWER)).to(dtype)
    model.model.vision_tower = LibraVisionTower(encoder, image_processor, processor_folder)
    model.reset_rotary_embedding(device)
    return ReportGenerator(model, tokenizer)


def chest_datasets(count: int, rows: int, columns: int) -> list:
    """Return `count` synthetic chest CR data sets of rows x columns pixels, each with its own UIDs."""
    from bench.instances import phantom_pixels
    from node.synthetic import synthetic_chest_study

    datasets = []
    for seed in range(count):
        dataset = synthetic_chest_study(size=8, seed=seed)
        pixels = phantom_pixels(rows, columns, seed=seed)
        dataset.Rows, dataset.Columns = pixels.shape
        dataset.PixelData = pixels.tobytes()
        datasets.append(dataset)
    return datasets


def run_case(case: str, arguments: argparse.Namespace) -> dict:
    """Build the model, run one case, and return its times, images encoded and peak memory."""
    import torch

    from libra_model.report_generator import ReportRequest

    with tempfile.TemporaryDirectory(prefix="libra-model-bench-") as folder:
        started = time.perf_counter()
        generator = build_generator(arguments.preset, arguments.device, arguments.dtype, Path(folder))
        build_seconds = time.perf_counter() - started
    eos_token_id = generator.tokenizer.eos_token_id
    # The borrowed tokenizer has fewer pieces than the model's vocabulary. The head still
    # computes every logit, but only ids that the tokenizer can decode may be chosen.
    decodable_ids = generator.tokenizer._sentencepiece.get_piece_size()

    def suppress_eos(module, inputs, logits):
        logits = logits.clone()
        logits[..., eos_token_id] = float("-inf")
        logits[..., decodable_ids:] = float("-inf")
        return logits

    generator.model.lm_head.register_forward_hook(suppress_eos)
    encoded_images = 0

    def count_images(module, inputs, output):
        nonlocal encoded_images
        encoded_images += inputs[0].shape[0]

    generator.model.get_vision_tower().register_forward_hook(count_images)
    images = chest_datasets(8, arguments.rows, arguments.columns)
    keys = [str(dataset.SOPInstanceUID) for dataset in images]

    requests = [ReportRequest(images[0], None, keys[0])]
    if case == "prior, cold":
        requests = [ReportRequest(images[0], images[1], keys[0], keys[1])]
    elif case in ("follow-up, prior cached", "repeat, both cached"):
        generator.generate(images[1], max_new_tokens=1, current_key=keys[1])
        if case == "repeat, both cached":
            generator.generate(images[0], max_new_tokens=1, current_key=keys[0])
        requests = [ReportRequest(images[0], images[1], keys[0], keys[1])]
    elif case == "batch of 4 follow-ups":
        for index in range(4, 8):
            generator.generate(images[index], max_new_tokens=1, current_key=keys[index])
        requests = [ReportRequest(images[index], images[index + 4], keys[index], keys[index + 4]) for index in range(4)]
    # NOTE: the cold cases include one-time costs of the first forward pass (allocator, kernel choice).

    encoded_images = 0
    reports = generator.generate_batch(requests, max_new_tokens=arguments.new_tokens)
    report = reports[0]
    peak_rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_device_bytes = torch.cuda.max_memory_allocated() if arguments.device.startswith("cuda") else 0
    decode_steps = max(report.generated_tokens - 1, 1)
    weight_bytes = sum(
        parameter.numel() * parameter.element_size()
        for name, parameter in generator.model.named_parameters()
        if not name.startswith("model.vision_tower.") and not name.startswith("model.mm_projector.")
    )
    return {
        "case": case,
        "batch_size": len(requests),
        "encoded_images": encoded_images,
        "vision_seconds": report.vision_seconds,
        "prefill_seconds": report.prefill_seconds,
        "decode_seconds": report.decode_seconds,
        "generated_tokens": report.generated_tokens,
        "decode_ms_per_token": report.decode_seconds / decode_steps * 1000,
        "prompt_tokens": report.prompt_tokens,
        "build_seconds": build_seconds,
        "peak_rss_mib": peak_rss_kib / 1024,
        "peak_device_mib": peak_device_bytes / 2**20,
        "llm_weight_bytes": weight_bytes,
        "device": report.device,
        "dtype": report.dtype,
    }


def print_results(results: list[dict], bandwidth_gbs: float | None) -> None:
    """Print one row per case, and the decode rate against the memory-bandwidth bound when given."""
    print(f"{'case':<26} {'batch':>5} {'encoded':>7} {'vision s':>9} {'prefill s':>9} {'decode ms/token':>15} {'peak RSS MiB':>12}")
    for result in results:
        print(
            f"{result['case']:<26} {result['batch_size']:>5} {result['encoded_images']:>7} {result['vision_seconds']:>9.2f} "
            f"{result['prefill_seconds']:>9.2f} {result['decode_ms_per_token']:>15.1f} {result['peak_rss_mib']:>12.0f}"
        )
    first = results[0]
    print(f"\nLLM weights read per decode step: {first['llm_weight_bytes'] / 1e9:.2f} GB ({first['dtype']}, {first['device']})")
    if bandwidth_gbs:
        bound = bandwidth_gbs * 1e9 / first["llm_weight_bytes"]
        for result in results:
            rate = 1000 / result["decode_ms_per_token"]
            print(
                f"  {result['case']:<26} {rate:7.1f} tokens/s per sequence, bound {bound:.0f} tokens/s "
                f"({rate / bound * 100:.0f} % of the {bandwidth_gbs:g} GB/s bound)"
            )


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(prog="python -m bench.model_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="mid", help="LLM shape (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: %(default)s)")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (default: %(default)s)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens decoded per report (default: %(default)s)")
    parser.add_argument("--rows", type=int, default=2500, help="image rows in pixels (default: %(default)s)")
    parser.add_argument("--columns", type=int, default=2000, help="image columns in pixels (default: %(default)s)")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES), help="cases to run (default: all)")
    parser.add_argument("--bandwidth-gbs", type=float, help="device memory bandwidth in GB/s, for the decode bound")
    parser.add_argument("--json", type=Path, help="write the results to this JSON file")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run every case in its own process and print the table; return 0 when all succeeded."""
    arguments = parse_arguments(argv)
    if arguments.case:
        print(json.dumps(run_case(arguments.case, arguments)))
        return 0
    passed_on = list(argv if argv is not None else sys.argv[1:])
    results = []
    for case in arguments.cases:
        print(f"running: {case}", flush=True)
        command = [sys.executable, "-m", "bench.model_bench", *_without_option(passed_on, "--json"), "--case", case]
        completed = subprocess.run(command, capture_output=True, text=True)
        if completed.returncode != 0:
            print(f"case {case!r} failed with exit status {completed.returncode}:\n{completed.stderr[-2000:]}", file=sys.stderr)
            return 1
        results.append(json.loads(completed.stdout.strip().splitlines()[-1]))
    print()
    print_results(results, arguments.bandwidth_gbs)
    if arguments.json:
        arguments.json.parent.mkdir(parents=True, exist_ok=True)
        document = {"arguments": {key: str(value) if isinstance(value, Path) else value for key, value in vars(arguments).items()}, "results": results}
        arguments.json.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return 0


def _without_option(arguments: list[str], option: str) -> list[str]:
    """Return the command-line words without `option` and its value."""
    kept = []
    skip = False
    for word in arguments:
        if skip:
            skip = False
            continue
        if word == option:
            skip = True
            continue
        if word.startswith(option + "="):
            continue
        kept.append(word)
    return kept


if __name__ == "__main__":
    sys.exit(main())
