"""bench/gpu/device_check.sh, the GPU run's script, runs here on the CPU with the same synthetic
Llama-3.1-8B-shaped model (2 layers, small caches), so that its GPU run is never its first run.

Without a GPU backend both of its arms ("device" and "host") are the CPU: the device/host comparisons
are then exact, while the checks against the NumPy reference and the composed graph are the real
ones, and every timing the GPU run reports is produced and sane."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SIZES = (1024, 2048)
BUDGET, N_BATCH, LAYERS = 256, 256, 2


@pytest.mark.slow
def test_device_check_script_runs_on_the_cpu(tmp_path):
    cmd = ["sh", str(ROOT / "bench" / "gpu" / "device_check.sh"), str(tmp_path / "out"),
           "--sizes", ",".join(map(str, SIZES)), "--layers", str(LAYERS), "--budget", str(BUDGET),
           "--n-batch", str(N_BATCH), "--check-cells", "768", "--passes", "2", "--model-dir", str(tmp_path)]
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    print(proc.stdout[-3000:])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not list(tmp_path.glob("*.gguf")), "the synthetic model is removed at the end"

    result = json.loads((tmp_path / "out" / "device_check.json").read_text())
    model = result["model"]
    assert (model["n_embd"], model["n_head"], model["n_head_kv"], model["head_dim"]) == (4096, 32, 8, 128)
    assert model["n_layer"] == LAYERS and model["n_vocab"] == 128256

    checks = result["checks"]
    assert checks["failures"] == []
    assert checks["device_layers_fused"] == LAYERS
    for name in ("fused_vs_reference", "fused_vs_composed", "top_positions_vs_reference_share_of_cells",
                 "gram_device_vs_host", "scores_device_vs_host", "top_positions_device_vs_host_share_of_cells", "keys_after_packing_device_vs_host",
                 "logits_device_vs_host_after_eviction"):
        assert checks[name]["value"] <= checks[name]["bound"], name
    assert checks["evicted"] == 768 - BUDGET

    rows = {(r["cells"], r["policy"]): r for r in result["timings"]}
    assert set(rows) == {(n, p) for n in SIZES for p in ("full", "restkv")}
    for n in SIZES:
        full, restkv = rows[(n, "full")], rows[(n, "restkv")]
        for r in (full, restkv):
            assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0
        assert full["score_fused_layers"] == LAYERS
        assert full["score_fused_ms_per_layer"] > 0 and full["score_composed_ms_per_layer"] > 0
        # restkv's cache is budget + one chunk, whatever the length; the full cache grows with it
        assert restkv["n_ctx"] == BUDGET + N_BATCH and restkv["cells_peak"] <= BUDGET + N_BATCH
        assert restkv["kv_bytes"] < full["kv_bytes"]
        assert restkv["scoring_passes"] > 0 and restkv["scoring_fused_layers"] == LAYERS
    assert rows[(SIZES[0], "restkv")]["kv_bytes"] == rows[(SIZES[1], "restkv")]["kv_bytes"]
