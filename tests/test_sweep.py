"""Every causal-LM model type transformers registers, built small from its config, goes through
kvtune's architecture check without a crash: it is served (and the shape its config gives before
loading is the loaded model's, where the config says one), or refused with a ModelError naming the
family and the obstacle (tests/sweep.py; the README's family table comes from the same sweep)."""

import warnings

from tests.sweep import causal_lm_types, classify


def test_no_causal_lm_family_crashes_the_architecture_check():
    crashed, rows = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for model_type in causal_lm_types():
            try:
                rows.append(classify(model_type))
            except Exception as e:  # noqa: BLE001 - what the test is looking for
                crashed.append(f"{model_type}: {type(e).__name__}: {e}")
    assert not crashed, crashed
    status = {row["model_type"]: row["status"] for row in rows}
    assert not [row for row in rows if row["status"] == "config shape differs"]
    # The sweep reaches most families (a config that needs more than defaults is "not built").
    assert sum(s != "not built" for s in status.values()) >= 0.75 * len(status)
    for served in ("llama", "qwen2", "qwen3_moe", "gemma2", "gpt_oss", "mimo_v2_flash", "gemma4_text", "lfm2"):
        assert status[served] == "served", served
    refused = {row["model_type"]: row["detail"] for row in rows if row["status"] == "refused"}
    assert "compressed latent" in refused["deepseek_v3"] and "cache of its own" in refused["minimax"]
    assert all(text for text in refused.values())
