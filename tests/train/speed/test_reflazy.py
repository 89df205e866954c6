"""dpo/train/speed/reflazy.py on the tiny offline Phi model (4-bit base + LoRA, CPU): a run whose plan reaches
only some training pairs fills up front the held-out pairs only, fills the training pairs its steps reach
(written to the store), a later run reuses them and fills only the rest, the values are a full fill's, and a
placeholder never reaches the loss. Work is counted in pairs scored, never in seconds."""

import math

import pytest
import torch
from helpers import ROOT, load_script, recipe_trainer

import dpo.train.speed.refcache as refcache
from dpo.compat import DPOTrainer
from dpo.errors import RunStopped
from dpo.train.speed.reflazy import FILL, LazyReference, MarkMissing, planned_pairs, refuse_placeholder_columns
from dpo.train.speed.refstore import COLUMNS, Store

step_work = load_script(ROOT / "benchmarks" / "step_work.py", "bench_step_work")

# 12 training pairs in batches of 2 (recipe_trainer), 4 held out: max_steps 6 is one epoch, the whole set
HELD_OUT, TRAIN = 4, 12


@pytest.fixture
def scored(monkeypatch):
    """The pairs each reference pass scores (parity checks apart), by the pass's progress-bar name
    (None: filled as training reached them)."""
    passes, real = [], refcache.compute_reference

    def counting(trainer, dataset, indices, desc):
        if indices and desc != "reference parity check":  # (a pass with nothing to score does no forward)
            passes.append((desc, len(indices)))
        return real(trainer, dataset, indices, desc)

    monkeypatch.setattr(refcache, "compute_reference", counting)
    return passes


def reached(trainer) -> list[int]:
    """Spy on what reaches the loss: the training indices each batch marked as missing, in order."""
    marks, prepare = [], trainer.prepare_loss_inputs

    def spying(inputs):
        if FILL in inputs:
            marks.extend(i for i in inputs[FILL] if i >= 0)
        return prepare(inputs)

    trainer.prepare_loss_inputs = spying
    return marks


def stored(cache) -> dict:
    (folder,) = cache.iterdir()
    return Store(folder).load().rows


def test_a_short_run_fills_the_pairs_it_reaches_and_a_longer_one_only_the_rest(
    tiny_model_dir, tmp_path, scored, capsys
):
    cache = tmp_path / "cache"
    short = recipe_trainer(tiny_model_dir, tmp_path / "a", cache, max_steps=2)  # 2 steps x 2 pairs = 4 of 12
    assert scored == [("reference log-probs (eval)", HELD_OUT)]  # the held-out pairs only, up front
    out = capsys.readouterr().out  # one line: what was filled up front, what is left
    assert "reference cache: 4 pairs filled up front (4 computed in" in out
    assert "; 12 training pairs left to fill as training reaches them (the plan draws 4 of 12" in out
    marks = reached(short)
    short.train()
    assert short.state.global_step == 2
    assert len(marks) == 4 and len(set(marks)) == 4  # every pair the 2 steps trained on, each filled once
    assert [n for desc, n in scored[1:]] == [2, 2]  # filled as each step reached its batch of 2
    rows = refcache.row_ids(short.train_dataset)
    on_disk = stored(cache)
    assert set(on_disk) - set(refcache.row_ids(short.eval_dataset)) == {rows[i] for i in marks}  # only those

    scored.clear()
    longer = recipe_trainer(tiny_model_dir, tmp_path / "b", cache, max_steps=4)  # 8 of 12: still lazy
    assert scored == []  # the held-out pairs are read
    out = capsys.readouterr().out
    assert "8 pairs filled up front (0 computed" in out and "8 training pairs left to fill" in out
    marks_again = reached(longer)
    longer.train()
    assert not set(marks_again) & set(marks)  # the pairs the first run filled are read, not scored again
    assert sum(n for _, n in scored) == len(set(marks_again)) == len(stored(cache)) - HELD_OUT - 4

    scored.clear()
    whole = recipe_trainer(tiny_model_dir, tmp_path / "c", cache, max_steps=6)  # one epoch: up front, as before
    missing = TRAIN + HELD_OUT - len(on_disk) - len(set(marks_again))
    assert scored == [("reference log-probs (train)", missing)]
    assert f"partial hit, computed {missing} of 16 pairs" in capsys.readouterr().out
    assert len(stored(cache)) == TRAIN + HELD_OUT
    # the store holds each pair's values as the columns the trainer reads
    assert [stored(cache)[row][0] for row in rows] == whole.train_dataset[refcache.COLUMNS[0]]


def test_values_filled_as_training_reaches_them_equal_a_full_fill(tiny_model_dir, tmp_path):
    """Each pair lazily filled (in its micro-batch of 2) against the same pair in a full up-front fill (batches of
    4, longest first, other padding). Right padding and a causal mask: a row never sees the other rows, so only
    the kernels' round-off for another batch shape can differ, ~1e-6 relative in fp32 (refcache.TOLERANCE's
    note), asserted at 1e-5; measured here (AMD EPYC, fp32, CPU): bit-identical. The parity check's bound,
    TOLERANCE["fp32"], is far wider."""
    short = recipe_trainer(tiny_model_dir, tmp_path / "a", tmp_path / "lazy", max_steps=3)
    short.train()
    full = recipe_trainer(tiny_model_dir, tmp_path / "b", tmp_path / "full", max_steps=6)
    lazy_rows, full_rows = stored(tmp_path / "lazy"), stored(tmp_path / "full")
    rows = refcache.row_ids(full.train_dataset)
    filled = [row for row in rows if row in lazy_rows]
    assert len(filled) == 6  # 3 steps x 2 pairs
    for k in (0, 1):  # chosen, rejected
        lazy, whole = (
            torch.tensor([lazy_rows[row][k] for row in filled]),
            torch.tensor([full_rows[row][k] for row in filled]),
        )
        torch.testing.assert_close(lazy, whole, rtol=1e-5, atol=0.0)


def nan_fill(trainer, dataset, indices, desc):
    """A reference forward that gives NaN for the pairs training reaches (a bug, or a broken reference)."""
    return [float("nan")] * len(indices), [-1.0] * len(indices), [0.0] * len(indices)


@pytest.mark.parametrize("bug", ["computed_nan", "not_a_training_pair"])
def test_a_placeholder_never_reaches_the_loss(bug, tiny_model_dir, tmp_path, monkeypatch):
    """A fill that computes a non-finite value, or a placeholder no training pair's row can fill (a bug), stops the
    run in one line before TRL computes any loss."""
    trainer = recipe_trainer(tiny_model_dir, tmp_path / "a", tmp_path / "cache", max_steps=2)
    if bug == "computed_nan":
        monkeypatch.setattr(refcache, "compute_reference", nan_fill)
    else:  # the collator finds no training index for any row
        trainer.data_collator = MarkMissing(trainer.data_collator.collator, {})
    losses, real = [], DPOTrainer._compute_loss
    monkeypatch.setattr(DPOTrainer, "_compute_loss", lambda self, *a, **k: losses.append(1) or real(self, *a, **k))
    with pytest.raises(RunStopped, match=r"pair\(s\) of a batch reached the loss without a reference value") as err:
        trainer.train()
    assert "\n" not in str(err.value) and err.value.exit_status == 1
    assert losses == [] and trainer.state.global_step == 0


def test_the_lazy_guard_reads_nothing_back_from_the_device(tiny_model_dir, tmp_path, monkeypatch):
    """The lazy path's check costs no host read per micro-batch (a sync each on a GPU), counted as
    tests/train/test_step_work.py counts them (benchmarks/step_work.py: item/bool/int of a tensor, nonzero-like
    ops, tolist/cpu/numpy). Was: every micro-batch's two columns read back through torch.isfinite(...).sum(), and
    the FILL marks through tolist (3 reads for a batch that fills, 2 for one that does not). The reference
    forward's own reads are not the guard's: a host-only stand-in computes the values here."""
    trainer = recipe_trainer(tiny_model_dir, tmp_path / "a", tmp_path / "cache", max_steps=2)  # 4 of 12: lazy
    scored = []

    def host_only(trainer_, dataset, indices, desc):
        scored.extend(indices)
        return [-10.0 - i for i in indices], [-20.0 - i for i in indices], [0.0] * len(indices)

    monkeypatch.setattr(refcache, "compute_reference", host_only)
    examples = [trainer.train_dataset[i] for i in range(4)]
    assert all(math.isnan(e[COLUMNS[0]]) for e in examples)  # placeholders: the lazy path fills them
    cached = [{**e, COLUMNS[0]: -1.0, COLUMNS[1]: -2.0} for e in examples[:2]]
    # a step of 4 micro-batches: pairs 0-1 computed, 2-3 computed, 0-1 again (filled earlier), none to fill
    batches = [trainer.data_collator(b) for b in (examples[:2], examples[2:], examples[:2], cached)]
    work = step_work.StepWork(trainer, skip=0, steps=1)
    work._open()
    try:
        out = [trainer.prepare_loss_inputs(batch) for batch in batches]
    finally:
        work._close()
    assert sorted(scored) == [0, 1, 2, 3]  # each pair computed once
    assert sum(work.reads.values()) == 0, dict(work.reads)
    expected = [[-10.0, -11.0], [-12.0, -13.0], [-10.0, -11.0], [-1.0, -2.0]]
    assert [batch[COLUMNS[0]].tolist() for batch in out][:3] == expected[:3] and FILL not in out[0]
    assert out[3][COLUMNS[0]].tolist() == [-1.0, -1.0] and out[3] is batches[3]  # passed untouched


class CountingRows(dict):
    """A store's rows that count how many of their entries are read (iterated, looked up, copied)."""

    read = 0

    def _every(self, method):
        self.read += len(self)
        return method()

    def __iter__(self):
        return self._every(super().__iter__)

    def keys(self):
        return self._every(super().keys)

    def items(self):
        return self._every(super().items)

    def values(self):
        return self._every(super().values)

    def copy(self):
        return self._every(super().copy)

    def __getitem__(self, key):
        self.read += 1
        return super().__getitem__(key)


def flush_work(folder, stored: int) -> tuple[int, list[int]]:
    """Rows of the store read and rows written per flush, over 3 steps of 2 pairs filled each, with `stored`
    pairs already in the store."""
    folder.mkdir()
    rows = CountingRows({f"old-{i}": (-1.0, -2.0, 0.0, "part-old.parquet") for i in range(stored)})
    new = [f"new-{i}" for i in range(6)]
    compute = lambda indices: ([-3.0] * len(indices), [-4.0] * len(indices), [0.0] * len(indices))  # noqa: E731
    lazy = LazyReference(new, compute, Store(folder, rows), {})
    written = []
    for step in range(3):
        column = torch.full((2,), float("nan"))
        lazy.fill({FILL: [2 * step, 2 * step + 1], COLUMNS[0]: column, COLUMNS[1]: column.clone()})
        written.append(lazy.flush())
    read = rows.read
    assert all(row in lazy.store.rows for row in new) and len(Store(folder).load().rows) == 6
    return read, written


def test_a_flush_works_on_its_steps_pairs_whatever_the_stores_size(tmp_path):
    """Was: each step's flush rebuilt the whole store ({**rows, **written}: every row of the data set read and
    copied, per optimizer step). Now its work is the step's pairs: the same at twice the store's size."""
    small, large = flush_work(tmp_path / "small", 500), flush_work(tmp_path / "large", 1000)
    assert small == large == (0, [2, 2, 2]), (small, large)


def test_up_front_columns_are_checked_once_before_the_first_step(tiny_model_dir, tmp_path, monkeypatch):
    """A plan that reaches every pair fills up front; its columns are checked once when the cache is attached
    (a non-finite value stops the run there), not in every micro-batch (tests/train/test_step_work.py counts
    the host reads that would add)."""
    from datasets import Dataset

    good = Dataset.from_dict({"ref_chosen_logps": [-1.0, -2.0], "ref_rejected_logps": [-3.0, -4.0]})
    refuse_placeholder_columns(good)  # nothing to refuse
    bad = Dataset.from_dict({"ref_chosen_logps": [-1.0, float("nan")], "ref_rejected_logps": [-3.0, -4.0]})
    with pytest.raises(RunStopped, match=r"1 pair\(s\) of a batch reached the loss without a reference value"):
        refuse_placeholder_columns(bad)

    checked = []
    monkeypatch.setattr(refcache, "refuse_placeholder_columns", lambda dataset: checked.append(len(dataset)))
    trainer = recipe_trainer(tiny_model_dir, tmp_path / "a", tmp_path / "cache", max_steps=100)
    assert checked and checked[0] == len(trainer.train_dataset)  # the whole training set, before any step
    assert trainer.prepare_loss_inputs(batch := {"input_ids": [1]}) is batch  # nothing per batch


def test_the_plan_counts_steps_batches_accumulation_and_processes():
    class Args:
        max_steps, per_device_train_batch_size, gradient_accumulation_steps, num_train_epochs = 2, 1, 8, 1.0

    assert planned_pairs(Args, 284, 1) == 16  # the HH recipe's --max_steps 2: 16 of 284 pairs
    assert planned_pairs(Args, 284, 4) == 64
    assert planned_pairs(Args, 10, 1) == 10  # never more than the set
    Args.max_steps, Args.num_train_epochs = -1, 0.5
    assert planned_pairs(Args, 284, 1) == 142
    Args.num_train_epochs = 3.0
    assert planned_pairs(Args, 284, 1) == 284


def test_with_packing_grouping_accumulation_and_evaluation_the_losses_are_the_inline_references(
    tiny_model_dir, tmp_path
):
    """The recipes' speed settings together (dpo_smollm2_hh.yaml: packing, length grouping, accumulated
    micro-batches) and evaluation during training: 2 steps of 2 x 2 pairs, filled as they come, give the
    per-step and held-out losses of TRL's inline reference forward (rtol as in test_refcache.py's inline test)."""
    settings = dict(
        max_steps=2, packing=True, train_sampling_strategy="group_by_length", per_device_train_batch_size=2,
        gradient_accumulation_steps=2, eval_strategy="steps", eval_steps=1,
    )  # fmt: skip
    inline = recipe_trainer(tiny_model_dir, tmp_path / "inline", **settings)
    lazy = recipe_trainer(tiny_model_dir, tmp_path / "lazy", tmp_path / "cache", **settings)
    assert lazy.prepare_loss_inputs is not inline.prepare_loss_inputs  # the lazy path is on
    logged = []
    for trainer in (inline, lazy):
        trainer.train()
        logged.append({k: [h[k] for h in trainer.state.log_history if k in h] for k in ("loss", "eval_loss")})
    assert len(logged[0]["loss"]) == 2 and len(logged[0]["eval_loss"]) == 2
    for key in ("loss", "eval_loss"):
        # the same steps with reference values from other batch shapes: measured bit-identical above, fp32 round-off
        # (~1e-6 relative) at most; 1e-4 is the bound tests/train/speed/test_refcache.py uses for the same comparison
        torch.testing.assert_close(torch.tensor(logged[1][key]), torch.tensor(logged[0][key]), rtol=1e-4, atol=1e-5)
    assert len(stored(tmp_path / "cache")) == HELD_OUT + 8  # 2 steps x 2 micro-batches x 2 pairs, each once
