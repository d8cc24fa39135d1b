"""Tests of what AWQ and the scale search record per layer, and of the report's ``awq`` and ``scale_search`` plots.

The records come from the real pipeline on a tiny random MiniGPT; the plots are drawn from results.json-shaped
dicts, with the report's own figure factory but a ``save`` that hands the figure back, so the tests read what
was drawn (titles, legend entries, points) rather than pixels.
"""
import pytest
import torch

from quantlab.calibrate import quantize_model
from quantlab.quant import MSE_SHRINK_GRID, Scheme, fp16_ceil, quantize_rtn, scale_shrinks, shrink_counts
from quantlab.report import awq as awq_plot
from quantlab.report import make_plots, plots
from quantlab.report import scale_search as search_plot
from quantlab.results import LayerStats, RunResult
from quantlab.spec import load_spec

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NAMES = [f"blocks.{b}.{kind}" for b in range(2) for kind in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
INT4 = {"bits": 4, "granularity": "group", "group_size": 64, "symmetric": True, "grid": "restricted"}
GPTQ = {**INT4, "method": "gptq", "act_order": False, "static_groups": False, "damp": 0.01, "block_size": 128}


def drawn(draw, results):
    """The matplotlib Figure ``draw`` (plot_awq or plot_scale_search) makes of ``results``, or None."""
    return draw(results, None, plots._figure, lambda fig, path: fig)


def legend_labels(ax):
    legend = ax.get_legend()
    return [t.get_text() for t in legend.get_texts()] if legend else []


# ---------------------------------------------------------------------------------------------
# Shrink factors (quantlab.quant)


def test_shrinks_are_one_for_absmax_and_reproduce_the_stored_mse_scales():
    W = torch.randn(16, 128, generator=torch.Generator().manual_seed(0))
    W[3, 5] = 9.0   # an outlier: its group's search shrinks the range most
    absmax = quantize_rtn(W, Scheme(4, group_size=32))
    assert torch.equal(scale_shrinks(W, absmax), torch.ones(16, 4))
    searched = quantize_rtn(W, Scheme(4, group_size=32, scale_search="mse"))
    shrinks = scale_shrinks(W, searched)
    counts = shrink_counts(shrinks)
    assert "other" not in counts and sum(counts.values()) == 16 * 4 and shrinks.max() <= 1.0
    # Snapped to the grid, each group's factor gives back exactly its stored scale: absmax x factor / 7, rounded up.
    factors = torch.tensor([float(min(MSE_SHRINK_GRID, key=lambda f: abs(f - v))) for v in shrinks.flatten()])
    group_absmax = W.abs().reshape(16, 4, 32).amax(dim=2).flatten()
    assert torch.equal(fp16_ceil(group_absmax * factors / 7), searched.scales.flatten())


def test_shrink_counts_are_keyed_by_grid_factor_in_grid_order_with_off_grid_values_apart():
    counts = shrink_counts(torch.tensor([[1.0, 0.9249, 0.9251, 0.5, 1.2, float("nan")]]))
    assert counts == {"1.000": 1, "0.925": 2, "0.500": 1, "other": 1}
    assert list(counts) == ["1.000", "0.925", "0.500", "other"]


# ---------------------------------------------------------------------------------------------
# What the pipeline records


@pytest.fixture(scope="module")
def calibration():
    return torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))


def test_every_quantized_layer_records_its_weight_error_and_mse_schemes_their_shrink_factors(minigpt, calibration):
    plain = quantize_model(minigpt, Scheme(4, group_size=16), None, method="rtn")
    searched = quantize_model(minigpt, Scheme(4, group_size=16, scale_search="mse"), None, method="rtn")
    for name, layer in searched.layers.items():
        W = minigpt.module.get_submodule(name).weight.detach()
        expected = float((W - searched.qtensors[name].dequantize()).square().sum() / W.square().sum())
        assert layer["weight_rel_error"] == pytest.approx(expected, rel=1e-5)
        # The search minimises each group's squared error, so the layer's can only fall.
        assert layer["weight_rel_error"] <= plain.layers[name]["weight_rel_error"]
        rows, groups = searched.qtensors[name].scales.shape
        assert sum(layer["shrink_counts"].values()) == rows * groups and "other" not in layer["shrink_counts"]
        assert 0.5 <= layer["shrink_mean"] < 1.0
    assert all("shrink_counts" not in layer and "shrink_mean" not in layer for layer in plain.layers.values())


def test_awq_layers_record_their_input_group_and_shrinks_of_the_scaled_weights(minigpt, calibration):
    awq = quantize_model(minigpt, Scheme(4, group_size=16, scale_search="mse"), calibration, method="awq")
    names = minigpt.all_linear_names()
    # MiniGPT's input groups are single Linears (c_attn is q, k and v fused).
    assert [awq.layers[n]["awq_group"] for n in names] == names
    for name in names:
        layer = awq.layers[name]
        assert layer["weight_rel_error"] is not None and sum(layer["shrink_counts"].values()) > 0
        # Shrinks are read against the weights that were quantized (W s): on the grid, never 'other'.
        assert "other" not in layer["shrink_counts"]


def test_the_new_layer_records_survive_results_json():
    layer = LayerStats(rel_loss=0.1, awq_alpha=0.3, awq_group="blocks.0.attn.c_attn", weight_rel_error=0.01,
                       shrink_mean=0.9, shrink_counts={"1.000": 3, "0.900": 5})
    assert LayerStats.from_json(layer.to_json()) == layer
    assert "shrink_counts" not in LayerStats(rel_loss=0.1).to_json()


# ---------------------------------------------------------------------------------------------
# The awq plot


def awq_results(with_twin=True):
    """RTN, GPTQ, AWQ and AWQ+GPTQ on two blocks; layers j, j+1 of a block's attention share nothing (as in
    MiniGPT), the MLP's two share one group here, so groups of two show."""
    groups = {n: n for n in NAMES}
    for b in range(2):
        groups[f"blocks.{b}.mlp.c_proj"] = f"blocks.{b}.mlp.c_fc"
    schemes = {"fp32": {"method": "float"}, "int4": {**INT4, "method": "rtn"},
               "int4-awq": {**INT4, "method": "awq", "awq": True}, "int4-awq-gptq": {**GPTQ, "awq": True}}
    rtn = {n: 1e-3 * (j + 2) for j, n in enumerate(NAMES)}
    results = {
        "fp32": {"layers": {}},
        "int4": {"layers": {n: {"rel_loss": None, "rtn_rel_loss": None} for n in NAMES}},
        # AWQ helps on every layer but the first (alpha 0 there: RTN exactly).
        "int4-awq": {"layers": {n: {"rel_loss": rtn[n] * (1.0 if j == 0 else 0.8), "rtn_rel_loss": rtn[n],
                                    "awq_alpha": 0.0 if j == 0 else 0.3, "awq_group": groups[n]}
                                for j, n in enumerate(NAMES)}},
        "int4-awq-gptq": {"layers": {n: {"rel_loss": rtn[n] / 5, "rtn_rel_loss": rtn[n], "awq_alpha": 0.2,
                                         "awq_group": groups[n]} for n in NAMES}},
    }
    if with_twin:
        schemes["int4-gptq"] = dict(GPTQ)
        results["int4-gptq"] = {"layers": {n: {"rel_loss": rtn[n] / 4, "rtn_rel_loss": rtn[n]} for n in NAMES}}
    return {"spec": "test/awq", "baseline": "fp32", "schemes": schemes, "results": results}


def test_awq_plot_draws_alpha_and_the_error_with_awq_against_rtn_for_every_awq_scheme():
    results = awq_results()
    assert list(awq_plot.awq_layers(results)) == ["int4-awq", "int4-awq-gptq"]
    fig = drawn(awq_plot.plot_awq, results)
    tops = [ax for ax in fig.axes if ax.get_ylabel() == "alpha"]
    bottoms = [ax for ax in fig.axes if ax.get_ylabel().startswith("relative output error")]
    assert len(tops) == len(bottoms) == 2 and len(fig.axes) == 4   # alpha and errors, per AWQ scheme
    (alpha_awq, alpha_both), (errors_awq, errors_both) = tops, bottoms
    # 8 layers: the two schemes side by side, their errors on one scale.
    assert errors_awq.get_position().x0 < errors_both.get_position().x0 and errors_awq.get_ylim() == errors_both.get_ylim()
    assert [p.get_height() for p in alpha_awq.patches if p.get_width() == pytest.approx(0.7)] == \
        pytest.approx([0.0] + [0.3] * 7)
    assert "int4-awq" in alpha_awq.get_title() and "below round-to-nearest's on 7 of 8 layers" in alpha_awq.get_title()
    assert legend_labels(errors_awq) == ["round-to-nearest, same layer and inputs", "AWQ (then round-to-nearest)"]
    # AWQ then GPTQ: the spec's GPTQ without AWQ on the same grid is drawn beside it.
    assert "int4-gptq: GPTQ without AWQ (its own run)" in legend_labels(errors_both)
    assert "AWQ then GPTQ" in alpha_both.get_title() and errors_both.get_yscale() == "log"
    red = [line for line in errors_both.get_lines() if line.get_color() == "tab:red"][0]
    assert list(red.get_ydata()) == pytest.approx([1e-3 * (j + 2) / 5 for j in range(8)])
    assert [label.get_text() for label in errors_awq.get_xticklabels()][:2] == ["0.attn.c_attn", "0.attn.c_proj"]


def test_awq_plot_of_a_deep_model_puts_one_scheme_per_row():
    names = [f"model.layers.{b}.{kind}" for b in range(10) for kind in ("q_proj", "k_proj", "v_proj", "o_proj")]
    layers = {n: {"rel_loss": 1e-3, "rtn_rel_loss": 2e-3, "awq_alpha": 0.3, "awq_group": n.rsplit(".", 1)[0]
                  + (".o_proj" if n.endswith("o_proj") else ".q_proj")} for n in names}
    results = {"baseline": "fp32", "schemes": {"a": {**INT4, "method": "awq"}, "b": {**INT4, "method": "awq"}},
               "results": {"a": {"layers": layers}, "b": {"layers": layers}}}
    fig = drawn(awq_plot.plot_awq, results)
    bottoms = [ax for ax in fig.axes if ax.get_ylabel().startswith("relative output error")]
    assert bottoms[0].get_position().y0 > bottoms[1].get_position().y0   # stacked, not side by side
    # q, k and v share one input: 20 groups of 3 and 1 layers, shaded alternately.
    assert awq_plot.input_groups(names, layers)[:2] == [(0, 2), (3, 3)]


def test_awq_plot_shades_input_groups_and_needs_no_gptq_twin():
    results = awq_results(with_twin=False)
    names = list(awq_plot.awq_layers(results)["int4-awq"])
    layers = awq_plot.awq_layers(results)["int4-awq"]
    assert awq_plot.input_groups(names, layers) == [(0, 0), (1, 1), (2, 3), (4, 4), (5, 5), (6, 7)]
    assert awq_plot.gptq_twin(results, "int4-awq-gptq") is None
    fig = drawn(awq_plot.plot_awq, results)
    assert not any("without AWQ" in label for ax in fig.axes for label in legend_labels(ax))
    assert awq_plot.gptq_twin(awq_results(), "int4-awq-gptq") == "int4-gptq"
    assert awq_plot.gptq_twin(awq_results(), "int4-awq") is None   # AWQ then RTN: RTN is the comparison


def test_awq_sentences_give_the_alpha_range_and_where_awq_beats_rtn():
    first, second = awq_plot.awq_sentences(awq_results())
    assert first.startswith("AWQ, int4-awq: alpha 0 to 0.3") and "1 of 8 layers at 0" in first
    assert "below round-to-nearest's on 7 of 8 layers" in first and "on 8 of 8 layers" in second


# ---------------------------------------------------------------------------------------------
# The scale_search plot


def search_results(with_twins=True):
    """RTN and GPTQ at INT4 g64 with and without scale_search mse: RTN records weight errors only (no
    calibration), GPTQ output errors too; GPTQ's dynamic groups put a few shrinks off the grid."""
    schemes = {"fp32": {"method": "float"},
               "int4-mse": {**INT4, "method": "rtn", "scale_search": "mse"},
               "int4-gptq-mse": {**GPTQ, "scale_search": "mse"}}
    results = {
        "fp32": {"layers": {}},
        "int4-mse": {"layers": {n: {"rel_loss": None, "weight_rel_error": 0.8e-3, "shrink_mean": 0.91,
                                    "shrink_counts": {"1.000": 2, "0.925": 6, "0.900": 2}} for n in NAMES}},
        "int4-gptq-mse": {"layers": {n: {"rel_loss": 0.9e-4 if j % 2 else 1.1e-4, "weight_rel_error": 1e-3,
                                         "shrink_mean": 0.93, "shrink_counts": {"1.000": 3, "0.950": 6, "other": 1}}
                                     for j, n in enumerate(NAMES)}},
    }
    if with_twins:
        schemes.update({"int4": {**INT4, "method": "rtn"}, "int4-gptq": dict(GPTQ)})
        results.update({"int4": {"layers": {n: {"rel_loss": None, "weight_rel_error": 1e-3} for n in NAMES}},
                        "int4-gptq": {"layers": {n: {"rel_loss": 1e-4, "weight_rel_error": 0.9e-3} for n in NAMES}}})
    return {"spec": "test/search", "baseline": "fp32", "schemes": schemes, "results": results}


def test_scale_search_plot_compares_each_scheme_with_its_absmax_twin_on_the_error_both_measured():
    results = search_results()
    assert search_plot.absmax_twin(results, "int4-mse") == "int4"
    assert search_plot.absmax_twin(results, "int4-gptq-mse") == "int4-gptq"
    # RTN has no output error without calibration: its weight error is compared; GPTQ's output error.
    assert search_plot.error_ratios(results, "int4-mse", "int4", NAMES) == ("weight_rel_error", pytest.approx([0.8] * 8))
    metric, ratios = search_plot.error_ratios(results, "int4-gptq-mse", "int4-gptq", NAMES)
    assert metric == "rel_loss" and ratios == pytest.approx([1.1, 0.9] * 4)
    fig = drawn(search_plot.plot_scale_search, results)
    ratio_ax, hist_ax, shrink_ax = fig.axes
    # Schemes in the report's order (largest first, then by name: here all sizes are unknown).
    assert legend_labels(ratio_ax) == ["int4-gptq-mse / int4-gptq (output error): mean 1, lower on 4 of 8",
                                       "int4-mse / int4 (weight error): mean 0.8, lower on 8 of 8"]
    assert legend_labels(shrink_ax) == ["int4-gptq-mse", "int4-mse"]
    # The histogram: every factor either scheme chose, 1.000 first, off-grid shrinks last, as shares of groups.
    assert [t.get_text() for t in hist_ax.get_yticklabels()] == ["1.000", "0.950", "0.925", "0.900", "other"]
    widths = [p.get_width() for p in hist_ax.patches]
    assert widths[:5] == pytest.approx([0.3, 0.6, 0, 0, 0.1]) and widths[5:] == pytest.approx([0.2, 0.0, 0.6, 0.2, 0.0])


def test_scale_search_plot_without_a_twin_says_what_to_add():
    fig = drawn(search_plot.plot_scale_search, search_results(with_twins=False))
    ratio_ax = fig.axes[0]
    assert ratio_ax.get_legend() is None
    assert any("add the same scheme without it" in t.get_text() for t in ratio_ax.texts)
    # A twin that recorded no per-layer error (results from before weight_rel_error) is named, not drawn.
    results = search_results()
    for scheme in ("int4", "int4-gptq"):
        results["results"][scheme]["layers"] = {n: {"rel_loss": None} for n in NAMES}
    texts = [t.get_text() for t in drawn(search_plot.plot_scale_search, results).axes[0].texts]
    assert texts == ["int4-gptq, int4: no per-layer error recorded to compare with"]


# ---------------------------------------------------------------------------------------------
# Registration, empty states, the catalogue specs


def test_both_plots_are_in_the_one_table_the_spec_and_the_report_read():
    from quantlab import spec

    assert {"awq", "scale_search"} <= set(plots.PLOTS) and spec.PLOTS is plots.PLOTS
    assert set(plots.PLOT_CAPTIONS) == set(plots.PLOTS)


def test_make_plots_writes_both_from_results_and_skips_them_without_awq_or_search(tmp_path):
    results = {**awq_results(), "schemes": {**awq_results()["schemes"], **search_results()["schemes"]},
               "results": {**awq_results()["results"], **search_results()["results"]}}
    written = make_plots(results, tmp_path, ["awq", "scale_search"])
    assert sorted(written) == ["awq", "scale_search"]
    assert all(path.read_bytes().startswith(PNG_SIGNATURE) for path in written.values())
    plain = {"spec": "test/plain", "baseline": "fp32", "schemes": {"int4": {**INT4, "method": "rtn"}},
             "results": {"int4": {"layers": {n: {"rel_loss": 1e-3, "weight_rel_error": 1e-3} for n in NAMES}}}}
    assert make_plots(plain, tmp_path / "none", ["awq", "scale_search"]) == {}
    assert drawn(awq_plot.plot_awq, plain) is None and drawn(search_plot.plot_scale_search, plain) is None


def test_both_plots_render_from_a_results_json_round_trip(tmp_path):
    """The plots read what results.json holds: typed LayerStats written and read back."""
    results = {**search_results(), "spec_sha256": "ab" * 32, "source": "s.yaml", "seed": 0, "fingerprint": {}}
    run = RunResult.from_json({**results, "results": {s: {"layers": v["layers"]} for s, v in results["results"].items()}})
    assert sorted(make_plots(run, tmp_path, ["scale_search"])) == ["scale_search"]


@pytest.mark.parametrize("path", ["specs/minigpt/methods.yaml", "specs/smollm2/methods.yaml"])
def test_the_methods_catalogue_specs_request_both_plots(path):
    spec = load_spec(path)
    assert {"awq", "scale_search"} <= set(spec.report.plots)


def test_scale_search_sentences_give_the_commonest_factor_and_the_error_against_the_twin():
    gptq, rtn = search_plot.scale_search_sentences(search_results())
    assert gptq.startswith("Scale search, int4-gptq-mse: the most chosen shrink factor is 0.950 (60% of groups)")
    assert "30% keep the absmax scale" in gptq and "output error is 1x int4-gptq's on average, lower on 4 of 8" in gptq
    assert "weight error is 0.8x int4's on average, lower on 8 of 8 layers" in rtn
    assert "on average" not in search_plot.scale_search_sentences(search_results(with_twins=False))[0]


def test_the_interpretation_carries_the_awq_and_scale_search_sentences():
    from quantlab.report.page import interpretation

    results = {**awq_results(), "schemes": {**awq_results()["schemes"], **search_results()["schemes"]},
               "results": {**awq_results()["results"], **search_results()["results"]}}
    text = " ".join(interpretation(results))
    assert "AWQ, int4-awq-gptq:" in text and "Scale search, int4-mse:" in text


def test_layers_are_drawn_in_call_order_not_in_results_json_sorted_order():
    llama = ["model.layers.0.mlp.down_proj", "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj",
             "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.o_proj", "model.layers.0.self_attn.q_proj",
             "model.layers.0.self_attn.v_proj", "model.layers.10.self_attn.q_proj", "model.layers.2.self_attn.q_proj"]
    assert sorted(llama, key=awq_plot.model_order_key) == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj",
        "model.layers.0.self_attn.o_proj", "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj",
        "model.layers.0.mlp.down_proj", "model.layers.2.self_attn.q_proj", "model.layers.10.self_attn.q_proj"]
    # GPT-2 naming: c_proj is the attention's output in attn and the MLP's second Linear in mlp.
    assert sorted(sorted(NAMES), key=awq_plot.model_order_key) == NAMES
    results = awq_results()
    results["results"]["int4-awq"]["layers"] = dict(sorted(results["results"]["int4-awq"]["layers"].items()))
    assert list(awq_plot.awq_layers(results)["int4-awq"]) == NAMES
    assert list(search_plot.searched_layers(search_results())["int4-mse"]) == NAMES
