"""experiments/bench.py: the plan (CPU and --gpu, no GPU needed) and one short CPU run of every table."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import FAST_MODEL, SMALL_DATA

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import bench
import bench_models

SMALL_RUN = [*FAST_MODEL, *SMALL_DATA, "data.batch_size=2", "explore.max_new_tokens=16"]


def table(text: str, title: str) -> dict[str, list[str]]:
    """Rows of the Markdown table under `## ...title`, keyed by their leading cells."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("## ") and title in line)
    header = [c.strip() for c in lines[start + 2].strip("|").split("|")]
    rows = {}
    for line in lines[start + 4:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        keys = 2 if header[1] == "explore" else 1
        rows[" ".join(cells[:keys])] = dict(zip(header[keys:], cells[keys:]))
    return rows


@pytest.mark.slow
def test_gpu_dry_run_plans_published_shapes_with_forced_length(cache_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MEDVR_CACHE", str(cache_dir))  # bench.main would default it to outputs/cache
    out = tmp_path / "plan.md"
    code = bench.main(["--gpu", "--dry-run", "--out", str(out), f"paths.cache_dir={cache_dir}"])
    text = out.read_text()
    assert code == 0 and text.strip() == capsys.readouterr().out.strip()
    assert "model `qwen2vl_2b`, 2.21B parameters" in text and "model `qwen25vl_7b`, 8.29B parameters" in text
    assert "G=8" in text and "max new tokens 256" in text and "forced" in text
    runs = [line for line in text.splitlines() if line.startswith(("| engines", "| explore"))]
    # medvr per rollout option and HF generate with a static cache (none, random_crop each), and TRL
    per_model = (len(bench.rollout_options()) + 1) * 2 + 1
    assert len(runs) == 2 * per_model
    assert sum(r.endswith("rollout=hf rollout.cache=static` |") for r in runs) == 2  # one per model, explore=none
    assert sum("model=qwen2_5vl_7b_lora" in r and "qwen25vl_7b" in r for r in runs) == per_model
    assert all("model.dtype=bfloat16" in r and "algo.group_size=8" in r for r in runs)


def test_random_models_have_the_published_parameter_counts():
    for name, shape in bench_models.SHAPES.items():
        assert bench_models.param_count(bench_models.config_for(name)) == shape["params"], name


def test_published_shapes_shrink_for_cpu():
    tokens = {"bos": 0, "eos": 2, "pad": 0, "image_token_id": 12, "video_token_id": 13,
              "vision_start_token_id": 9, "vision_end_token_id": 10}
    for name in bench_models.SHAPES:
        full = bench_models.config_for(name)
        small = bench_models.config_for(name, tokens, shrink=True)
        assert small.model_type == full.model_type and small.image_token_id == 12
        assert small.get_text_config().hidden_size < full.get_text_config().hidden_size
        assert full.get_text_config().vocab_size > 150_000


def test_unknown_rollout_option_is_refused(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--rollout", "vllm"])
    assert "conf/rollout has" in capsys.readouterr().err
    assert bench.parse_args(["--rollout", "hf+rollout.cache=static"]).rollout == ["hf+rollout.cache=static"]
    assert bench._overrides("rollout", "hf+rollout.cache=static") == ["rollout=hf", "rollout.cache=static"]


@pytest.mark.slow
def test_cpu_bench_prints_engines_and_explore_tables(tiny, cache_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDVR_CACHE", str(cache_dir))
    rollout = bench.rollout_options()[:1]
    out = tmp_path / "bench.md"
    code = bench.main(["--steps", "1", "--warmup", "1", "--explore", "none", "--rollout", ",".join(rollout),
                       "--out", str(out), "--keep", str(tmp_path / "work"), f"paths.cache_dir={cache_dir}", *SMALL_RUN])
    text = out.read_text()
    assert code == 0, text
    medvr = f"medvr-{rollout[0]}" if rollout else "medvr"
    engines = table(text, "engines")
    assert set(engines) == {medvr, "trl"}
    for row in engines.values():
        for column in ("s/step", "rollout s/step", "rollout tok/s", "peak RSS (MiB)"):
            assert float(row[column]) > 0, (column, text)
        assert 0 < float(row["tokens/completion"]) <= 16  # the token budget holds for both engines
    assert engines["trl"]["s/step ÷ TRL's"] == "1.00"
    explore = table(text, "explore options")
    assert set(explore) == {f"{rollout[0] if rollout else '-'} none"}
    assert next(row["s/step ÷ none's"] for row in explore.values()) == "1.00"
    assert next(row["per policy token ÷ none's"] for row in explore.values()) == "1.00"
    assert all(float(row["s/step"]) > 0 for row in explore.values())
    assert "torch" in text and "trl 1." in text and "G=4" in text and "2 prompts/step" in text
