"""A full fine-tune (use_peft false: no adapter) through the recipes, evaluate and export: the training log names
the reference it really has (dpo/train/trainer.py describe_reference), and evaluate / export say the folder is a
full fine-tune and where its model and held-out metrics are (dpo/evaluation/evaluate.py refuse_full_fine_tune)."""

from types import SimpleNamespace

from helpers import cli, load_recipe, one_line_error


def test_a_full_fine_tune_logs_its_true_reference_and_evaluate_says_it_has_no_adapter(
    tiny_model_dir, truthy_file, tmp_path, capsys, request
):
    """The probe's case: the log said "reference = base with adapters disabled" (there are none: TRL loads a
    second copy of the model), and evaluate called the finished folder "not a finished run folder of these
    recipes"."""
    from dpo.evaluation.evaluate import main as evaluate
    from dpo.evaluation.export import main as export

    out = tmp_path / "full"
    argv = cli(model_name_or_path=tiny_model_dir, dataset_name=truthy_file, output_dir=out, use_peft=False)
    argv += cli(load_in_4bit=False, max_steps=1, per_device_train_batch_size=2, gradient_accumulation_steps=1)
    trainer = load_recipe("dpo_phi2").main([*argv, *cli(save_strategy="no", report_to="none")])
    assert trainer.ref_model is not None and not (out / "adapter_config.json").exists()  # really no adapter
    log = capsys.readouterr().out
    assert f"reference = a frozen second copy of {tiny_model_dir} (full fine-tune: no adapters)" in log, log
    assert "adapters disabled" not in log
    request.getfixturevalue("no_weights_load")  # from here on, nothing may load
    for main, extra in ((evaluate, []), (export, ["--merged", tmp_path / "merged"])):
        line = one_line_error(main, [out, *extra], capsys)
        assert f"{out} is a full fine-tune (use_peft false): it holds the whole trained model and no adapter" in line
        assert f"from_pretrained('{out}')" in line and "final_metrics.json" in line, line


def test_a_full_fine_tune_with_precomputed_reference_log_probs_says_so():
    """TRL keeps no reference model when it precomputes pi_ref's log-probs (precompute_ref_log_probs)."""
    from dpo.train.trainer import describe_reference

    trainer = SimpleNamespace(model=object(), ref_model=None)
    assert (
        describe_reference(trainer, "m")
        == "m's log-probs, computed once before training (full fine-tune: no adapters)"
    )
