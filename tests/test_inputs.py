"""Bad input is refused before any work: exit code 2, one line on stderr that names the problem, nothing written.

Every case calls `before_small.main([...])` in-process on the tiny CPU model. The tokenizer of `--model tiny`
is trained on the corpus given, so the module shares one cache directory (tokenizers, random-init checkpoints).
"""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import before_small  # noqa: E402
import common  # noqa: E402
from harness import budget, cli  # noqa: E402

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega river stone cloud forest lantern harbor meadow signal").split()


def valid_texts(n=45):
    """Enough prose for --seq-len 64: records 0, 20, 40 (held out) alone pack into several 64-token blocks."""
    return [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(40)) + f" record {i}." for i in range(n)]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One cache for the module, so each corpus's tokenizer and tiny checkpoint are built once."""
    return tmp_path_factory.mktemp("input-cache")


@pytest.fixture
def good_corpus(tmp_path):
    path = tmp_path / "good.json"
    path.write_text(json.dumps([{"text": t} for t in valid_texts()]))
    return path


def base_args(corpus, cache, tmp_path, max_steps=True):
    args = ["--model", "tiny", "--cache-dir", str(cache), "--output-dir", str(tmp_path / "out"),
            "--wandb", "offline", "--seq-len", "64", "--micro-batch", "2", "--tokens-per-step", "128",
            "--corpus", str(corpus)]
    return args + (["--max-steps", "1"] if max_steps else [])


def refused(argv, capsys, tmp_path) -> str:
    """Run before_small with argv; assert exit 2, one stderr line, nothing written; return that line."""
    with pytest.raises(SystemExit) as exit_info:
        before_small.main(argv)
    assert exit_info.value.code == cli.EXIT_BAD_INPUT == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert "Traceback" not in err
    assert lines[0].startswith("before_small: error: ")
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.rglob("wandb")) == []
    assert not list(tmp_path.rglob("metrics.jsonl")) and not list(tmp_path.rglob("summary.json"))
    return lines[0]


BAD_CORPORA = {
    # id: (file contents or None for no file, phrase the message must contain)
    "missing": (None, "no such file"),
    "truncated-json": ('[{"text": "a"},', "invalid or truncated JSON"),
    "garbage-json": ("{not json", "invalid or truncated JSON"),
    "empty-file": ("", "the file is empty"),
    "whitespace-only": ("  \n\t\n  ", "the file is empty"),
    "pretty-printed-object": ('{\n  "text": "x"\n}', "invalid or truncated JSON Lines, line 1"),
    "csv": ('text,label\n"hello",1\n', 'not a JSON list or JSON Lines of {"text": ...} records'),
    "top-level-string": ('"just text"', 'not a JSON list or JSON Lines of {"text": ...} records'),
    "record-without-text": ('[{"text": "fine"},\n {"body": "no text here"}]',
                            "record 2 (counting from 1, on line 2) has no string 'text' field"),
    "text-is-a-number": ('[{"text": 42}]', "record 1 (counting from 1, on line 1) has no string 'text' field"),
    "record-is-a-string": ('["just a string"]', "record 1 (counting from 1, on line 1) has no string 'text' field"),
    "json-lines-line-without-text": ('{"text": "fine"}\n\n{"body": "no text"}\n', "line 3 has no string 'text' field"),
    "only-empty-texts": ('[{"text": ""}, {"text": "  "}]', "every text is empty"),
    "empty-list": ("[]", "the list is empty"),
    "not-utf8": (b'[{"text": "caf\xe9"}]', "not UTF-8"),
    "shorter-than-a-block": (json.dumps([{"text": "hi"}] * 25), "too short"),
}


@pytest.mark.parametrize("contents, phrase", BAD_CORPORA.values(), ids=BAD_CORPORA.keys())
def test_bad_corpus_exits_2_with_one_line(contents, phrase, tmp_path, cache, capsys):
    corpus = tmp_path / "my-corpus.json"
    if isinstance(contents, bytes):
        corpus.write_bytes(contents)
    elif contents is not None:
        corpus.write_text(contents)
    line = refused(base_args(corpus, cache, tmp_path), capsys, tmp_path)
    assert str(corpus) in line
    assert phrase in line


def test_load_corpus_raises_input_error(tmp_path):
    """The library function itself (not only the script) refuses with InputError naming the file."""
    corpus = tmp_path / "x.json"
    corpus.write_text('[{"text": 1}]')
    with pytest.raises(cli.InputError, match="x.json"):
        common.load_corpus(corpus, tmp_path / "cache")


def test_json_lines_corpus_equals_json_list(tmp_path):
    texts = ["first record", "second, with \"quotes\" and a\nnewline", "  ", "caf\u00e9 \u2014 unicode", "last"]
    as_list = tmp_path / "list.json"
    as_list.write_text(json.dumps([{"text": t, "source": "x"} for t in texts], indent=0))
    as_lines = tmp_path / "lines.jsonl"
    as_lines.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts) + "\n")
    from_list = common.load_corpus(as_list, tmp_path / "cache")["text"]
    from_lines = common.load_corpus(as_lines, tmp_path / "cache")["text"]
    assert from_lines == from_list
    assert from_list == [t for t in texts if t.strip()]  # blank records dropped, order kept


def test_good_corpus_passes_the_input_checks(good_corpus, cache, tmp_path):
    """The corpus the flag tests use is valid, so their exit 2 comes from the flag."""
    args, on = cli.parse_args("before_small", before_small.MODEL, {}, before_small.SIZES,
                              base_args(good_corpus, cache, tmp_path))
    cli.validate_args(args, on, world_size=1)
    assert len(common.load_corpus(good_corpus, cache)) == 45


def test_unknown_flag_exits_2(good_corpus, cache, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        before_small.main(base_args(good_corpus, cache, tmp_path) + ["--no-such-flag"])
    assert exit_info.value.code == 2
    assert "--no-such-flag" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_help_exits_0(capsys):
    with pytest.raises(SystemExit) as exit_info:
        before_small.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--gpu-memory-gib" in out and "--corpus" in out


BAD_FLAGS = {
    "max-steps-0": (["--max-steps", "0"], "--max-steps must be positive"),
    "micro-batch-0": (["--micro-batch", "0"], "--micro-batch must be positive"),
    "seq-len-negative": (["--seq-len", "-1"], "--seq-len must be positive"),
    "tokens-per-step-0": (["--tokens-per-step", "0"], "--tokens-per-step must be positive"),
    "lr-0": (["--lr", "0"], "--lr must be positive"),
}


@pytest.mark.parametrize("extra, phrase", BAD_FLAGS.values(), ids=BAD_FLAGS.keys())
def test_non_positive_flag_exits_2(extra, phrase, good_corpus, cache, tmp_path, capsys):
    line = refused(base_args(good_corpus, cache, tmp_path) + extra, capsys, tmp_path)
    assert phrase in line


def test_zero_epochs_exits_2(good_corpus, cache, tmp_path, capsys):
    # without --max-steps: with it, --epochs is documented as overridden and 0 is not an error
    line = refused(base_args(good_corpus, cache, tmp_path, max_steps=False) + ["--epochs", "0"], capsys, tmp_path)
    assert "--epochs must be positive" in line


def test_seq_len_beyond_model_positions_exits_2(good_corpus, cache, tmp_path, capsys):
    line = refused(base_args(good_corpus, cache, tmp_path) + ["--seq-len", "5000", "--tokens-per-step", "10000"], capsys, tmp_path)
    assert "--seq-len 5000" in line and "1024 positions" in line


def test_output_dir_is_a_file_exits_2(good_corpus, cache, tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("keep me")
    argv = base_args(good_corpus, cache, tmp_path) + ["--output-dir", str(target)]
    line = refused(argv, capsys, tmp_path)
    assert str(target) in line and "is a file" in line
    assert target.read_text() == "keep me"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the budget is valid where CUDA exists")
def test_gpu_budget_without_cuda_exits_2(good_corpus, cache, tmp_path, capsys):
    line = refused(base_args(good_corpus, cache, tmp_path) + ["--gpu-memory-gib", "4"], capsys, tmp_path)
    assert "--gpu-memory-gib" in line and "needs a CUDA GPU" in line


def test_refusal_comes_before_building_the_model(good_corpus, tmp_path, capsys):
    """validate_args promises refusal 'before any work is done': a fresh cache gets no model for a refused run."""
    fresh = tmp_path / "fresh-cache"
    with pytest.raises(SystemExit):
        before_small.main(base_args(good_corpus, fresh, tmp_path) + ["--seq-len", "5000", "--tokens-per-step", "10000"])
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.strip()] == [
        "before_small: error: --seq-len 5000 is beyond tiny's 1024 positions"]
    assert not (fresh / "random-init").exists()


def test_output_dir_under_a_file_exits_2(good_corpus, cache, tmp_path, capsys):
    blocker = tmp_path / "taken"
    blocker.write_text("keep me")
    argv = base_args(good_corpus, cache, tmp_path) + ["--output-dir", str(blocker / "out")]
    line = refused(argv, capsys, tmp_path)
    assert str(blocker) in line
    assert blocker.read_text() == "keep me"


def test_corpus_directory_and_bad_json_lines_line_are_named(tmp_path, cache, capsys):
    folder = tmp_path / "a-folder"
    folder.mkdir()
    line = refused(base_args(folder, cache, tmp_path), capsys, tmp_path)
    assert "is a directory" in line
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text('{"text": "one"}\n{"text": "two"}\n{"text": oops}\n')
    line = refused(base_args(jsonl, cache, tmp_path), capsys, tmp_path)
    assert "line 3" in line and str(jsonl) in line


@pytest.mark.parametrize("gib, phrase", [("0", "must be positive"), ("-2", "must be positive"),
                                         ("200", "more than this GPU has")])
def test_gpu_budget_out_of_range_exits_2(gib, phrase, good_corpus, cache, tmp_path, capsys, monkeypatch):
    """A pretend 16 GiB GPU, so the range check runs on the CPU too."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: type("Props", (), {"total_memory": 16 * budget.GIB})())
    line = refused(base_args(good_corpus, cache, tmp_path) + ["--gpu-memory-gib", gib], capsys, tmp_path)
    assert "--gpu-memory-gib" in line and phrase in line


@pytest.mark.parametrize("argv", [["--help"], ["--no-such-flag"], ["--corpus", "missing.json"], ["--lr", "-1"]])
def test_help_and_refusals_answer_before_torch_is_imported(argv, tmp_path):
    """--help, a bad flag and bad input end (exit 0 or 2) before torch, transformers or peft are imported."""
    import subprocess

    code = ("import sys, lightweight_big\ntry:\n    lightweight_big.main(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    print('exit', e.code, *sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=tmp_path,
                          env={**__import__("os").environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    assert done.stdout.split()[-2:] == ["exit", "0" if argv == ["--help"] else "2"], done.stdout + done.stderr


@pytest.mark.parametrize("script", ["before_small", "lightweight_small", "lightweight_big"])
def test_help_names_each_default_once(script, capsys):
    import importlib

    module = importlib.import_module(script)
    with pytest.raises(SystemExit):
        module.main(["--help"])
    text = capsys.readouterr().out
    flags = text.split("\n  -")[1:]  # one entry per option, its help wrapped over several lines
    assert len(flags) > 15
    for flag in flags:
        assert flag.count("default:") <= 1, flag
        assert not any(f"(default: {v})" in flag for v in ("None", "[]", "False")), flag
    if script == "lightweight_big":
        assert "nf4:" in text and "kbit_prep:" in text  # --off and --on list their choices
        assert "to checkpoint (default: all)" in " ".join(text.split())


def full_size_args(corpus, cache, tmp_path):
    """base_args with the real OPT-350m architecture (random weights: no hub in the tests) instead of tiny."""
    args = base_args(corpus, cache, tmp_path)
    args[args.index("tiny")] = before_small.MODEL
    return args + ["--init", "random"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the check is for runs on the CPU")
def test_full_size_model_beyond_the_cpus_memory_is_refused_before_its_weights_exist(good_corpus, tmp_path, capsys,
                                                                                      monkeypatch):
    monkeypatch.setattr(budget, "available_memory_gib", lambda: 3.0)
    fresh = tmp_path / "fresh-cache"
    line = refused(full_size_args(good_corpus, fresh, tmp_path), capsys, tmp_path)
    # OPT-350m's 331M parameters in fp32 with AdamW: 4 + 4 + 8 bytes each, and activations on top
    assert "facebook/opt-350m on the CPU: a step of micro-batch 2 x 64 needs about " in line
    assert ": weights 1.2, gradients 1.2, optimizer states 2.5, activations " in line
    assert "; this machine has 3.0 GiB available: too much even at micro-batch 1" in line
    assert "--model tiny" in line
    assert not (fresh / "random-init").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the check is for runs on the CPU")
def test_full_size_model_on_the_cpu_says_what_it_needs(good_corpus, tmp_path, capsys, monkeypatch):
    """Where it fits, one line says what the step needs; the run goes on (here to a later refusal, so that no
    weights are built)."""
    monkeypatch.setattr(budget, "available_memory_gib", lambda: 100.0)
    with pytest.raises(SystemExit) as stopped:
        before_small.main(full_size_args(good_corpus, tmp_path / "fresh", tmp_path) + ["--profile", "prof"])
    assert stopped.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 2 and "a step of micro-batch 2 x 64 needs about" in lines[0]
    assert "optimizer states 2.5, activations " in lines[0] and "100.0 GiB available" in lines[0]
    assert "--model tiny" in lines[0] and "--profile" in lines[1]


def test_available_memory_is_read_from_meminfo():
    available = budget.available_memory_gib()
    if Path("/proc/meminfo").exists():
        assert 0 < available < 1 << 20
    else:
        assert available is None
@pytest.mark.parametrize("form", ["json-list", "json-lines"])
def test_bad_last_record_of_a_multi_megabyte_corpus_is_refused(form, tmp_path, cache, capsys):
    """The check streams the file (8 MB at a time): the very last record is checked before anything is written."""
    texts = valid_texts(50_000)  # about 12 MB
    corpus = tmp_path / f"big.{form}"
    if form == "json-list":
        corpus.write_text(json.dumps([{"text": t} for t in texts] + [{"txt": "the last one"}], indent=0))
        expected = f"record {len(texts) + 1} (counting from 1, on line {3 * len(texts) + 2}) has no string 'text'"
    else:
        corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts) + '{"txt": "the last one"}\n')
        expected = f"line {len(texts) + 1} has no string 'text'"
    assert corpus.stat().st_size > common.READ_BYTES  # more than one read
    line = refused(base_args(corpus, cache, tmp_path), capsys, tmp_path)
    assert str(corpus) in line and expected in line
    assert not list((cache / "corpora").glob("*.tmp")), "the half-written Arrow file is removed"


def test_profile_needs_a_gpu(good_corpus, cache, tmp_path, capsys):
    line = refused(base_args(good_corpus, cache, tmp_path) + ["--profile", str(tmp_path / "profile")], capsys, tmp_path)
    assert "--profile" in line and "CUDA" in line
    assert not (tmp_path / "profile").exists()


def test_profile_lists_the_hosts_longest_events():
    """A stall on the host (here a 50 ms sleep inside a named region) is the longest event in profile.md's host
    table, and the operators' self time is listed beside it."""
    import time

    from harness.profile import ProfileSteps

    steps = ProfileSteps("unused")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as steps.profiler:
        torch.ones(64, 64) @ torch.ones(64, 64)
        with torch.profiler.record_function("stall"):
            time.sleep(0.05)
    lines = steps.host_lines(top=3)
    longest = lines[lines.index("| event | host ms | starts at ms |") + 2]
    assert longest.startswith("| `stall` | ") and float(longest.split("|")[2]) >= 50
    assert any(line.startswith("| `aten::mm` |") for line in lines)


def test_profile_sorts_kernels_into_kinds():
    from harness.profile import kind_of

    assert kind_of("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64") == "matmul"
    assert kind_of("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel") == "attention"
    assert kind_of("void at::native::(anonymous namespace)::fused_adamw_kernel") == "optimizer"
    assert kind_of("ncclDevKernel_AllReduce_Sum_f32_RING_LL") == "communication (NCCL)"
    assert kind_of("triton_poi_fused_add_gelu_3") == "fused elementwise (Triton)"
    assert kind_of("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add>") == "other elementwise"


def test_the_peer_rows_command_lines_are_valid():
    """The benchmark's peer rows: lightweight_small.STRONGEST_PEER and lightweight_big.QLORA_PY_DEFAULTS name only
    techniques their scripts have, switched the way each is declared, and pass validation."""
    import lightweight_big
    import lightweight_small

    for script, argv, switched_on in ((lightweight_small, lightweight_small.STRONGEST_PEER, "trainer_compile"),
                                      (lightweight_big, lightweight_big.QLORA_PY_DEFAULTS, "qlora_py_adapters")):
        args, on = cli.parse_args(script.__name__, script.MODEL, script.TECHNIQUES, script.SIZES, argv)
        cli.validate_args(args, on, world_size=1)
        assert on.chosen[switched_on] and not script.TECHNIQUES[switched_on].default
    args, on = cli.parse_args("lightweight_big", lightweight_big.MODEL, lightweight_big.TECHNIQUES,
                              lightweight_big.SIZES, lightweight_big.QLORA_PY_DEFAULTS)
    assert (args.micro_batch, args.tokens_per_step) == (1, 16384) and on.chosen["paged_adamw_32bit"]
