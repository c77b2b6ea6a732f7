"""HR@K / NDCG@K against a hand-computed example, and the predictions JSON against a re-implementation of
MiniOneRec's calc.py rule (first-match rank, hit if rank < K, NDCG = 1/log2(rank + 2))."""

import json
import math

import numpy as np
import pytest

from sid.eval.metrics import first_hit_ranks, ranking_metrics
from sid.eval.predictions import explain, read_predictions, write_predictions

A, B, C, D = "<a_1><b_1>", "<a_1><b_2>", "<a_2><b_1>", "<a_2><b_2>"
CATALOG = {A, B, C, D}


def test_hand_computed_example_with_ties_and_duplicates():
    targets = [A, B, C, D, A]
    predictions = [
        [A, B, C],  # rank 0
        [A, B, B],  # rank 1 (a duplicated SID: the first match counts)
        [A, B, D],  # miss
        ["<a_9><b_9>", "junk", D],  # rank 2, after two invalid predictions
        [B, A, A],  # rank 1 again (tied with sample 2)
    ]
    assert first_hit_ranks(predictions, targets).tolist() == [0, 1, -1, 2, 1]
    m = ranking_metrics(predictions, targets, topk=(1, 2, 3), catalog_sids=CATALOG)
    assert m.hr == pytest.approx({1: 1 / 5, 2: 3 / 5, 3: 4 / 5})
    ndcg3 = (1 + 1 / math.log2(3) + 1 / math.log2(4) + 1 / math.log2(3)) / 5
    assert m.ndcg == pytest.approx({1: 1 / 5, 2: (1 + 2 / math.log2(3)) / 5, 3: ndcg3})
    assert (m.n_samples, m.invalid_prediction_count) == (5, 2)
    assert m.to_dict()["hr"] == {"1": m.hr[1], "2": m.hr[2], "3": m.hr[3]} and m.to_dict()["topk"] == [1, 2, 3]
    assert m.flat()["eval/NDCG@3"] == m.ndcg[3]
    assert "0.8000" in m.table()


def test_shared_sid_counts_as_a_hit_for_every_item_carrying_it():
    # Items 7 and 8 share SID B: a user whose next item is 8 is hit by the prediction B (exact SID match).
    items_by_sid = {A: ("1",), B: ("7", "8")}
    m = ranking_metrics([[B, A]], [B], topk=(1,), catalog_sids=items_by_sid)
    assert m.hr[1] == 1.0 and m.ndcg[1] == 1.0


@pytest.mark.parametrize(
    ("predictions", "targets", "topk", "match"),
    [
        ([[A]], [], (1,), "no samples"),
        ([[A], [B]], [A], (1,), "prediction lists"),
        ([[A, B]], [A], (0,), r"top-K values \[0\]"),
        ([[A, B]], [A], (1, 3), r"top-K values \[3\]"),
    ],
)
def test_bad_metric_input(predictions, targets, topk, match):
    with pytest.raises(ValueError, match=match):
        ranking_metrics(predictions, targets, topk=topk, catalog_sids=CATALOG)


def _calc_py(path, catalog):
    """MiniOneRec calc.py's rule, re-implemented on the raw JSON: strip, first-match minID with an early exit,
    NDCG summed as 1/ln(minID+2) and divided by 1/ln(2); unknown items counted until the hit."""
    data = json.loads(path.read_text())
    texts = [[p.strip('"\n').strip() for p in s["predict"]] for s in data]
    n_beam = len(texts[0])
    topk = [k for k in (1, 3, 5, 10, 20, 50) if k <= n_beam]
    ndcg, hr, unknown = np.zeros(len(topk)), np.zeros(len(topk)), 0
    for sample, record in zip(texts, data, strict=True):
        target = record["output"].strip(' \n"')
        min_id = 1000000
        for i, p in enumerate(sample):
            if p not in catalog:
                unknown += 1
            if p == target:
                min_id = i
                break
        for j, k in enumerate(topk):
            if min_id < k:
                ndcg[j] += 1 / math.log(min_id + 2)
                hr[j] += 1
    n = len(texts)
    return (
        topk,
        dict(zip(topk, hr / n, strict=True)),
        dict(zip(topk, ndcg / n / (1 / math.log(2)), strict=True)),
        unknown,
    )


def test_predictions_json_round_trips_through_calc_py_rule(tmp_path):
    rng = np.random.default_rng(0)
    catalog = [f"<a_{i}><b_{j}><c_{k}>" for i in range(3) for j in range(4) for k in range(3)]
    targets, predictions = [], []
    for _ in range(60):
        predict = [catalog[i] for i in rng.permutation(len(catalog))[:10]]
        target = catalog[rng.integers(len(catalog))]
        if target not in predict and rng.random() < 0.5:
            predict[rng.integers(10)] = "<z_0><z_0><z_0>"  # invalid ones only where calc.py scans the whole list
        targets.append(target)
        predictions.append(predict)
    path = tmp_path / "run" / "predictions.json"
    write_predictions(path, targets, predictions)
    assert [set(r) for r in json.loads(path.read_text())] == [{"output", "predict"}] * 60
    assert read_predictions(path) == (targets, predictions)

    topk, hr, ndcg, unknown = _calc_py(path, set(catalog))
    assert topk == [1, 3, 5, 10]
    ours = ranking_metrics(predictions, targets, topk=topk, catalog_sids=catalog)
    assert 0 < ours.hr[10] < 1 and 0 < unknown
    assert ours.hr == pytest.approx(hr, abs=1e-12) and ours.ndcg == pytest.approx(ndcg, abs=1e-12)
    assert ours.invalid_prediction_count == unknown


def test_read_accepts_upstream_files_and_rejects_bad_schema(tmp_path):
    upstream = tmp_path / "upstream.json"
    records = [
        {"instruction": "x", "output": f"{A}\n", "predict": [f"{B}\n", f'"{A}"']},
        {"output": [f'"{C}"'], "predict": [A]},
    ]
    upstream.write_text(json.dumps(records))
    assert read_predictions(upstream) == ([A, C], [[B, A], [A]])
    for bad, match in [
        ({"output": A}, "expected a JSON list"),
        ([{"output": A}], "record 0: expected an object"),
        ([{"output": A, "predict": A}], "record 0: 'predict' must be a list"),
        ([{"output": 3, "predict": []}], "record 0: 'output' must be a SID string"),
    ]:
        upstream.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=match):
            read_predictions(upstream)
    with pytest.raises(ValueError, match="prediction lists"):
        write_predictions(tmp_path / "x.json", [A, B], [[A]])


def test_explain_maps_sids_to_items_and_titles():
    items_by_sid = {A: ("10",), B: ("11", "12")}
    titles = {"10": "Hammer", "11": "Nails", "12": "Nails (bulk)"}
    assert explain([B, A, "<a_9><b_9>"], items_by_sid, titles) == [
        {"rank": 1, "sid": B, "item_ids": ["11", "12"], "titles": ["Nails", "Nails (bulk)"]},
        {"rank": 2, "sid": A, "item_ids": ["10"], "titles": ["Hammer"]},
        {"rank": 3, "sid": "<a_9><b_9>", "item_ids": [], "titles": []},
    ]
