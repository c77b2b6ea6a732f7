"""Best-checkpoint selection and early stopping: the bookkeeping against scripted metric sequences, and the trainer
keeping, resuming and handing on the best model."""

import json

import jax
import numpy as np
import pytest
from test_trainer import ToyBatches, run_fit, toy_model

from sid.config import ConfigError, TrainConfig
from sid.eval.config import EvalConfig
from sid.selection import Selection, check_selection, due


def scripted(selection: Selection, values: dict[int, float]) -> list[bool]:
    return [selection.update(step, {selection.metric: v, "other": -v}) for step, v in values.items()]


def test_selection_keeps_the_highest_ranking_metric_and_the_lowest_loss():
    ndcg = Selection("valid/ndcg@10")
    assert scripted(ndcg, {2: 0.10, 4: 0.30, 6: 0.20, 8: 0.30, 10: float("nan"), 12: 0.31}) == [
        True, True, False, False, False, True,
    ]  # fmt: skip
    assert (ndcg.best_step, ndcg.best_value, ndcg.stale) == (12, 0.31, 0)
    assert ndcg.summary() == {"step": 12, "metric": "valid/ndcg@10", "value": 0.31, "valid": {
        "valid/ndcg@10": 0.31, "other": -0.31}}  # fmt: skip
    loss = Selection("eval_loss")
    scripted(loss, {1: 2.0, 2: 1.5, 3: 1.5, 4: 1.7})
    assert (loss.best_step, loss.best_value, loss.stale) == (2, 1.5, 2)  # a tie is no improvement
    assert Selection("eval_loss").summary() is None
    assert not loss.update(5, {"valid/ndcg@10": 0.9}) and loss.stale == 2  # another evaluator's results


def test_early_stop_fires_after_patience_evaluations_without_a_new_best():
    s = Selection("valid/hr@10", patience=3)
    stops = []
    for step, v in {1: 0.1, 2: 0.2, 3: 0.1, 4: 0.25, 5: 0.15, 6: 0.3, 7: 0.1, 8: 0.3, 9: 0.1}.items():
        s.update(step, {"valid/hr@10": v})
        stops.append(s.should_stop)
    assert stops.index(True) == 8 and stops.count(True) == 1  # 7, 8 (a tie) and 9 do not beat step 6
    assert not Selection("valid/hr@10", patience=0).should_stop
    assert Selection.from_state(json.loads(json.dumps(s.state()))) == s


def test_evaluators_run_on_their_period_and_after_the_last_step():
    class E:
        def __init__(self, every):
            self.every = every

    a, b, never = E(2), E(3), E(0)
    assert due([a, b, never], 6, 10) == [a, b]
    assert due([a, b, never], 5, 10) == []
    assert due([a, b, never], 10, 10) == [a, b]


class Scripted:
    """An evaluator whose metric follows a script by step (and records which steps it saw)."""

    def __init__(self, values: dict[int, float], every: int):
        self.values, self.every, self.seen = values, every, []

    def __call__(self, model, step):
        self.seen.append(step)
        return {"valid/ndcg@10": self.values[step], "valid/hr@10": 2 * self.values[step]}


SCRIPT = {2: 0.1, 4: 0.3, 6: 0.2, 8: 0.25, 10: 0.28, 12: 0.1}


def params_of(model):
    return [np.asarray(x) for x in jax.tree.leaves(model)]


def test_fit_stops_early_and_hands_on_the_best_steps_model(tmp_path):
    evaluator = Scripted(SCRIPT, every=2)
    model, summary = run_fit(
        tmp_path / "run", ToyBatches(), steps=12, evaluators=[evaluator], select_by="ndcg@10", early_stop_patience=3
    )
    assert evaluator.seen == [2, 4, 6, 8, 10]
    assert summary["early_stopped_at"] == 10 and summary["final_step"] == 10
    assert summary["best"] == {
        "step": 4, "metric": "valid/ndcg@10", "value": 0.3, "valid": {"valid/ndcg@10": 0.3, "valid/hr@10": 0.6}
    }  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "run" / "best").iterdir()) == ["4"]
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "valid/ndcg@10" in r] == [2, 4, 6, 8, 10]
    four, _ = run_fit(tmp_path / "four", ToyBatches(), steps=4)  # the same steps, stopped at the best one
    for a, b in zip(params_of(model), params_of(four), strict=True):
        np.testing.assert_array_equal(a, b)
    last, _ = run_fit(
        tmp_path / "last", ToyBatches(), steps=12, evaluators=[Scripted(SCRIPT, 2)], select_by="ndcg@10",
        early_stop_patience=3, final_model="last",
    )  # fmt: skip
    ten, _ = run_fit(tmp_path / "ten", ToyBatches(), steps=10)
    for a, b in zip(params_of(last), params_of(ten), strict=True):
        np.testing.assert_array_equal(a, b)


def test_resume_keeps_the_best_so_far_and_its_patience(tmp_path):
    """Preempted at step 7 (best at 4, one stale evaluation), the resumed run stops where an uninterrupted one does
    and hands on the same model."""
    whole, whole_summary = run_fit(
        tmp_path / "whole", ToyBatches(), steps=12, evaluators=[Scripted(SCRIPT, 2)], select_by="ndcg@10",
        early_stop_patience=3,
    )  # fmt: skip
    kw = dict(steps=12, select_by="ndcg@10", early_stop_patience=3, save_every=2)
    _, first = run_fit(tmp_path / "run", ToyBatches(sigterm_at=6), evaluators=[Scripted(SCRIPT, 2)], **kw)
    assert first["preempted_at"] == 7
    second = Scripted(SCRIPT, 2)
    model, summary = run_fit(tmp_path / "run", ToyBatches(), evaluators=[second], resume=True, **kw)
    assert second.seen == [8, 10]
    assert summary["early_stopped_at"] == 10 and summary["best"] == whole_summary["best"]
    for a, b in zip(params_of(model), params_of(whole), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "train, topk, message",
    [
        ({"select_by": "ndcg@10"}, (1, 10), "needs train.valid_rank_every > 0"),
        ({"select_by": "loss"}, (1, 10), "needs train.eval_loss_every > 0"),
        ({"select_by": "hr@10", "valid_rank_every": 5}, (1, 5), r"needs 10 in eval.topk \(1, 5\)"),
        ({"early_stop_patience": 2}, (10,), "early_stop_patience needs train.select_by"),
        ({"valid_rank_every": -3}, (10,), r"train.valid_rank_every=-3 must be >= 0"),
    ],
)
def test_a_selection_nothing_would_feed_is_refused(train, topk, message):
    with pytest.raises(ConfigError, match=message):
        check_selection(TrainConfig(**train), EvalConfig(topk=topk))
    check_selection(TrainConfig(select_by="hr@10", valid_rank_every=5), EvalConfig(topk=(10,)))


def test_resume_from_a_checkpoint_at_an_evaluated_step_keeps_that_evaluation(tmp_path):
    """Killed after checkpoint 6 (an evaluation step, one stale evaluation since the best at 4), the resumed run
    still stops at 10 and hands on the uninterrupted run's model: the checkpoint holds step 6's evaluation."""

    class Crash(ToyBatches):
        def __next__(self):
            if self.i == 6:
                raise RuntimeError("killed")
            return super().__next__()

    kw = dict(steps=12, select_by="ndcg@10", early_stop_patience=3, save_every=2)
    whole, whole_summary = run_fit(tmp_path / "whole", ToyBatches(), evaluators=[Scripted(SCRIPT, 2)], **kw)
    with pytest.raises(RuntimeError, match="killed"):
        run_fit(tmp_path / "run", Crash(), evaluators=[Scripted(SCRIPT, 2)], **kw)
    second = Scripted(SCRIPT, 2)
    model, summary = run_fit(tmp_path / "run", ToyBatches(), evaluators=[second], resume=True, **kw)
    assert summary["start_step"] == 6 and second.seen == [8, 10]
    assert summary["early_stopped_at"] == 10 and summary["best"] == whole_summary["best"]
    for a, b in zip(params_of(model), params_of(whole), strict=True):
        np.testing.assert_array_equal(a, b)


def test_eval_at_start_lets_the_starting_model_win(tmp_path):
    """Evaluated at step 0 too, a run that never beats its start stops early and hands its starting model on; a
    fresh restart after a crash before the first checkpoint logs step 0 once."""
    evaluator = Scripted({0: 0.5, **SCRIPT}, every=2)
    kw = dict(steps=12, select_by="ndcg@10", early_stop_patience=3, eval_at_start=True)
    model, summary = run_fit(tmp_path / "run", ToyBatches(), evaluators=[evaluator], **kw)
    assert evaluator.seen == [0, 2, 4, 6]
    assert summary["early_stopped_at"] == 6 and summary["best"]["step"] == 0
    for a, b in zip(params_of(model), params_of(toy_model()), strict=True):
        np.testing.assert_array_equal(a, b)

    class Crash(ToyBatches):
        def __next__(self):
            if self.i == 3:
                raise RuntimeError("killed")
            return super().__next__()

    with pytest.raises(RuntimeError, match="killed"):
        run_fit(tmp_path / "again", Crash(), evaluators=[Scripted({0: 0.5, **SCRIPT}, 2)], **kw)
    again = Scripted({0: 0.5, **SCRIPT}, 2)
    run_fit(tmp_path / "again", ToyBatches(), evaluators=[again], resume=True, **kw)
    assert again.seen == [0, 2, 4, 6]
    records = [json.loads(x) for x in (tmp_path / "again" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "valid/ndcg@10" in r] == [0, 2, 4, 6]
    # Off (the default), step 0 is not evaluated.
    late = Scripted(SCRIPT, 2)
    run_fit(tmp_path / "off", ToyBatches(), evaluators=[late], steps=4, select_by="ndcg@10")
    assert late.seen == [2, 4]
