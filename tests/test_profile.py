import json

import pytest

from blindsight import profile as P
from blindsight.errors import ProfileError


def doc(**over):
    d = {"format": "blindsight-profile", "version": 1, "model": "m", "num_layers": 2, "num_heads": 2,
         "num_kv_heads": 1, "sink_tokens": 1, "layers": [["dense", "intra"], ["sink", "intra_sink"]]}
    d.update(over)
    return d


def test_roundtrip(tmp_path):
    prof = P.from_json(doc(calibration={"threshold": 0.9}))
    P.save(prof, tmp_path / "p.json")
    back = P.load(tmp_path / "p.json")
    assert back.layers == [["dense", "intra"], ["sink", "intra_sink"]]
    assert back.calibration == {"threshold": 0.9}
    assert back.counts() == {"dense": 1, "sink": 1, "intra": 1, "intra_sink": 1}
    assert list(tmp_path.iterdir()) == [tmp_path / "p.json"]


@pytest.mark.parametrize(
    "over,message",
    [
        (dict(format="other"), "'format'"),
        (dict(version=2), "'version' is 2"),
        (dict(extra=1), "unknown top-level key"),
        (dict(layers=[["dense", "intra"], ["sink", "wide"]]), "layer 1, head 1: unknown category 'wide'"),
        (dict(num_layers=3), "'num_layers' is 3 but 'layers' holds 2"),
        (dict(num_heads=3), "layer 0: has 2 heads, expected num_heads = 3"),
        (dict(layers=[["dense", "intra"], ["sink"]]), "layer 1"),
        (dict(num_kv_heads=0), "num_kv_heads"),
    ],
)
def test_errors_name_the_problem(over, message):
    with pytest.raises(ProfileError, match=message.replace("(", r"\(")):
        P.from_json(doc(**over))


def test_malformed_json(tmp_path):
    (tmp_path / "p.json").write_text("{not json")
    with pytest.raises(ProfileError, match="not valid JSON"):
        P.load(tmp_path / "p.json")
    with pytest.raises(ProfileError, match="not found"):
        P.load(tmp_path / "missing.json")


def test_check_model_names_layer():
    prof = P.from_json(doc())
    with pytest.raises(ProfileError, match="2 layers but the model has 3"):
        prof.check_model(3, [2, 2, 2])
    with pytest.raises(ProfileError, match="layer 1: profile has 2 heads but the model's layer has 4"):
        prof.check_model(2, [2, 4])
    prof.check_model(2, [2, 2], [1, 2])  # exporters may repeat K/V heads


def test_mixed_layer_is_the_benchmarks_layout():
    # read off the original bench/op.py mixed_categories(8)
    assert P.mixed_layer(8) == ("intra", "sink", "intra_sink", "intra", "dense", "sink", "intra", "intra")
    assert P.mixed_layer(3, ("dense", "sink"), offset=1) == ("sink", "dense", "sink")


def test_mixed_profiles_of_the_bench_and_the_demo():
    from blindsight.bench.prefill import profile_mix
    from blindsight.demo import mixed_profile
    from blindsight.flops import ModelDims

    layer = ["intra", "sink", "intra_sink", "intra", "dense"]
    assert P.Profile.mixed(2, 5).layers == [layer, layer]
    # bench/prefill.py: the mixed layer everywhere but layer 0, which is dense
    assert P.Profile.mixed(3, 5, first_dense=True).layers == [["dense"] * 5, layer, layer]
    dims = ModelDims("m", num_layers=3, hidden_size=8, num_heads=5, num_kv_heads=1, head_dim=8, intermediate_size=8,
                     vocab_size=8)
    assert profile_mix(dims) == [["dense"] * 5, layer, layer]
    # bs-demo: the four categories in turn, one place further along per layer
    demo = mixed_profile(3, 7, 1)
    assert demo.layers == [
        ["dense", "sink", "intra", "intra_sink", "dense", "sink", "intra"],
        ["sink", "intra", "intra_sink", "dense", "sink", "intra", "intra_sink"],
        ["intra", "intra_sink", "dense", "sink", "intra", "intra_sink", "dense"],
    ]
    assert demo.num_kv_heads == 1 and demo.model.startswith("bs-demo")
