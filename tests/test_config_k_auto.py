"""decompose.k: auto (a redundancy-aware k per class, capped) and dataset.part_variants in the run config."""

from __future__ import annotations

import pytest

from phpn_core.config import ConfigError, RunConfig, load_config


def _cfg(**decompose):
    return RunConfig.model_validate({"name": "x", "dataset": {"n_classes": 4},
                                     "decompose": {"k": 3, "target": "prototype", **decompose}})


def test_k_auto_sets_the_cap_and_the_head_options():
    c = _cfg(k="auto", k_cap=4)
    assert c.decompose.k == 4 and c.decompose.k_auto
    opts = c.decompose.head_options()
    assert opts["auto_k"] is True and opts["auto_k_threshold"] == 0.9
    assert _cfg(k="auto").decompose.k == 5  # the default cap
    assert _cfg().decompose.head_options()["auto_k"] is False


def test_digests_of_configs_without_the_new_options_are_unchanged():
    # measured with the code before k_auto, k_cap, k_auto_threshold and part_variants existed: registry entries
    # made then must still be found
    assert _cfg().digest() == "3b577d0edc667e3b"
    assert _cfg(k_cap=9, k_auto_threshold=0.5).digest() == _cfg().digest()  # unused without k: auto
    assert _cfg(k="auto", k_cap=3).digest() != _cfg().digest()
    assert _cfg(k="auto", k_cap=3, k_auto_threshold=0.8).digest() != _cfg(k="auto", k_cap=3).digest()
    assert _cfg(nmf_sparsity=0.0).digest() == _cfg().digest()  # nmf_sparsity added later: 0 is plain NMF
    assert _cfg(nmf_sparsity=0.05).digest() != _cfg().digest()


def test_nmf_sparsity_reaches_the_nmf_options(tmp_path):
    assert "sparsity" not in _cfg().decompose.head_options()["nmf_options"]
    assert _cfg(nmf_sparsity=0.05).decompose.head_options()["nmf_options"]["sparsity"] == 0.05
    p = tmp_path / "c.yaml"
    for bad in ("-0.1", ".nan"):
        p.write_text(f"name: x\ndecompose: {{nmf_sparsity: {bad}}}\n")
        with pytest.raises(ConfigError, match="nmf_sparsity"):
            load_config(p)


def test_bad_k_auto_options_name_the_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: x\ndecompose: {k: auto, k_auto_threshold: 2}\n")
    with pytest.raises(ConfigError, match="k_auto_threshold"):
        load_config(p)
    p.write_text("name: x\ndecompose: {k: sometimes}\n")
    with pytest.raises(ConfigError, match=r"decompose\.k"):
        load_config(p)
    p.write_text("name: x\ndataset: {kind: synthparts, part_variants: 4}\n")
    with pytest.raises(ConfigError, match="part_variants"):
        load_config(p)
