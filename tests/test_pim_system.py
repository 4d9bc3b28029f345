"""System model, paper-average regression, report/CLI behaviour, model loading and errors."""

import json
import time

import pytest

from p3quant.pim_emulator import report
from p3quant.pim_emulator.area import PimAreaFigures, macs_per_area_ratio
from p3quant.pim_emulator.command_model import command_gemv
from p3quant.pim_emulator.models import MODEL_PRESETS, PAPER_MODELS, get_model, load_hf_config
from p3quant.pim_emulator.pim_unit import HBM_PIM_FP16, P3_PCU_TEP
from p3quant.pim_emulator.system_model import decode_step
from p3quant.pim_emulator.systems import ALL_SYSTEMS, get_system

# Measured values that miss the paper by more than 5%, pinned (rel 1%) so changes are noticed.
# docs/pim_emulator.md explains each gap.
PINNED_MISSES = {
    "speedup P3-LLM / Pimba-enhanced": 3.68,  # paper 3.4: Pimba's SPU details are not public in P3-LLM
    "speedup Pimba-enhanced / Pimba": 1.96,  # paper 2.1: same cause (product P3/Pimba = 7.2 vs 7.1)
    "ablation W4A8KV4-on-PIM / HBM-PIM": 3.52,  # paper 3.3: the three ablation steps multiply to
    # 6.06 here vs 6.34 in the paper; the split differs (batch-4 linear layers go to the NPU without TEP)
    "ablation +P8 attention on PIM": 1.11,  # paper 1.2
    "energy eff. P3-LLM / NPU-FP16": 6.75,  # paper 6.3: dynamic-energy model ties energy to bit counts
    "energy eff. P3-LLM / HBM-PIM": 4.74,  # paper 3.5: >= 4 for any internal-access energy (16 vs 4 bits)
    "energy eff. P3-LLM / Ecco": 1.75,  # paper 2.1
}


@pytest.fixture(scope="module")
def paper_grid():
    return report.run_grid(PAPER_MODELS, ALL_SYSTEMS, (1, 2, 4, 8), 4096)


def test_paper_averages(paper_grid):
    rows = {r["label"]: r for r in report.paper_comparison(paper_grid)}
    assert len(rows) == len(report.PAPER_TARGETS)
    for label, row in rows.items():
        if label in PINNED_MISSES:
            assert row["measured"] == pytest.approx(PINNED_MISSES[label], rel=0.01), label
        else:
            assert row["measured"] == pytest.approx(row["target"], rel=0.05), label


def test_best_batch_over_ecco(paper_grid):
    # Paper: highest speedup over Ecco at batch 2.  Measured: GQA models peak at batch 2 (their 8
    # kv-heads leave half the channels idle at batch 1), MHA Llama-2 at batch 1; the mean is
    # highest at batch 1 by ~1% (documented gap), and batches 1-2 are far above 4-8.
    per = report.ratios(paper_grid, "p3-llm", "ecco")
    for m in ("llama-3.1-8b", "llama-3.2-3b", "mistral-7b-v0.3"):
        assert per[m, 2] > per[m, 1]
    assert report.best_batch(paper_grid, "p3-llm", "ecco") == 1
    mean = {b: sum(v for (m, bb), v in per.items() if bb == b) / 5 for b in (1, 2, 4, 8)}
    assert mean[2] == pytest.approx(mean[1], rel=0.02) and mean[2] > 1.5 * mean[4]


def test_policy_mapping():
    m = get_model("llama-3.1-8b")
    engines = lambda s, b: {o.name: o.engine for o in decode_step(m, get_system(s), b, 4096).ops}
    assert engines("p3-llm", 4)["down_proj"] == "pim" and engines("p3-llm", 8)["down_proj"] == "npu"
    assert engines("p3-llm", 8)["qk"] == engines("p3-llm", 8)["pv"] == "pim"
    assert engines("hbm-pim", 2)["q_proj"] == "pim" and engines("hbm-pim", 4)["q_proj"] == "npu"
    assert engines("pim-w4a8kv4-tep", 2)["pv"] == "npu"
    assert set(engines("npu-fp16", 1).values()) == {"npu"}
    # pre-RoPE Llama-2 keys: Q.K^T stays on the NPU for the quantized-KV systems
    l2 = {o.name: o.engine for o in decode_step(get_model("llama-2-7b"), get_system("p3-llm"), 1, 4096).ops}
    assert l2["qk"] == "npu" and l2["pv"] == "pim"
    assert get_system("p3-llm", pim_linear_max_batch=8).linear_on_pim(8)


def test_latency_monotone_in_context_and_batch():
    m, s = get_model("llama-3.1-8b"), get_system("p3-llm")
    lat = [decode_step(m, s, 1, c).latency_s for c in (2048, 4096, 8192, 16384)]
    assert lat == sorted(lat) and lat[0] < lat[-1]
    for name in ALL_SYSTEMS:
        lat = [decode_step(m, get_system(name), b, 4096).latency_s for b in (1, 2, 4, 8)]
        assert lat == sorted(lat), name


def test_command_model_step_agrees_with_closed_form():
    m = get_model("llama-3.1-8b")
    for s in ("p3-llm", "hbm-pim"):
        a = decode_step(m, get_system(s), 2, 4096)
        b = decode_step(m, get_system(s), 2, 4096, gemv=command_gemv)
        assert b.latency_s == pytest.approx(a.latency_s, rel=0.02)
        lin_a = {o.name: o.seconds for o in a.ops}
        lin_b = {o.name: o.seconds for o in b.ops}
        assert lin_b["gate_proj"] == pytest.approx(lin_a["gate_proj"], rel=0.01)


def test_memory_footprint():
    m = get_model("llama-2-7b")
    fp16 = decode_step(m, get_system("npu-fp16"), 8, 4096).memory_bytes
    assert fp16["kv_cache"] == 8 * 4096 * 32 * 2 * 4096 * 2
    assert fp16["decoder_weights"] == m.decoder_params * 2
    assert fp16["total"] == pytest.approx(sum(v for k, v in fp16.items() if k != "total"))


def test_json_records_schema(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert report.main(["--models", "llama-3.2-3b", "--batch", "1", "8", "--systems", "p3-llm", "ecco",
                        "--json", str(out)]) == 0
    assert "paper averages" in capsys.readouterr().out
    recs = json.loads(out.read_text())
    assert len(recs) == 4
    for r in recs:
        assert {"model", "system", "batch", "context", "latency_s", "energy_j", "breakdown", "memory_bytes"} <= set(r)
        assert r["model"] == "llama-3.2-3b" and r["context"] == 4096 and r["system"] in ("p3-llm", "ecco")
        assert r["latency_s"] > 0 and r["energy_j"] > 0
        assert sum(o["latency_s"] for o in r["breakdown"]) == pytest.approx(r["latency_s"])
        assert {o["engine"] for o in r["breakdown"]} <= {"npu", "pim"}


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "f.png"
    assert report.main(["--models", "llama-3.2-3b", "--batch", "1", "2", "--plot", str(out)]) == 0
    assert out.stat().st_size > 10_000


def test_config_json_loading(tmp_path):
    cfg = {"num_hidden_layers": 30, "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
           "num_key_value_heads": 3, "vocab_size": 49152, "max_position_embeddings": 8192,
           "_name_or_path": "smollm2-135m"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    m = load_hf_config(tmp_path)
    assert (m.layers, m.hidden, m.kv_heads, m.head_dim, m.group_size, m.post_rope_keys) == (30, 576, 3, 64, 3, True)
    assert get_model(str(tmp_path / "config.json")) == m
    r = decode_step(m, get_system("p3-llm"), 1, 1024)
    assert r.latency_s > 0
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"hidden_size": 4}))
    with pytest.raises(ValueError, match="missing"):
        load_hf_config(bad)


def test_presets_match_paper_table():
    m = MODEL_PRESETS["llama-3.1-8b"]
    assert (m.layers, m.hidden, m.intermediate, m.heads, m.kv_heads, m.vocab, m.head_dim) == (
        32, 4096, 14336, 32, 8, 128256, 128)
    assert not MODEL_PRESETS["llama-2-13b"].post_rope_keys and MODEL_PRESETS["mistral-7b-v0.3"].post_rope_keys


def test_clear_errors(capsys):
    with pytest.raises(ValueError, match="unknown model 'gpt-9'.*config.json"):
        get_model("gpt-9")
    with pytest.raises(ValueError, match="unknown system 'tpu'.*p3-llm"):
        get_system("tpu")
    with pytest.raises(ValueError, match="unknown SystemSpec field"):
        get_system("p3-llm", bogus=1)
    with pytest.raises(FileNotFoundError, match="config.json"):
        get_model("/nonexistent/config.json")
    for argv in (["--models", "gpt-9"], ["--systems", "tpu"], ["--dram", "ddr9"], ["--batch", "0"]):
        with pytest.raises(SystemExit) as e:
            report.main(argv)
        assert e.value.code == 2
    assert "unknown" in capsys.readouterr().err


def test_area_figures():
    a = PimAreaFigures()
    assert a.p3_pe_area_ratio == pytest.approx(1.08, abs=0.01)
    assert a.implied_die_mm2 == pytest.approx(83.4, abs=0.1)
    assert macs_per_area_ratio(P3_PCU_TEP, HBM_PIM_FP16) == pytest.approx(8 / 1.084, rel=0.01)


def test_fast_path_speed():
    t = time.perf_counter()
    report.run_grid(PAPER_MODELS, ALL_SYSTEMS, (1, 2, 4, 8), 4096)
    assert time.perf_counter() - t < 2.0
