"""Several CPU processes (torchrun, gloo) train exactly as one process with the combined batch."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file

from preftune.batching import process_batches
from preftune.cli import main
from tests.conftest import PAIRS, write_jsonl


@pytest.mark.parametrize(("num_pairs", "batch_size", "world_size"), [(12, 2, 2), (13, 2, 2), (10, 3, 3), (7, 1, 4)])
def test_processes_see_disjoint_pairs_that_cover_the_epoch(num_pairs, batch_size, world_size):
    shares = [process_batches(num_pairs, batch_size, world_size, rank, True, 5, 0) for rank in range(world_size)]
    assert len({len(s) for s in shares}) == 1  # every process runs the same number of micro-batches
    seen = [i for share in shares for batch in share for i in batch]
    assert len(seen) == len(set(seen))  # disjoint
    dropped = num_pairs - len(seen)
    assert dropped < world_size  # only a last global batch too small for every process is dropped
    one_process = process_batches(num_pairs, batch_size * world_size, 1, 0, True, 5, 0)
    for step, global_batch in enumerate(one_process[: len(shares[0])]):
        assert sorted(i for share in shares for i in share[step]) == sorted(global_batch)


def rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(("grad_accum", "two_process_options"), [
    (1, []),
    (2, []),
    (1, ["--precompute-ref-log-probs"]),  # each process reads or computes the table; the main one writes it
], ids=["accum-1", "accum-2", "precomputed-reference"])
def test_two_processes_equal_one_process_with_twice_the_batch(tmp_path, tiny_model_dir, grad_accum,
                                                              two_process_options):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS * 4)
    common = ["--model", str(tiny_model_dir), "--data", str(data), "--max-steps", "3", "--grad-accum",
              str(grad_accum), "--learning-rate", "1e-3", "--seed", "3", "--eval-data", str(data), "--cache-dir",
              str(tmp_path / "cache")]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", *common, "--output-dir", str(one), "--batch-size", "4"]) == 0
    assert main(["train", *common, "--output-dir", str(two), "--batch-size", "2", "--num-processes", "2",
                 *two_process_options]) == 0
    if two_process_options:
        # one entry: the evaluation pairs are the training pairs here, so their key is the same
        assert len(list((tmp_path / "cache" / "reference-logps").iterdir())) == 1
    one_rows, two_rows = rows(one), rows(two)
    assert [r["step"] for r in one_rows] == [r["step"] for r in two_rows]
    for a, b in zip(one_rows, two_rows, strict=True):
        for key in ("loss", "rewards/chosen", "rewards/margins", "eval_loss", "eval_rewards/accuracies"):
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=1e-5), key
        if "eval_num_pairs" in a:
            assert b["eval_num_pairs"] == a["eval_num_pairs"] == len(PAIRS) * 4
    wa, wb = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5


def test_checkpoint_resumes_under_the_same_number_of_processes(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS * 2)
    out = tmp_path / "run"

    def args(processes: int) -> list[str]:
        return ["train", "--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(out),
                "--batch-size", "2", "--num-processes", str(processes), "--max-steps", "4", "--save-steps", "2",
                "--learning-rate", "1e-3"]

    assert main(args(2)) == 0
    finished = load_file(out / "model.safetensors")
    shutil.rmtree(out / "checkpoint-4")
    assert main([*args(2), "--resume"]) == 0
    resumed = load_file(out / "model.safetensors")
    assert max((finished[k] - resumed[k]).abs().max().item() for k in finished) == 0.0
    assert [r["step"] for r in rows(out) if "loss" in r] == [1, 2, 3, 4]
    capsys.readouterr()
    assert main([*args(1), "--resume"]) == 2
    assert "train.num_processes: 2 in the checkpoint, 1 now" in capsys.readouterr().err


def test_sharding_engines_are_refused_with_what_to_use_instead():
    """FSDP and DeepSpeed shard the weights; preftune's saving, evaluation and sampling read whole ones, so it
    stops before loading anything rather than write a slice of a model."""
    import accelerate.utils

    from preftune.errors import UserError
    from preftune.runtime import SUPPORTED_ENGINES, check_engine

    for engine in SUPPORTED_ENGINES:
        check_engine(engine)
    assert {"NO", "MULTI_CPU", "MULTI_GPU"} <= set(SUPPORTED_ENGINES)
    assert set(SUPPORTED_ENGINES) <= {t.value for t in accelerate.utils.DistributedType}
    for engine in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        with pytest.raises(UserError, match=f"{engine} engine.*configs/accelerate/ddp.yaml"):
            check_engine(engine)
