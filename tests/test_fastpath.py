"""Fast paths fall back instead of failing: a failure injected where each can fail on a real card —
compiling the blocks, the first compiled step, the static cache's prefill, the captured decode step —
leaves the same losses and tokens as the plain path, one warning, and a record of the fallback; a
forced path fails in one sentence."""

import json

import pytest
import torch
import yaml
from helpers import CountingBatches, Recorder, eval_fn, tiny_model
from helpers import train_spec as cfg

import llmlab.train.loop as loop
from llmlab import fastpath
from llmlab.train.objectives import LanguageModeling


@pytest.fixture(autouse=True)
def fresh_record():
    fastpath.reset()
    yield
    fastpath.reset()


def losses(tmp, **changes) -> list[tuple[int, float]]:
    rec = Recorder()
    loop.train(tiny_model(dropout=0.1), LanguageModeling(), CountingBatches(4), cfg(**changes), tmp, evaluate=eval_fn,
               callbacks=rec, seed=1)
    return rec.logs


def compiled_on_this_device(monkeypatch):
    """`compile: auto` compiles as it would on CUDA (where auto means on)."""
    monkeypatch.setattr(loop, "should_compile", lambda setting, device: setting in ("auto", True))


def test_compiling_the_blocks_fails_over_to_eager_blocks_with_the_same_losses(tmp_path, monkeypatch, capsys):
    eager = losses(tmp_path / "eager", compile=False)
    compiled_on_this_device(monkeypatch)

    def cannot_compile(model):
        raise RuntimeError("no working C++ compiler")

    monkeypatch.setattr(loop, "compile_blocks", cannot_compile)
    assert losses(tmp_path / "fallback", compile="auto") == eager
    out = capsys.readouterr().out
    assert out.count("warning: fast path 'compile' failed") == 1 and "no working C++ compiler" in out
    assert fastpath.taken()["compile"].startswith("fell back") and "compiling the model's blocks" in fastpath.taken()["compile"]


def test_a_first_compiled_step_that_fails_runs_again_eagerly_with_the_same_losses(tmp_path, monkeypatch, capsys):
    eager = losses(tmp_path / "eager", compile=False)
    compiled_on_this_device(monkeypatch)

    def broken_compile(model):  # what an inductor failure looks like: the first call of a compiled block raises
        from llmlab.parallel import _blocks

        def boom(*args, **kwargs):
            raise RuntimeError("InductorError: backend compiler failed")

        for block in _blocks(model):
            block._compiled_call_impl = boom
        return len(_blocks(model))

    monkeypatch.setattr(loop, "compile_blocks", broken_compile)
    assert losses(tmp_path / "fallback", compile="auto") == eager  # dropout on: the retry draws the same masks
    out = capsys.readouterr().out
    assert out.count("warning: fast path 'compile' failed") == 1 and "first compiled step" in out
    # the path stays off in this process: the next run does not try it again (and says nothing more)
    assert losses(tmp_path / "again", compile="auto") == eager
    assert "warning" not in capsys.readouterr().out and fastpath.taken()["compile"].startswith("fell back")


def test_a_forced_compile_that_fails_is_one_sentence(tmp_path, monkeypatch):
    compiled_on_this_device(monkeypatch)
    monkeypatch.setattr(loop, "compile_blocks", lambda model: (_ for _ in ()).throw(RuntimeError("no compiler")))
    with pytest.raises(fastpath.FastPathFailed, match=r"forced fast path 'compile' failed while compiling the model's "
                                                      r"blocks \(RuntimeError: no compiler\): set `compile: auto`"):
        losses(tmp_path, compile=True)


@pytest.fixture
def sampled():
    """Greedy tokens of a small llmlab model on left-padded prompts, through llmlab's sampler."""
    from llmlab.generate import sample

    model = tiny_model(seed=2).eval()
    ids = torch.tensor([[0, 0, 5, 6, 7], [3, 4, 5, 6, 7]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])

    def run(**kw):
        return sample(model, ids, mask, 6, None, 0, 0.0, **kw).tokens

    return run


def static_wanted(monkeypatch):
    import llmlab.generate as generate

    monkeypatch.setattr(generate, "decode_mode", lambda model, requested="auto": "static")


def test_a_static_prefill_that_fails_decodes_on_the_growing_cache_with_the_same_tokens(sampled, monkeypatch, capsys):
    from llmlab.model.static_decode import StaticDecoder

    dynamic = sampled(decode="dynamic")
    static_wanted(monkeypatch)
    monkeypatch.setattr(StaticDecoder, "prefill", lambda self, *a, **k: (_ for _ in ()).throw(RuntimeError("no buffers")))
    assert torch.equal(sampled(), dynamic)
    assert capsys.readouterr().out.count("warning: fast path 'decode' failed") == 1
    assert "filling the static KV cache" in fastpath.taken()["decode"]


def test_a_captured_step_that_fails_goes_on_from_the_prompt_with_the_same_tokens(sampled, monkeypatch, capsys):
    from llmlab.model.static_decode import StaticDecoder

    dynamic = sampled(decode="dynamic")
    static_wanted(monkeypatch)
    steps = []

    def failing_capture(self, tokens, running=None):
        steps.append(tokens)
        raise RuntimeError("CUDA graph capture failed")

    monkeypatch.setattr(StaticDecoder, "step", failing_capture)
    assert torch.equal(sampled(), dynamic) and len(steps) == 1  # tried once, then the growing cache
    out = capsys.readouterr().out
    assert out.count("warning: fast path 'decode' failed") == 1 and "capturing the static decode step" in out


def test_the_static_path_when_it_works_gives_the_dynamic_tokens_and_is_recorded(sampled):
    assert torch.equal(sampled(decode="static"), sampled(decode="dynamic"))
    fastpath.reset()
    sampled(decode="static")
    assert fastpath.taken() == {"decode": "static"}


@pytest.mark.parametrize("force", ["stage", "environment"])
def test_a_forced_static_decode_that_fails_is_one_sentence(sampled, monkeypatch, force):
    from llmlab.model.static_decode import StaticDecoder

    if force == "stage":
        fastpath.new_stage(decode="static")  # what the executor does for a stage with `decode: static`
    else:
        monkeypatch.setenv("LLMLAB_DECODE", "static")
    monkeypatch.setattr(StaticDecoder, "prefill", lambda self, *a, **k: (_ for _ in ()).throw(RuntimeError("no buffers")))
    with pytest.raises(fastpath.FastPathFailed, match=r"forced fast path 'decode' failed while filling the static KV "
                                                      r"cache with the prompts \(RuntimeError: no buffers\): set the "
                                                      r"stage's `decode: auto`"):
        sampled()


def test_the_stage_setting_picks_the_decoder_below_a_callers_choice_and_the_environment(sampled, monkeypatch):
    fastpath.new_stage(decode="static")  # on a CPU, auto would be dynamic
    sampled()
    assert fastpath.taken() == {"decode": "static"}
    fastpath.new_stage(decode="static")
    sampled(decode="dynamic")
    assert fastpath.taken() == {"decode": "dynamic"}
    monkeypatch.setenv("LLMLAB_DECODE", "dynamic")
    fastpath.new_stage(decode="static")
    sampled()
    assert fastpath.taken() == {"decode": "dynamic"}


def test_a_stage_records_which_paths_ran_in_stage_json_and_mlflow(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from llmlab.execute import execute_stage
    from llmlab.model import LlmlabConfig, build_model
    from llmlab.tokenizer import train_tokenizer

    monkeypatch.setenv("LLMLAB_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.chdir(tmp_path)
    tok = train_tokenizer([f"document {i} about the value {i * 3}" for i in range(200)], 300, tmp_path / "base")
    build_model(LlmlabConfig(d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, n_layers=2, vocab_size=len(tok),
                             max_seq_len=32, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
                seed=0).save_pretrained(tmp_path / "base")
    (tmp_path / "corpus.txt").write_text("\n\n".join(f"document {i} about the value {i * 3}" for i in range(200)))
    stage = {"kind": "pretrain", "from": None, "data": [{"path": str(tmp_path / "corpus.txt")}], "val_fraction": 0.2,
             "train": {"max_steps": 2, "warmup_steps": 0, "batch_sequences": 2, "gradient_accumulation_steps": 1,
                       "eval_every": 2, "eval_steps": 1, "save_every": 2, "log_every": 1}}
    spec = {"name": "paths", "workdir": str(tmp_path / "runs"), "tokenizer": {"path": str(tmp_path / "base")},
            "model": {"d_model": 32, "n_heads": 4, "n_kv_heads": 2, "d_ff": 64, "n_layers": 2, "max_seq_len": 32},
            "stages": {"pretrain": stage}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    compiled_on_this_device(monkeypatch)
    monkeypatch.setattr(loop, "compile_blocks", lambda model: (_ for _ in ()).throw(RuntimeError("no compiler")))
    result = execute_stage(str(tmp_path / "s.yaml"), "pretrain", {}, None)
    record = json.loads((tmp_path / "runs" / "pretrain" / "stage.json").read_text())
    assert record["status"] == "finished" and record["fast_paths"]["compile"].startswith("fell back")
    assert "no compiler" in record["fast_paths"]["compile"]
    tags = MlflowClient(f"sqlite:///{tmp_path / 'state' / 'mlflow.db'}").get_run(result["mlflow_run_id"]).data.tags
    assert tags["llmlab.fast_path.compile"] == record["fast_paths"]["compile"]
