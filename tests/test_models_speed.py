"""projects/benchmarks/models_speed.py: the interleaving schedule, the per-round ratio and the
FrozenBN calibration that keeps random-weight R-50 activations at unit scale."""

import torch

from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model

import models_speed as ms  # projects/benchmarks, on pytest's pythonpath


def test_rounds_alternate_order_and_slow_models_take_the_first_rounds_only():
    got = [order for _, order in ms._orders(["a", "b", "c"], 4, {"b": 2})]
    assert got == [["a", "b", "c"], ["c", "b", "a"], ["a", "c"], ["c", "a"]]


def test_median_ratio_is_per_round():
    # medians of the times would give 4 / 2 = 2; the per-round ratios are 1, 1, 10 -> 1
    assert ms.median_ratio([1.0, 4.0, 100.0], [1.0, 4.0, 10.0]) == 1.0


def test_frozen_bn_calibration_normalises_each_layer_input():
    torch.manual_seed(0)
    cfg = ms.load_cfg("configs/fpn_R_50_deeplesion.yaml")
    assert cfg.MODEL.WEIGHTS == "" and cfg.MODEL.DEVICE == "cpu"
    model = build_model(cfg).eval()
    inputs = [ms.ct_input(64)]
    seen = {}
    norms = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    hooks = [
        m.register_forward_hook(lambda m, a, out: seen.__setitem__(m, out.clone()))
        for m in norms[:4] + norms[-2:]
    ]  # cloned: ReLUs run in place on these outputs
    assert ms.calibrate_frozen_bn(model, inputs) == len(norms) == 53
    with torch.no_grad():
        model.inference(inputs)
    for h in hooks:
        h.remove()
    for out in seen.values():  # after calibration each FrozenBN output is standardised per channel
        mean, var = out.mean(dim=(0, 2, 3)), out.var(dim=(0, 2, 3), unbiased=False)
        assert torch.allclose(mean, torch.zeros_like(mean), atol=1e-3)
        # var / (var + eps): 1 except for channels whose input barely varies (eps = 1e-5 dominates)
        assert (var <= 1.0 + 1e-3).all() and (var > 0.99).float().mean() > 0.9


def test_trpn_keeps_every_location_when_timed():
    assert ms.load_cfg("configs/elixirnet_R_50_FPN_deeplesion.yaml").MODEL.TRPN.THRESHOLD == 0.0
    assert (
        ms.load_cfg(
            "configs/elixirnet_R_50_FPN_deeplesion.yaml", trpn_keep_all=False
        ).MODEL.TRPN.THRESHOLD
        < 0
    )


def test_inference_rounds_cycle_over_the_given_batches(monkeypatch):
    seen = []

    def fake(model, inputs):
        seen.append((model, inputs[0]["id"]))
        return {s: 0.0 for s in ms.STAGES + ("total", "num_proposals")}

    monkeypatch.setattr(ms, "staged_inference", fake)
    models = {"FPN": torch.nn.Linear(1, 1), "other": torch.nn.Linear(1, 1)}
    batches = [[{"id": 0}], [{"id": 1}], [{"id": 2}]]
    ms.time_inference(models, [{"id": -1}], rounds=4, warmup=1, batches=batches)
    ids = [i for _, i in seen]
    # warm-up round 0 (both models), then rounds 0..3 with images 0, 1, 2, 0; never `inputs`
    assert ids == [0, 0, 0, 0, 1, 1, 2, 2, 0, 0]


def test_trained_weights_keep_the_configured_trpn_and_their_genotype(tmp_path):
    from elixir_d2.checkpoint import AtomicCheckpointer
    from elixir_d2.modeling.alb.genotype import derive_genotype, genotype_to_yaml
    from elixir_d2.modeling.alb.spaces import get_search_space

    config = "configs/quickstart/elixirnet.yaml"
    cfg = ms.load_cfg(config, trpn_keep_all=False)
    # Trained with another genotype than the config's: load_trained must take the checkpoint's.
    gen = torch.Generator().manual_seed(3)
    shape = (14, len(get_search_space("elixir")))
    other = derive_genotype(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen))
    cfg.MODEL.ALB.GENOTYPE, cfg.MODEL.ALB.GENOTYPE_YAML = "", genotype_to_yaml(other)
    torch.manual_seed(1)
    model = build_model(cfg)
    assert model.roi_heads.box_head.genotype == other
    AtomicCheckpointer(model, save_dir=str(tmp_path)).save("trained")
    path = str(tmp_path / "trained.pth")
    got_cfg, got = ms.load_trained(config, path)
    assert got_cfg.MODEL.TRPN.THRESHOLD == cfg.MODEL.TRPN.THRESHOLD != 0.0
    assert got.roi_heads.box_head.genotype == other
    ref = model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in got.state_dict().items())


def test_weights_must_name_every_timed_model():
    import pytest

    with pytest.raises(
        ValueError,
        match=r"give one for each timed model: \['FPN', "
        r"'ElixirNet w FPN'\]",
    ):
        ms.measure(quick=True, specs=ms.select("ElixirNet w FPN"), weights={"FPN": "x.pth"})


def test_search_head_benchmark_times_both_layouts_and_restores_the_shipped_one():
    # The "ops' own layouts" variant swaps cells.channels_last for the identity while it runs;
    # afterwards (and after an error) the mixed ops must be back on the shipped function.
    import search_head

    from elixir_d2.modeling.alb import cells

    shipped = cells.channels_last
    times = search_head.time_layouts(rounds=2, rois=8, repeats=1)
    assert list(times) == ["channels_last sum (shipped)", "ops' own layouts"]
    assert all(len(ts) == 2 and all(t > 0 for t in ts) for ts in times.values())
    assert cells.channels_last is shipped


def test_optimizer_step_benchmark_times_both_and_checks_equality():
    import optimizer_step

    times, n = optimizer_step.time_steps("fpn.yaml", rounds=2, steps=2)
    assert list(times) == ["detectron2 loop", "batched (shipped)"]
    assert all(len(v) == 2 and min(v) > 0 for v in times.values())
    model = build_model(optimizer_step.load_config("configs/quickstart/fpn.yaml", []))
    assert n == len(list(model.parameters()))


def test_lesion_sizes_breakdown_by_hand():
    import lesion_sizes as ls

    inf = float("inf")
    # 2 images; false-positive scores 0.9, 0.8, 0.7, 0.6, 0.5: at 1 FP an image two are allowed,
    # so a lesion counts as found when its hit scores above the third, 0.7.
    fps = [0.5, 0.9, 0.7, 0.8, 0.6]
    assert ls.score_at_fps(fps, 2, 1.0) == 0.7
    assert ls.score_at_fps(fps, 2, 4.0) == -inf  # 8 allowed, 5 made
    lesions = [
        ls.Lesion(5.0, 3.0, 0.2, -inf),  # 0-6: no proposal, never detected
        ls.Lesion(8.0, 4.0, 0.4, 0.75),  # 6-10: proposal at 0.3 only, found at 1 FP
        ls.Lesion(9.0, 6.0, 0.6, 0.65),  # 6-10: found only at a lower score
        ls.Lesion(25.0, 14.0, 0.9, 0.95),  # 20-inf
        ls.Lesion(float("nan"), 5.0, 0.9, 0.95),  # no diameter: in no bucket
    ]
    rows = ls.breakdown(lesions, fps, num_images=2, fps=1.0)
    assert [(r["lo"], r["hi"], r["lesions"]) for r in rows] == [(0, 6, 1), (6, 10, 2), (20, inf, 1)]
    six_ten = rows[1]
    assert six_ten["median_width_px"] == 5.0
    assert six_ten["proposal_iou50"] == 50.0 and six_ten["proposal_iou30"] == 100.0
    assert six_ten["found_at_1fp"] == 50.0 and six_ten["found_any_score"] == 100.0
    assert rows[0]["found_any_score"] == 0.0 and rows[2]["found_at_1fp"] == 100.0


def test_every_sweep_file_names_configs_and_keys_that_load():
    # A sweep that names a missing config or key fails only after its first training; catch it here.
    import glob
    import json

    import regime_sweep

    from elixir_d2 import load_config

    files = sorted(glob.glob("projects/benchmarks/sweeps/*.json"))
    assert len(files) >= 7
    for path in files:
        with open(path, encoding="utf-8") as f:
            sweep = json.load(f)
        for name, (config, items, *_) in sweep["variants"].items():
            opts = regime_sweep.expand(items, sweep.get("groups", {}))
            assert len(opts) % 2 == 0, (path, name)
            load_config(config, opts)  # raises on an unknown key or a bad value


def test_sweep_expand_takes_group_names_only_where_a_key_is_expected():
    import pytest
    import regime_sweep

    groups = {"BN": ["MODEL.RESNETS.NORM", "BN"], "W": ["A.B", "1", "C.D", "2"]}
    got = regime_sweep.expand(["W", "MODEL.FPN.NORM", "BN", "BN"], groups)
    assert got == ["A.B", "1", "C.D", "2", "MODEL.FPN.NORM", "BN", "MODEL.RESNETS.NORM", "BN"]
    with pytest.raises(ValueError, match="SEED"):
        regime_sweep.expand(["W", "SEED"], groups)


def test_sweep_json_holds_each_variant_and_the_provenance(tmp_path, monkeypatch, capsys):
    import json

    import pytest
    import regime_sweep

    import elixir_d2.provenance

    checkout = {"commit": "at-start", "dirty": False}  # edited by the variants' runs below
    monkeypatch.setattr(elixir_d2.provenance, "code_state", lambda *a, **k: dict(checkout))

    def run_variant(name, spec, groups, args):
        checkout.update(commit="later", dirty=True)
        return {"mean_sens_iou": len(name)}

    monkeypatch.setattr(regime_sweep, "run_variant", run_variant)
    spec = tmp_path / "sweep.json"
    spec.write_text(
        json.dumps({"variants": {"a": ["x.yaml", []], "bb": ["x.yaml", []]}}), encoding="utf-8"
    )
    argv = ["--output", str(tmp_path / "out"), "--jobs", "1", str(spec)]  # options first
    (tmp_path / "out").mkdir()
    regime_sweep.main(argv)
    out = json.loads((tmp_path / "out" / "sweep.json").read_text(encoding="utf-8"))
    assert list(out) == ["provenance", "a", "bb"]
    assert out["a"] == {"mean_sens_iou": 1} and out["bb"] == {"mean_sens_iou": 2}
    assert out["provenance"]["command"] == [regime_sweep.__file__, *argv]
    assert out["provenance"]["commit"] == "at-start"  # taken when the sweep started
    table = capsys.readouterr().out
    assert "| a | " in table and "| bb | " in table and "provenance" not in table
    spec.write_text(json.dumps({"variants": {"provenance": ["x.yaml", []]}}), encoding="utf-8")
    with pytest.raises(SystemExit):
        regime_sweep.main(argv)


def test_rpn_head_weights_reports_each_tensor_against_its_init(tmp_path):
    import pytest
    import rpn_head_weights as rw

    # Objectness weights -1, 3, -1, -1: mean 0, std 2 (unbiased), one of four above zero.
    state = {
        "model": {
            "proposal_generator.rpn_head.objectness_logits.weight": torch.tensor(
                [-1.0, 3.0, -1.0, -1.0]
            ).view(1, 4, 1, 1),
            "proposal_generator.rpn_head.objectness_logits.bias": torch.tensor([0.5]),
            "backbone.stem.conv1.weight": torch.ones(1),
        }
    }
    path = str(tmp_path / "model_final.pth")
    torch.save(state, path)
    lines = rw.report(path)
    assert lines[0] == path
    weight = next(line for line in lines if "objectness_logits.weight" in line)
    assert "mean +0.0000" in weight and "std 2.0000" in weight and "init N(0, 0.01)" in weight
    bias = next(line for line in lines if "objectness_logits.bias" in line)
    assert "mean +0.5000" in bias and "init -" in bias
    assert lines[-1].strip() == "objectness weights > 0: 25.0%"
    assert not any("backbone" in line for line in lines)

    torch.save({"model": {"backbone.stem.conv1.weight": torch.ones(1)}}, path)
    with pytest.raises(ValueError, match="no tensor under 'proposal_generator.rpn_head.'"):
        rw.report(path)
