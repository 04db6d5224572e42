"""Property tests: any input to the plan parser, the labels and captions readers and the world
parameters gives a result or our one-line error (a SurgeryError), never another exception."""
from __future__ import annotations

import json
import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from surgery.edit.plan import SurgeryPlan
from surgery.errors import SurgeryError
from surgery.io.captions import load_captions
from surgery.io.labels import load_labels
from surgery.world.params import WorldParams

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
scalars = st.none() | st.booleans() | st.integers(-3, 40) | st.floats(allow_nan=True, allow_infinity=True) \
    | st.text(max_size=12)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
HEAD_KEYS = ["tower", "layer", "head", "scale", "ablation", "mean", "extra"]
NEURON_KEYS = ["tower", "sae", "ids", "alpha", "form", "site", "kind", "k"]
edit_like = st.fixed_dictionaries({}, optional={k: json_values | st.sampled_from(["vision", "text", "mean", "zero"])
                                                for k in HEAD_KEYS + NEURON_KEYS})
plan_like = st.fixed_dictionaries({}, optional={
    "schema": st.just("clipsurgery.plan/1") | json_values, "source": json_values, "provenance": json_values,
    "heads": st.lists(edit_like, max_size=3) | json_values, "neurons": st.lists(edit_like, max_size=2) | json_values,
    "other": json_values})


def _ours_or_result(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except SurgeryError as exc:
        assert "\n" not in str(exc).strip(), str(exc)  # one line
        return None


@SETTINGS
@given(plan_like | json_values)
def test_plan_parser(data):
    plan = _ours_or_result(SurgeryPlan.from_dict, data)
    if plan is not None:  # what parses validates and round-trips
        assert SurgeryPlan.from_dict(json.loads(json.dumps(plan.to_dict()))).to_dict() == plan.to_dict()


@SETTINGS
@given(st.binary(max_size=300) | st.text(alphabet=string.printable + "éß,\"\n", max_size=300).map(str.encode))
def test_plan_file(tmp_path, raw):
    path = tmp_path / "plan.json"
    path.write_bytes(raw)
    _ours_or_result(SurgeryPlan.load, str(path))


csv_cells = st.text(alphabet=string.ascii_letters + string.digits + " ,.\"'/_-é", max_size=10)
csv_text = st.lists(st.lists(csv_cells, min_size=0, max_size=4), max_size=6).map(
    lambda rows: "\n".join(",".join(r) for r in rows))


@SETTINGS
@given(csv_text | st.just("file,group\n\n"), st.booleans())
def test_labels_reader(tmp_path, text, with_images):
    path = tmp_path / "labels.csv"
    path.write_text(text, encoding="utf-8")
    images = tmp_path / "imgs"
    images.mkdir(exist_ok=True)
    _ours_or_result(load_labels, str(path), str(images) if with_images else None)


@SETTINGS
@given(csv_text | json_values.map(json.dumps), st.sampled_from(["c.csv", "c.json"]))
def test_captions_reader(tmp_path, text, name):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    _ours_or_result(load_captions, str(path))


WORLD_KEYS = ["seed", "concepts", "groups", "attribute_kind", "bias_strength", "group_in_caption",
              "eval_group_in_caption", "image_size", "position_jitter", "size_range", "background_range",
              "color_jitter", "noise_std", "antialias", "unknown"]


@SETTINGS
@given(st.fixed_dictionaries({}, optional={k: json_values | st.lists(st.sampled_from(
    ["circle", "square", "red", "blue", "stripes", "dots", "star", "ring"]), max_size=9) for k in WORLD_KEYS}))
def test_world_params(data):
    params = _ours_or_result(WorldParams.from_dict, data)
    if params is not None:
        assert WorldParams.from_dict(params.to_dict()) == params
